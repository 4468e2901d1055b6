// C++ CPU kernel of gmbench's torch backend: the exponential-kernel mat-vec
// f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0)) and its gradients.
// Built and loaded by gmbench/backends/cpu_kernel.py (through native.py, which
// compiles it into a private per-user folder and checks every load); plain C
// ABI, no PyTorch headers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

typedef int64_t i64;

// Runs body(worker, workers) on `threads` std::threads.  Plain threads rather
// than an OpenMP runtime: PyTorch ships its own libgomp, and two OpenMP
// runtimes in one process spin against each other (measured: PyTorch's
// kernels became 10x slower after this one ran).
template <typename Body>
static void run_parallel(int threads, Body body) {
    if (threads <= 1) { body(0, 1); return; }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) pool.emplace_back(body, t, threads);
    body(0, threads);
    for (auto& thread : pool) thread.join();
}

// exp for x <= 0 (or NaN), written out so that GCC vectorises it: Cody-Waite
// range reduction, a degree-7 polynomial (Cephes expf, about 1 ulp), and the
// power of two assembled in the exponent bits.  Below -87 it returns about
// 1e-38 instead of underflowing; NaN stays NaN.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
static inline double exp_nonpositive(double x) { return std::exp(x); }

// Forward: one task per (mixture, point tile); Gaussian coefficients are
// stored transposed (At [G, F, N], c [G, W, N]) so the inner loop over
// Gaussians is contiguous and vectorises, exponential included.  W (1 or 2)
// weight sets share each exponential; out is [G, M, W].
template <typename T, int F, int W>
static void forward(i64 G, i64 M, i64 N, const T* X, const T* At, const T* c, T* out,
                    i64 tm, i64 tn, const uint8_t* mask, int threads) {
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        for (i64 item = next++; item < G * nmt; item = next++) {
            const i64 g = item / nmt, pt = item % nmt;
            {
            const T* a = At + g * F * N;
            const T* c0 = c + g * W * N;
            const T* c1 = c0 + (W - 1) * N;
            const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
            const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
            for (i64 i = pt * tm; i < i1; ++i) {
                T x[F];
                for (int f = 0; f < F; ++f) x[f] = X[(g * M + i) * F + f];
                T acc0 = 0, acc1 = 0;
                for (i64 nt = 0; nt < nnt; ++nt) {
                    if (row && !row[nt]) continue;
                    // Merge a run of active tiles into one loop (Morton order clusters them).
                    const i64 j0 = nt * tn;
                    if (row) while (nt + 1 < nnt && row[nt + 1]) ++nt; else nt = nnt - 1;
                    const i64 j1 = (nt + 1) * tn < N ? (nt + 1) * tn : N;
                    #pragma omp simd reduction(+ : acc0, acc1)
                    for (i64 j = j0; j < j1; ++j) {
                        T q = 0;
                        for (int f = 0; f < F; ++f) q += x[f] * a[f * N + j];
                        q = q > T(0) ? T(0) : q;  // NaN stays NaN
                        const T e = exp_nonpositive(q);
                        acc0 += c0[j] * e;
                        if (W == 2) acc1 += c1[j] * e;
                    }
                }
                out[(g * M + i) * W] = acc0;
                if (W == 2) out[(g * M + i) * W + 1] = acc1;
            }
            }
        }
    });
}

// Backward: each exponential is computed once and feeds all three gradients.
// Work items (mixture, point chunk) are split contiguously over the threads;
// each thread accumulates dA and dc of its current mixture privately and adds
// them to the output (under a lock) when it moves on.  go is [G, M, W],
// gc [G, N, W].
template <typename T, int F, int W>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* At, const T* c, const T* go,
                     T* gX, T* gA, T* gc, i64 tm, i64 tn, const uint8_t* mask, int threads) {
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn;
    const i64 chunks_per_g = G >= threads ? 1 : (threads + G - 1) / G;
    const i64 pts_per_chunk = ((nmt + chunks_per_g - 1) / chunks_per_g);
    const i64 items = G * chunks_per_g;
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    if (gA) std::memset(gA, 0, sizeof(T) * G * N * F);
    if (gc) std::memset(gc, 0, sizeof(T) * G * N * W);
    std::mutex flush_lock;
    run_parallel(threads, [&](int tid, int nth) {
        const i64 w0 = items * tid / nth, w1 = items * (tid + 1) / nth;
        std::vector<T> dAt((size_t)F * N), dc((size_t)W * N), s((size_t)N);
        i64 current = -1;
        auto flush = [&](i64 g) {
            if (g < 0) return;
            std::lock_guard<std::mutex> guard(flush_lock);
            for (i64 j = 0; j < N; ++j) {
                if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] += dc[w * N + j];
                if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] += dAt[f * N + j];
            }
        };
        for (i64 w = w0; w < w1; ++w) {
            const i64 g = w / chunks_per_g, chunk = w % chunks_per_g;
            if (g != current) {
                flush(current);
                std::fill(dAt.begin(), dAt.end(), T(0));
                std::fill(dc.begin(), dc.end(), T(0));
                current = g;
            }
            const T* a = At + g * F * N;
            const T* c0 = c + g * W * N;
            const T* c1 = c0 + (W - 1) * N;
            const i64 pt0 = chunk * pts_per_chunk;
            const i64 pt1 = pt0 + pts_per_chunk < nmt ? pt0 + pts_per_chunk : nmt;
            for (i64 pt = pt0; pt < pt1; ++pt) {
                const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
                const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
                for (i64 i = pt * tm; i < i1; ++i) {
                    const T g0 = go[(g * M + i) * W];
                    const T g1 = W == 2 ? go[(g * M + i) * W + 1] : T(0);
                    if (g0 == T(0) && g1 == T(0)) continue;
                    T x[F], dx[F];
                    for (int f = 0; f < F; ++f) { x[f] = X[(g * M + i) * F + f]; dx[f] = 0; }
                    for (i64 nt = 0; nt < nnt; ++nt) {
                        if (row && !row[nt]) continue;
                        const i64 j0 = nt * tn;
                        if (row) while (nt + 1 < nnt && row[nt + 1]) ++nt; else nt = nnt - 1;
                        const i64 j1 = (nt + 1) * tn < N ? (nt + 1) * tn : N;
                        T* sp = s.data();
                        T* dc0 = dc.data();
                        T* dc1 = dc0 + (W - 1) * N;
                        T* dap = dAt.data();
                        #pragma omp simd
                        for (i64 j = j0; j < j1; ++j) {
                            T q = 0;
                            for (int f = 0; f < F; ++f) q += x[f] * a[f * N + j];
                            q = q > T(0) ? T(0) : q;  // NaN stays NaN
                            const T e = exp_nonpositive(q);
                            dc0[j] += g0 * e;
                            if (W == 2) dc1[j] += g1 * e;
                            const T sj = W == 2 ? e * (g0 * c0[j] + g1 * c1[j]) : g0 * e * c0[j];
                            sp[j] = sj;
                            for (int f = 0; f < F; ++f) dap[f * N + j] += sj * x[f];
                        }
                        if (gX) for (int f = 0; f < F; ++f) {
                            T acc = 0;
                            #pragma omp simd reduction(+ : acc)
                            for (i64 j = j0; j < j1; ++j) acc += sp[j] * a[f * N + j];
                            dx[f] += acc;
                        }
                    }
                    if (gX) for (int f = 0; f < F; ++f) gX[(g * M + i) * F + f] = dx[f];
                }
            }
        }
        flush(current);
    });
}

#define INSTANTIATE(T, F, W, SUFFIX)                                                         \
extern "C" void ekmv_forward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* At,      \
        const T* c, T* out, i64 tm, i64 tn, const uint8_t* mask, int threads) {           \
    forward<T, F, W>(G, M, N, X, At, c, out, tm, tn, mask, threads);                       \
}                                                                                          \
extern "C" void ekmv_backward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* At,     \
        const T* c, const T* go, T* gX, T* gA, T* gc, i64 tm, i64 tn,                     \
        const uint8_t* mask, int threads) {                                                \
    backward<T, F, W>(G, M, N, X, At, c, go, gX, gA, gc, tm, tn, mask, threads);           \
}
INSTANTIATE(float, 6, 1, f32_6_w1)
INSTANTIATE(float, 10, 1, f32_10_w1)
INSTANTIATE(double, 6, 1, f64_6_w1)
INSTANTIATE(double, 10, 1, f64_10_w1)
INSTANTIATE(float, 6, 2, f32_6_w2)
INSTANTIATE(float, 10, 2, f32_10_w2)
INSTANTIATE(double, 6, 2, f64_6_w2)
INSTANTIATE(double, 10, 2, f64_10_w2)
