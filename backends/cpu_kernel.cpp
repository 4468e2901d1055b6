// C++ CPU kernel of gmbench's torch backend: the exponential-kernel mat-vec
// f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0)) and its gradients.
// Built and loaded by gmbench/backends/cpu_kernel.py (through native.py, which
// compiles it into a private per-user folder and checks every load); plain C
// ABI, no PyTorch headers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <thread>
#include <vector>

#include "fast_exp.h"  // exp_nonpositive: pasted in by native.py before compiling

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
// Points are taken P at a time against chunks of JC Gaussians: the per-pair
// values s_ij = g_i c_j e_ij of the block stay in L1, so dA and dc are read
// and written once per Gaussian for P points (not once per pair), which made
// the backward memory-bound before.
// Work items (mixture, chunk of point tiles) are handed out dynamically (an
// atomic counter, as in the forward), so a thread slowed by other jobs on its
// core does not hold up the others.  Each item accumulates dA and dc in its
// own buffer; a mixture split into several chunks (only when there are fewer
// than 4 mixtures per thread) has them summed in chunk order at the end, so
// the result does not depend on which thread ran what.  go is [G, M, W],
// gc [G, N, W].
template <typename T, int F, int W, int P = 8, int JC = 512>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* At, const T* c, const T* go,
                     T* gX, T* gA, T* gc, i64 tm, i64 tn, const uint8_t* mask, int threads) {
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn;
    const i64 wanted = G >= 4 * (i64)threads || G == 0 ? 1 : (4 * (i64)threads + G - 1) / G;
    const i64 chunks_per_g = wanted < nmt ? wanted : (nmt > 0 ? nmt : 1);
    const i64 pts_per_chunk = ((nmt + chunks_per_g - 1) / chunks_per_g);
    const i64 items = G * chunks_per_g;
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    // Per-chunk partial sums [item][F + W][N] when mixtures are split.
    std::vector<T> partial(chunks_per_g > 1 ? (size_t)items * (F + W) * N : 0);
    // dAt [F, N] and dc [W, N] of mixture g into gA [G, N, F] and gc [G, N, W].
    auto write_out = [&](i64 g, const T* dAt, const T* dc) {
        for (i64 j = 0; j < N; ++j) {
            if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] = dc[w * N + j];
            if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] = dAt[f * N + j];
        }
    };
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        std::vector<T> own(chunks_per_g > 1 ? 0 : (size_t)(F + W) * N);
        alignas(64) T sbuf[P][JC];
        alignas(64) T ebuf[P][JC];
        for (i64 w = next++; w < items; w = next++) {
            const i64 g = w / chunks_per_g, chunk = w % chunks_per_g;
            T* dAt = chunks_per_g > 1 ? partial.data() + (size_t)w * (F + W) * N : own.data();
            T* dcp = dAt + (size_t)F * N;
            std::fill(dAt, dAt + (size_t)(F + W) * N, T(0));
            const T* a = At + g * F * N;
            const T* c0 = c + g * W * N;
            const T* c1 = c0 + (W - 1) * N;
            const i64 pt0 = chunk * pts_per_chunk;
            const i64 pt1 = pt0 + pts_per_chunk < nmt ? pt0 + pts_per_chunk : nmt;
            for (i64 pt = pt0; pt < pt1; ++pt) {
                const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
                const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
                for (i64 ib = pt * tm; ib < i1; ib += P) {
                    const i64 np = i1 - ib < P ? i1 - ib : P;
                    // A block of P points (zero-padded; a padded point has no gradient).
                    T x[P][F], dx[P][F], g0[P], g1[P];
                    bool any = false;
                    for (int p = 0; p < P; ++p) {
                        const bool real = p < np;
                        g0[p] = real ? go[(g * M + ib + p) * W] : T(0);
                        g1[p] = real && W == 2 ? go[(g * M + ib + p) * W + 1] : T(0);
                        any |= g0[p] != T(0) || g1[p] != T(0);
                        for (int f = 0; f < F; ++f) { x[p][f] = real ? X[(g * M + ib + p) * F + f] : T(0); dx[p][f] = 0; }
                    }
                    if (!any) continue;
                    for (i64 nt = 0; nt < nnt; ++nt) {
                        if (row && !row[nt]) continue;
                        const i64 j0 = nt * tn;
                        if (row) while (nt + 1 < nnt && row[nt + 1]) ++nt; else nt = nnt - 1;
                        const i64 j1 = (nt + 1) * tn < N ? (nt + 1) * tn : N;
                        for (i64 jc = j0; jc < j1; jc += JC) {
                            const i64 len = j1 - jc < JC ? j1 - jc : JC;
                            const T* ac = a + jc;
                            const T* c0c = c0 + jc;
                            const T* c1c = c1 + jc;
                            // s[p][j] = g . c_j e_pj and e[p][j] for the chunk, one exponential per pair.
                            // dX in the same pass: the a_j loaded for the exponent feed it too.
                            for (int p = 0; p < P; ++p) {
                                T* sp = sbuf[p];
                                T* ep = ebuf[p];
                                const T gp0 = g0[p], gp1 = g1[p];
                                T xp[F], dxp[F];
                                for (int f = 0; f < F; ++f) { xp[f] = x[p][f]; dxp[f] = 0; }
                                #pragma omp simd reduction(+ : dxp[:F])
                                for (i64 j = 0; j < len; ++j) {
                                    T q = 0;
                                    for (int f = 0; f < F; ++f) q += xp[f] * ac[f * N + j];
                                    q = q > T(0) ? T(0) : q;  // NaN stays NaN
                                    const T e = exp_nonpositive(q);
                                    T sj;
                                    if (W == 2) {
                                        ep[j] = e;
                                        sj = e * (gp0 * c0c[j] + gp1 * c1c[j]);
                                        sp[j] = sj;
                                    } else {  // one buffer: t = g e; s = t c_j, dc_j = sum_p t
                                        const T t = gp0 * e;
                                        sp[j] = t;
                                        sj = t * c0c[j];
                                    }
                                    for (int f = 0; f < F; ++f) dxp[f] += sj * ac[f * N + j];
                                }
                                for (int f = 0; f < F; ++f) dx[p][f] += dxp[f];
                            }
                            // dc and dA: one read-modify-write per Gaussian (and feature) for all P points.
                            T* dc0 = dcp + jc;
                            T* dc1 = dcp + (W - 1) * N + jc;
                            if (W == 2) {
                                #pragma omp simd
                                for (i64 j = 0; j < len; ++j) {
                                    T acc0 = 0, acc1 = 0;
                                    for (int p = 0; p < P; ++p) {
                                        acc0 += g0[p] * ebuf[p][j];
                                        acc1 += g1[p] * ebuf[p][j];
                                    }
                                    dc0[j] += acc0;
                                    dc1[j] += acc1;
                                }
                            } else {
                                #pragma omp simd
                                for (i64 j = 0; j < len; ++j) {
                                    T acc = 0;
                                    for (int p = 0; p < P; ++p) acc += sbuf[p][j];
                                    dc0[j] += acc;
                                }
                            }
                            for (int f = 0; f < F; ++f) {
                                T* dap = dAt + f * N + jc;
                                T xf[P];
                                for (int p = 0; p < P; ++p) xf[p] = x[p][f];
                                #pragma omp simd
                                for (i64 j = 0; j < len; ++j) {
                                    T acc = 0;
                                    for (int p = 0; p < P; ++p) acc += sbuf[p][j] * xf[p];
                                    dap[j] += W == 2 ? acc : acc * c0c[j];
                                }
                            }
                        }
                    }
                    if (gX) for (int p = 0; p < np; ++p)
                        for (int f = 0; f < F; ++f) gX[(g * M + ib + p) * F + f] = dx[p][f];
                }
            }
            if (chunks_per_g == 1) write_out(g, dAt, dAt + (size_t)F * N);
        }
    });
    if (chunks_per_g > 1) {  // sum each mixture's chunks in chunk order
        std::atomic<i64> next_g(0);
        run_parallel(threads, [&](int, int) {
            std::vector<T> sum((size_t)(F + W) * N);
            for (i64 g = next_g++; g < G; g = next_g++) {
                const T* first = partial.data() + (size_t)g * chunks_per_g * (F + W) * N;
                std::copy(first, first + sum.size(), sum.begin());
                for (i64 k = 1; k < chunks_per_g; ++k) {
                    const T* part = first + (size_t)k * (F + W) * N;
                    for (size_t n = 0; n < sum.size(); ++n) sum[n] += part[n];
                }
                write_out(g, sum.data(), sum.data() + (size_t)F * N);
            }
        });
    }
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
