// TreeHEM's sort of the Gaussians (gmbench/reduction/morton.py and
// TreeHEMReduction._morton_order): the valid Gaussians (|weight| >= the
// threshold) by the Morton code of their centroid in the valid ones'
// bounding box, stably, then the others in their order.  Pasted into
// node_fit_kernel.cpp by native.py.
//
// Why native: in PyTorch this is about 30 passes over [G, N] columns (box,
// quantisation, a table lookup and shifts per axis, the masking) before the
// argsort, 1.4 s of the paper layout's 12 s training step; here it is one
// pass per mixture.  The same float operations in the same order (the
// library is built without -ffast-math, and contraction is off below), so
// the codes, and therefore the order, are the PyTorch form's.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Returns false if a valid centroid is not finite (the caller then takes the
// PyTorch path, whose NaN behaviour this does not reproduce).
template <typename T, int D>
static bool morton_order_one(i64 N, const T* m, T weight_threshold, int bits, i64* order, uint8_t* valid,
                             std::vector<std::pair<i64, i64>>& keyed) {
    constexpr int K = 1 + D + D * D;
    const T big = std::numeric_limits<T>::max();
    T lower[D], upper[D];
    for (int a = 0; a < D; ++a) lower[a] = big, upper[a] = -big;
    bool any = false;
    for (i64 j = 0; j < N; ++j) {
        const T* mj = m + j * K;
        valid[j] = std::fabs(mj[0]) >= weight_threshold;
        if (!valid[j]) continue;
        any = true;
        for (int a = 0; a < D; ++a) {
            const T x = mj[1 + a];
            if (!std::isfinite(x)) return false;
            lower[a] = x < lower[a] ? x : lower[a];
            upper[a] = x > upper[a] ? x : upper[a];
        }
    }
    const T tiny = std::numeric_limits<T>::min();
    const T levels = T((i64(1) << bits) - 1);
    T extent[D];
    for (int a = 0; a < D; ++a) {
        if (!any) lower[a] = 0, upper[a] = 1;
        const T e = upper[a] - lower[a];
        extent[a] = e < tiny ? tiny : e;
    }
    keyed.resize(N);
    for (i64 j = 0; j < N; ++j) {
        i64 code = std::numeric_limits<i64>::max();  // dropped Gaussians go to the end
        if (valid[j]) {
            code = 0;
            for (int a = 0; a < D; ++a) {
                T q = std::nearbyint((m[j * K + 1 + a] - lower[a]) / extent[a] * levels);  // half to even, as torch.round
                q = q < 0 ? T(0) : (q > levels ? levels : q);
                const i64 qi = (i64)q;
                for (int b = 0; b < bits; ++b)  // bit b of axis a to bit b D + D - 1 - a: axis 0 most significant
                    code |= ((qi >> b) & 1) << (b * D + D - 1 - a);
            }
        }
        keyed[j] = {code, j};
    }
    // Sorting (code, index) pairs is the stable sort by code.
    std::sort(keyed.begin(), keyed.end());
    for (i64 j = 0; j < N; ++j) order[j] = keyed[j].second;
    return true;
}

#pragma GCC pop_options

template <typename T, int D>
static int morton_order(i64 G, i64 N, const T* m, T weight_threshold, int bits, i64* order, uint8_t* valid,
                        int threads) {
    constexpr int K = 1 + D + D * D;
    std::atomic<i64> next(0);
    std::atomic<int> finite(1);
    run_parallel(threads < G ? threads : (int)std::max<i64>(G, 1), [&]() {
        std::vector<std::pair<i64, i64>> keyed;
        for (i64 g = next++; g < G; g = next++)
            if (!morton_order_one<T, D>(N, m + g * N * K, weight_threshold, bits, order + g * N, valid + g * N, keyed))
                finite = 0;
    });
    return finite;
}

// Exported after the anonymous namespace closes (node_fit_kernel.cpp).
#define INSTANTIATE_MORTON(T, D, SUFFIX)                                                                   \
extern "C" int morton_order_##SUFFIX(i64 G, i64 N, const T* m, double weight_threshold, int bits,       \
        i64* order, uint8_t* valid, int threads) {                                                       \
    return morton_order<T, D>(G, N, m, (T)weight_threshold, bits, order, valid, threads);               \
}
