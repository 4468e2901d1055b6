// The evaluation's inputs from a mixture, and their gradients: per Gaussian
// j, the quadratic features X_j of its own centre (the dense fit evaluates a
// mixture at its centroids), its exponent coefficients A_j and its peak
// values c_j (see gmbench/backends/torch.py: centroid_terms, whose PyTorch
// form this is, operation for operation).  Pasted into cpu_kernel.cpp by
// native.py.
//
// Why a kernel: written in PyTorch the terms are about 60 elementwise
// operations on [G, N] columns, each a pass over memory, and autograd adds
// twice as many plus a full-size zero-filled gradient for every column of
// the mixture it slices (widest layer of the paper's ModelNet10 layout,
// 1344 x 2560 Gaussians: 0.29 s forward and 0.31 s backward, against 0.03 s
// and 0.09 s here); here each Gaussian is read once and written once, in
// both directions.
//
// Layout: m [R, K] rows (K = 1 + D + D*D: weight, position, covariance row
// by row), centre [R / N, D] (one per mixture of N rows), weight sets
// s [R, W] (W = 0: the mixture's own weights); X, A [R, F] and c [R, max(W, 1)].
// Only the upper triangle of a covariance is read, and only it gets a
// gradient, as in the PyTorch form.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off", "no-fast-math")

template <typename T, int D> struct CentroidLayout {
    static constexpr int K = 1 + D + D * D;
    static constexpr int F = D * (D + 1) / 2 + D + 1;
    static constexpr int cov(int r, int c) { return 1 + D + r * D + c; }
};

// Log of (2 pi)^(D/2), so that peak = exp(-0.5 (log det + D log 2 pi)) as in
// mixture.log_normaliser.
static constexpr double LOG_2PI = 1.8378770664093454835606594728112;

// What forward and backward both derive from one Gaussian row: the centred
// position, the covariance's upper triangle, its cofactors and determinant
// (clamped at the smallest normal number, NaN kept, as clamp_min), the
// precision P = cofactors / det, P x and the peak value.
template <typename T, int D> struct CentroidGeometry {
    T x[D], cov[D][D], cof[D][D], det_raw, det, p[D][D], pmu[D], peak;

    CentroidGeometry(const T* mj, const T* o) {
        typedef CentroidLayout<T, D> L;
        const T tiny = std::numeric_limits<T>::min();
        for (int k = 0; k < D; ++k) x[k] = mj[1 + k] - o[k];
        for (int r = 0; r < D; ++r)
            for (int k = r; k < D; ++k) cov[r][k] = cov[k][r] = mj[L::cov(r, k)];
        if constexpr (D == 2) {
            det_raw = cov[0][0] * cov[1][1] - cov[0][1] * cov[0][1];
            cof[0][0] = cov[1][1], cof[0][1] = -cov[0][1], cof[1][1] = cov[0][0];
        } else {
            const T a = cov[0][0], b = cov[0][1], cc = cov[0][2], e = cov[1][1], f = cov[1][2], i = cov[2][2];
            cof[0][0] = e * i - f * f, cof[0][1] = cc * f - b * i, cof[0][2] = b * f - cc * e;
            cof[1][1] = a * i - cc * cc, cof[1][2] = b * cc - a * f, cof[2][2] = a * e - b * b;
            det_raw = a * cof[0][0] + b * cof[0][1] + cc * cof[0][2];
        }
        det = det_raw < tiny ? tiny : det_raw;
        for (int r = 0; r < D; ++r)
            for (int k = r; k < D; ++k) p[r][k] = p[k][r] = cof[r][k] / det;
        for (int r = 0; r < D; ++r) {
            T acc = p[r][0] * x[0];
            for (int k = 1; k < D; ++k) acc = acc + p[r][k] * x[k];
            pmu[r] = acc;
        }
        peak = std::exp(T(-0.5) * (std::log(det) + T(D * LOG_2PI)));
    }
};

// One Gaussian forward: writes X[F], A[F], c[W] (s = the W weights to scale).
template <typename T, int D>
static inline void centroid_terms_one(const T* mj, const T* o, const T* s, int W, T* X, T* A, T* c) {
    typedef CentroidLayout<T, D> L;
    const CentroidGeometry<T, D> g(mj, o);
    T constant = g.x[0] * g.pmu[0];
    for (int k = 1; k < D; ++k) constant = constant + g.x[k] * g.pmu[k];
    int u = 0;
    for (int r = 0; r < D; ++r)
        for (int k = r; k < D; ++k, ++u) {
            A[u] = r == k ? g.p[r][r] * T(-0.5) : -g.p[r][k];
            X[u] = g.x[r] * g.x[k];
        }
    for (int k = 0; k < D; ++k) A[u + k] = g.pmu[k], X[u + k] = g.x[k];
    A[L::F - 1] = constant * T(-0.5);
    X[L::F - 1] = T(1);
    if (W == 0) c[0] = mj[0] * g.peak;
    for (int v = 0; v < W; ++v) c[v] = s[v] * g.peak;
}

// One Gaussian backward: the reverse of centroid_terms_one, operation for
// operation.  gX, gA, gc may be null (no gradient there); writes gm[K] and,
// with weight sets, gs[W].
template <typename T, int D>
static inline void centroid_terms_one_backward(const T* mj, const T* o, const T* s, int W, const T* gX,
                                               const T* gA, const T* gc, T* gm, T* gs) {
    typedef CentroidLayout<T, D> L;
    constexpr int F = L::F, U = D * (D + 1) / 2;
    const T tiny = std::numeric_limits<T>::min();
    const CentroidGeometry<T, D> geometry(mj, o);
    const T(&x)[D] = geometry.x;
    const T(&cov)[D][D] = geometry.cov;
    const T(&cof)[D][D] = geometry.cof;
    const T(&p)[D][D] = geometry.p;
    const T(&pmu)[D] = geometry.pmu;
    const T det_raw = geometry.det_raw, det = geometry.det, peak = geometry.peak;

    // c = s * peak (or the mixture's own weight times peak).
    T g_peak = 0;
    for (int k = 0; k < L::K; ++k) gm[k] = 0;
    if (W == 0) {
        const T g = gc ? gc[0] : T(0);
        gm[0] = g * peak;
        g_peak = g * mj[0];
    }
    for (int v = 0; v < W; ++v) {
        const T g = gc ? gc[v] : T(0);
        gs[v] = g * peak;
        g_peak += g * s[v];
    }
    T g_det = g_peak * peak * T(-0.5) / det;  // d exp(-0.5 log det) / d det
    // A = [upper(P) scaled, P x, -0.5 x.P x]; X = [x x^T upper, x, 1].
    const T g_constant = gA ? gA[F - 1] * T(-0.5) : T(0);
    T g_pmu[D], g_x[D], g_p[D][D];
    for (int k = 0; k < D; ++k) {
        g_pmu[k] = (gA ? gA[U + k] : T(0)) + g_constant * x[k];
        g_x[k] = g_constant * pmu[k] + (gX ? gX[U + k] : T(0));
    }
    int u = 0;
    for (int r = 0; r < D; ++r)
        for (int k = r; k < D; ++k, ++u) {
            const T ga = gA ? gA[u] : T(0), gx = gX ? gX[u] : T(0);
            g_p[r][k] = (r == k ? ga * T(-0.5) : -ga) + g_pmu[r] * x[k] + (r == k ? T(0) : g_pmu[k] * x[r]);
            g_x[r] += gx * x[k];
            g_x[k] += gx * x[r];
        }
    for (int r = 0; r < D; ++r)  // pmu = P x, P symmetric: row r's entry (r, k) is the upper one
        for (int k = 0; k < D; ++k) g_x[k] += g_pmu[r] * p[r][k];
    // P = cofactors / det.
    T g_cof[D][D];
    for (int r = 0; r < D; ++r)
        for (int k = r; k < D; ++k) {
            g_cof[r][k] = g_p[r][k] / det;
            g_det -= g_p[r][k] * p[r][k] / det;
        }
    const T g_det_raw = det_raw >= tiny ? g_det : T(0);  // clamp_min passes the gradient where not clamped
    T g_cov[D][D] = {};
    if constexpr (D == 2) {
        // det = a cc - b b; cofactors (cc, -b, a)
        g_cov[0][0] = g_det_raw * cov[1][1] + g_cof[1][1];
        g_cov[1][1] = g_det_raw * cov[0][0] + g_cof[0][0];
        g_cov[0][1] = T(-2) * cov[0][1] * g_det_raw - g_cof[0][1];
    } else {
        const T a = cov[0][0], b = cov[0][1], cc = cov[0][2], e = cov[1][1], f = cov[1][2], i = cov[2][2];
        // det = a A0 + b B0 + cc C0
        const T gA0 = g_cof[0][0] + g_det_raw * a, gB0 = g_cof[0][1] + g_det_raw * b, gC0 = g_cof[0][2] + g_det_raw * cc;
        const T gE0 = g_cof[1][1], gF0 = g_cof[1][2], gI0 = g_cof[2][2];
        T ga = g_det_raw * cof[0][0], gb = g_det_raw * cof[0][1], gc3 = g_det_raw * cof[0][2];
        T ge = 0, gf = 0, gi = 0;
        ge += gA0 * i, gi += gA0 * e, gf -= T(2) * f * gA0;      // A0 = e i - f f
        gc3 += gB0 * f, gf += gB0 * cc, gb -= gB0 * i, gi -= gB0 * b;  // B0 = cc f - b i
        gb += gC0 * f, gf += gC0 * b, gc3 -= gC0 * e, ge -= gC0 * cc;  // C0 = b f - cc e
        ga += gE0 * i, gi += gE0 * a, gc3 -= T(2) * cc * gE0;     // E0 = a i - cc cc
        gb += gF0 * cc, gc3 += gF0 * b, ga -= gF0 * f, gf -= gF0 * a;  // F0 = b cc - a f
        ga += gI0 * e, ge += gI0 * a, gb -= T(2) * b * gI0;       // I0 = a e - b b
        g_cov[0][0] = ga, g_cov[0][1] = gb, g_cov[0][2] = gc3, g_cov[1][1] = ge, g_cov[1][2] = gf, g_cov[2][2] = gi;
    }
    for (int k = 0; k < D; ++k) gm[1 + k] = g_x[k];
    for (int r = 0; r < D; ++r)
        for (int k = r; k < D; ++k) gm[L::cov(r, k)] = g_cov[r][k];
}

// Rows [0, R) in contiguous ranges per thread (each row is independent).
template <typename Body>
static void rows_in_parallel(i64 R, int threads, Body body) {
    const i64 per = 4096;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        for (i64 r0 = next.fetch_add(per); r0 < R; r0 = next.fetch_add(per)) {
            const i64 r1 = r0 + per < R ? r0 + per : R;
            for (i64 r = r0; r < r1; ++r) body(r);
        }
    });
}

template <typename T, int D>
static void centroid_terms(i64 G, i64 N, const T* m, const T* centre, const T* s, int W, T* X, T* A, T* c,
                           int threads) {
    typedef CentroidLayout<T, D> L;
    const int C = W == 0 ? 1 : W;
    advise_huge_pages(X, sizeof(T) * G * N * L::F);
    advise_huge_pages(A, sizeof(T) * G * N * L::F);
    rows_in_parallel(G * N, threads, [&](i64 r) {
        centroid_terms_one<T, D>(m + r * L::K, centre + (r / N) * D, s ? s + r * W : nullptr, W,
                                 X + r * L::F, A + r * L::F, c + r * C);
    });
}

template <typename T, int D>
static void centroid_terms_backward(i64 G, i64 N, const T* m, const T* centre, const T* s, int W, const T* gX,
                                    const T* gA, const T* gc, T* gm, T* gs, int threads) {
    typedef CentroidLayout<T, D> L;
    const int C = W == 0 ? 1 : W;
    advise_huge_pages(gm, sizeof(T) * G * N * L::K);
    rows_in_parallel(G * N, threads, [&](i64 r) {
        centroid_terms_one_backward<T, D>(m + r * L::K, centre + (r / N) * D, s ? s + r * W : nullptr, W,
                                          gX ? gX + r * L::F : nullptr, gA ? gA + r * L::F : nullptr,
                                          gc ? gc + r * C : nullptr, gm + r * L::K, gs ? gs + r * W : nullptr);
    });
}

#pragma GCC pop_options

#define INSTANTIATE_CENTROID_TERMS(T, D, SUFFIX)                                                          \
extern "C" void centroid_terms_##SUFFIX(i64 G, i64 N, const T* m, const T* centre, const T* s, int W,    \
        T* X, T* A, T* c, int threads) {                                                                \
    centroid_terms<T, D>(G, N, m, centre, s, W, X, A, c, threads);                                      \
}                                                                                                       \
extern "C" void centroid_terms_backward_##SUFFIX(i64 G, i64 N, const T* m, const T* centre, const T* s, \
        int W, const T* gX, const T* gA, const T* gc, T* gm, T* gs, int threads) {                      \
    centroid_terms_backward<T, D>(G, N, m, centre, s, W, gX, gA, gc, gm, gs, threads);                  \
}
INSTANTIATE_CENTROID_TERMS(float, 2, f32_2d)
INSTANTIATE_CENTROID_TERMS(float, 3, f32_3d)
INSTANTIATE_CENTROID_TERMS(double, 2, f64_2d)
INSTANTIATE_CENTROID_TERMS(double, 3, f64_3d)
