// C++ CPU kernel of gmbench's torch backend: the exponential-kernel mat-vec
// f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0)) and its gradients.
// Built and loaded by gmbench/backends/cpu_kernel.py (through native.py, which
// compiles it into a private per-user folder and checks every load); plain C
// ABI, no PyTorch headers.
//
// Layout: ekmv_pack copies a mixture's Gaussians into blocks of L lanes (one
// SIMD vector: 16 floats with AVX-512), F coefficient rows then W peak-value
// rows, zero-padded.  Forward and backward take the lanes over Gaussians and
// broadcast the point features: each loaded coefficient vector serves P
// points (register blocking; the coefficients were reloaded from L2 for
// every pair before), and the per-lane sums over points (the forward's
// outputs, the backward's dA and dc) stay in registers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#define GMBENCH_VECTOR_BYTES 64
#elif defined(__AVX__)
#define GMBENCH_VECTOR_BYTES 32
#else
#define GMBENCH_VECTOR_BYTES 16
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(GMBENCH_PORTABLE_EXP)
#include <immintrin.h>
#define GMBENCH_AVX512_EXP 1
#elif GMBENCH_VECTOR_BYTES == 32 && defined(__FMA__)
#include <immintrin.h>
#define GMBENCH_AVX2_FMA 1
#endif

typedef int64_t i64;

// GCC vector extensions: one code path for every instruction set (-march=native
// picks AVX-512, AVX2 or SSE); only the exponential's round and ldexp (and
// fused multiply-adds) have AVX-512 intrinsics.
template <typename T> struct Simd;
template <> struct Simd<float> {
    typedef float V __attribute__((vector_size(GMBENCH_VECTOR_BYTES)));
    typedef int32_t I __attribute__((vector_size(GMBENCH_VECTOR_BYTES)));
};
template <> struct Simd<double> {
    typedef double V __attribute__((vector_size(GMBENCH_VECTOR_BYTES)));
    typedef int64_t I __attribute__((vector_size(GMBENCH_VECTOR_BYTES)));
};
template <typename T> using vec = typename Simd<T>::V;
template <typename T> using ivec = typename Simd<T>::I;
template <typename T> constexpr int lanes() { return GMBENCH_VECTOR_BYTES / sizeof(T); }

template <typename T> static inline vec<T> loadv(const T* p) { vec<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> static inline void storev(T* p, vec<T> v) { std::memcpy(p, &v, sizeof v); }
template <typename T> static inline vec<T> splat(T s) { return vec<T>{} + s; }
// a * b + c as one fused operation that -ffast-math may not re-associate: GCC
// otherwise splits the exponent's dot product into parallel chains joined by
// extra adds (13 operations instead of 10 for 3D features).  The same happens
// with AVX2 and FMA (the backward's pass-1 loop had 16 multiplies and 10 adds
// where 10 and 2 belong, and the ill-conditioned float32 test failed there):
// see fmadd_ordered.
static inline vec<float> fmadd(vec<float> a, vec<float> b, vec<float> c) {
#ifdef GMBENCH_AVX512_EXP
    return (vec<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    return a * b + c;
#endif
}
static inline vec<double> fmadd(vec<double> a, vec<double> b, vec<double> c) {
#ifdef GMBENCH_AVX512_EXP
    return (vec<double>)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
    return a * b + c;
#endif
}
// fmadd, also fused under AVX2 and FMA: for the exponent's dot product only
// (the order of its sum is what the float32 error depends on; the intrinsic
// everywhere, polynomial and gradient sums too, made the 3D backward 22%
// slower on an AVX2 machine).
template <typename V> static inline V fmadd_ordered(V a, V b, V c) {
#ifdef GMBENCH_AVX2_FMA
    if constexpr (sizeof(a[0]) == 4) return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
    else return (V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    return fmadd(a, b, c);
#endif
}
// x . a for one point (scalar features, broadcast) and one block of Gaussians,
// summed in feature order as the GEMM form does (adding the constant term
// first, one multiply fewer, doubled the float32 error on ill-conditioned
// mixtures).
template <typename T, int F>
static inline vec<T> exponent(const vec<T> (&a)[F], const T* __restrict x) {
    vec<T> y = a[0] * x[0];
    for (int f = 1; f < F; ++f) y = fmadd_ordered(a[f], splat(x[f]), y);
    return y;
}
template <typename T> static inline T hsum(vec<T> v) {  // fixed lane order: reproducible
    T s = 0;
    for (int l = 0; l < lanes<T>(); ++l) s += v[l];
    return s;
}

// exp(min(q, 0)) as 2^t, t = q log2(e): exactly 0 far below (down to the
// smallest denormal with AVX-512; about 1e-38 / 2e-308 at the most without),
// NaN stays NaN.  r = t - round(t) (vreduce with AVX-512, exact), 2^r by a
// polynomial, times 2^round(t) (vscalef).  Rounding t costs a relative error
// of at most u |q|, no more than the rounding of q itself (scaling the
// coefficients by log2(e) instead, one multiply fewer, added u sum |x_f a_f|
// and doubled the float32 error on ill-conditioned mixtures).  Float:
// degree-6 fit of 2^r on [-1/2, 1/2] (relative error 2e-9, below float
// rounding); double: the Taylor series of exp(r ln 2) to degree 13 (4e-18).
static inline vec<float> exp_nonpositive(vec<float> q) {
    typedef vec<float> V;
#ifdef GMBENCH_AVX512_EXP
    // min returns its second operand when one is NaN: NaN stays NaN.
    const V t = (V)_mm512_min_ps(_mm512_setzero_ps(), (__m512)q) * 1.44269504088896341f;
    // -inf: r = 0, t - r = -inf, 2^-inf = 0.
    const V r = (V)_mm512_reduce_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V n = t - r;
#else
    const V zero = {};
    V t = (q > zero ? zero : q) * 1.44269504088896341f;  // NaN stays NaN
    t = t < splat(-126.0f) ? splat(-126.0f) : t;      // the exponent bits below cannot go lower
    const ivec<float> ni = __builtin_convertvector(t - 0.5f, ivec<float>);  // round half down (t <= 0)
    const V n = __builtin_convertvector(ni, V);
    const V r = t - n;  // exact, in [-1/2, 1/2]
#endif
    V p = splat(1.5353648689136773e-4f);
    p = fmadd(p, r, splat(1.3398887843886300e-3f));
    p = fmadd(p, r, splat(9.6184363143227910e-3f));
    p = fmadd(p, r, splat(5.5503324243820020e-2f));
    p = fmadd(p, r, splat(2.4022647922330778e-1f));
    p = fmadd(p, r, splat(6.9314720289121490e-1f));
    p = fmadd(p, r, splat(1.0f));
#ifdef GMBENCH_AVX512_EXP
    return (V)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    const ivec<float> bits = (ni + 127) << 23;
    return p * (V)bits;
#endif
}

static inline vec<double> exp_nonpositive(vec<double> q) {
    typedef vec<double> V;
#ifdef GMBENCH_AVX512_EXP
    const V t = (V)_mm512_min_pd(_mm512_setzero_pd(), (__m512d)q) * 1.44269504088896340736;
    const V f = (V)_mm512_reduce_pd((__m512d)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V n = t - f;
#else
    const V zero = {};
    V t = (q > zero ? zero : q) * 1.44269504088896340736;
    t = t < splat(-1022.0) ? splat(-1022.0) : t;
    const ivec<double> ni = __builtin_convertvector(t - 0.5, ivec<double>);
    const V n = __builtin_convertvector(ni, V);
    const V f = t - n;
#endif
    const V r = f * 0.69314718055994530942;  // exp(r), |r| <= ln(2) / 2
    V p = splat(1.0 / 6227020800.0);
    const double inverse_factorials[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                         1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                         1.0 / 6.0, 0.5, 1.0, 1.0};
    for (double k : inverse_factorials) p = fmadd(p, r, splat(k));
#ifdef GMBENCH_AVX512_EXP
    return (V)_mm512_scalef_pd((__m512d)p, (__m512d)n);
#else
    const ivec<double> bits = (ni + 1023) << 52;
    return p * (V)bits;
#endif
}

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

#include "huge_pages.h"  // advise_huge_pages: pasted in by native.py
#include "centroid_terms.h"  // the mat-vec's inputs X, A, c from a mixture: pasted in by native.py

template <typename T> static inline i64 blocks_of(i64 N) { return (N + lanes<T>() - 1) / lanes<T>(); }

// A[G, N, F], c[G, N, W] -> packed[G, blocks, F + W, L]: A, then c; zero padding.
template <typename T, int F, int W>
static void pack(i64 G, i64 N, const T* A, const T* c, T* packed, int threads) {
    constexpr int L = lanes<T>(), B = (F + W) * L;
    const i64 nb = blocks_of<T>(N);
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        for (i64 g = next++; g < G; g = next++) {
            for (i64 b = 0; b < nb; ++b) {
                T* blk = packed + (g * nb + b) * B;
                for (int l = 0; l < L; ++l) {
                    const i64 j = b * L + l;
                    const bool real = j < N;
                    for (int f = 0; f < F; ++f) blk[f * L + l] = real ? A[(g * N + j) * F + f] : T(0);
                    for (int w = 0; w < W; ++w) blk[(F + w) * L + l] = real ? c[(g * N + j) * W + w] : T(0);
                }
            }
        }
    });
}

// The Gaussian blocks of one run of active tiles [j0, j1), CHUNK blocks at a
// time.  A block only partly inside the run (tiles narrower than a vector)
// is replaced by a copy with the outside lanes zeroed, and `keep` says which
// lanes' gradients count; padding lanes past N are zero in the packed data
// already and need neither.
template <typename T, int F, int W, int CHUNK>
struct Chunk {
    static constexpr int L = lanes<T>(), B = (F + W) * L;
    const T* block[CHUNK];
    i64 index[CHUNK];
    int partial[CHUNK];  // -1, or which of the copies below
    alignas(64) T copy[2][B];
    ivec<T> keep[2];
    int count = 0;

    // Fills the chunk starting at block b of the run; returns the next block.
    i64 fill(const T* packed, i64 N, i64 j0, i64 j1, i64 b, i64 b_end) {
        count = 0;
        int copies = 0;
        for (; b < b_end && count < CHUNK; ++b) {
            const i64 lo = std::max(j0, b * L) - b * L, hi = std::min(j1, (b + 1) * L) - b * L;
            const T* src = packed + b * B;
            index[count] = b;
            partial[count] = -1;
            if (lo > 0 || (hi < L && b * L + hi < N)) {
                T* dst = copy[copies];
                ivec<T> k;
                for (int l = 0; l < L; ++l) k[l] = l >= lo && l < hi ? -1 : 0;
                for (int r = 0; r < F + W; ++r)
                    for (int l = 0; l < L; ++l) dst[r * L + l] = l >= lo && l < hi ? src[r * L + l] : T(0);
                keep[copies] = k;
                partial[count] = copies++;
                src = dst;
            }
            block[count++] = src;  // only a run's first and last blocks can be partial: copies <= 2
        }
        return b;
    }
};

// Calls visit(j0, j1) for every run of consecutive active Gaussian tiles of a
// mask row (the whole [0, N) without a mask).
template <typename Visit>
static inline void for_each_run(const uint8_t* row, i64 nnt, i64 tn, i64 N, Visit visit) {
    if (!row) { if (N > 0) visit(i64(0), N); return; }
    for (i64 nt = 0; nt < nnt; ++nt) {
        if (!row[nt]) continue;
        const i64 j0 = nt * tn;
        while (nt + 1 < nnt && row[nt + 1]) ++nt;  // Morton order clusters them
        visit(j0, (nt + 1) * tn < N ? (nt + 1) * tn : N);
    }
}

// The sums of P points over a chunk's blocks, added to acc [P][W] (lanes).
template <typename T, int F, int W, int P>
static inline void forward_points(const T* const* blocks, int count, const T* __restrict x, vec<T>* __restrict acc) {
    constexpr int L = lanes<T>();
    typedef vec<T> V;
    V sum[P][W];
    for (int p = 0; p < P; ++p)
        for (int w = 0; w < W; ++w) sum[p][w] = acc[p * W + w];
    for (int k = 0; k < count; ++k) {
        const T* __restrict blk = blocks[k];
        V a[F], cw[W];
        for (int f = 0; f < F; ++f) a[f] = loadv(blk + f * L);
        for (int w = 0; w < W; ++w) cw[w] = loadv(blk + (F + w) * L);
        V e[P];  // the P chains side by side
        for (int p = 0; p < P; ++p) e[p] = exponent<T, F>(a, x + p * F);
        for (int p = 0; p < P; ++p) e[p] = exp_nonpositive(e[p]);
        for (int p = 0; p < P; ++p)
            for (int w = 0; w < W; ++w) sum[p][w] = fmadd(cw[w], e[p], sum[p][w]);
    }
    for (int p = 0; p < P; ++p)
        for (int w = 0; w < W; ++w) acc[p * W + w] = sum[p][w];
}

// Forward: one task per (mixture, point tile).  P points at a time against a
// chunk of Gaussian blocks (in L1); each point keeps W lane accumulators,
// summed across lanes once at the end of the tile.  out is [G, M, W].
template <typename T, int F, int W>
static void forward(i64 G, i64 M, i64 N, const T* X, const T* packed, T* out,
                    i64 tm, i64 tn, const uint8_t* mask, int threads) {
    constexpr int L = lanes<T>(), B = (F + W) * L;
    constexpr int P = 4;  // registers: F + W coefficient vectors, P * W accumulators, the exponential's constants
    constexpr int CHUNK = 32;
    typedef vec<T> V;
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn, nb = blocks_of<T>(N);
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        std::vector<V> acc_tile((size_t)(tm + P) * W);
        Chunk<T, F, W, CHUNK> chunk;
        for (i64 item = next++; item < G * nmt; item = next++) {
            const i64 g = item / nmt, pt = item % nmt;
            const T* gp = packed + g * nb * B;
            const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
            const i64 i0 = pt * tm, np = std::min(M, i0 + tm) - i0;
            std::fill(acc_tile.begin(), acc_tile.end(), V{});
            for_each_run(row, nnt, tn, N, [&](i64 j0, i64 j1) {
                const i64 b_end = (j1 + L - 1) / L;
                for (i64 b = j0 / L; b < b_end;) {
                    b = chunk.fill(gp, N, j0, j1, b, b_end);
                    for (i64 p0 = 0; p0 < np; p0 += P) {
                        T x[P][F];
                        for (int p = 0; p < P; ++p)  // zero-padded
                            for (int f = 0; f < F; ++f)
                                x[p][f] = p0 + p < np ? X[(g * M + i0 + p0 + p) * F + f] : T(0);
                        forward_points<T, F, W, P>(chunk.block, chunk.count, &x[0][0], &acc_tile[p0 * W]);
                    }
                }
            });
            for (i64 p = 0; p < np; ++p)
                for (int w = 0; w < W; ++w) out[(g * M + i0 + p) * W + w] = hsum<T>(acc_tile[p * W + w]);
        }
    });
}

// Backward pass 1 for one block and P points: s_p = e_p (g_p . c) into
// s[p * stride], and the block's lanes of dA = sum_p s_p x_p and dc = sum_p
// g_p e_p.  dA is summed after all P exponentials, from s in L1: with the
// coefficients, dA and the exponential's constants all live at once, the
// registers spill.
template <typename T, int F, int W, int P>
static inline void backward_block(const T* __restrict blk, const T* __restrict x, const T* __restrict gw,
                                  vec<T>* __restrict s, int stride, vec<T> (&da)[F], vec<T> (&dc)[W]) {
    constexpr int L = lanes<T>();
    typedef vec<T> V;
    V a[F], cw[W];
    for (int f = 0; f < F; ++f) a[f] = loadv(blk + f * L);
    for (int w = 0; w < W; ++w) { cw[w] = loadv(blk + (F + w) * L); dc[w] = V{}; }
    static_assert(P % 2 == 0, "points are taken in pairs");
    for (int p = 0; p < P; p += 2) {  // two independent chains side by side: latency, not throughput, limits one
        V e[2];
        for (int q = 0; q < 2; ++q) e[q] = exponent<T, F>(a, x + (p + q) * F);
        for (int q = 0; q < 2; ++q) e[q] = exp_nonpositive(e[q]);
        for (int q = 0; q < 2; ++q) {
            V sp;
            if (W == 2) {
                const V t0 = e[q] * gw[(p + q) * W], t1 = e[q] * gw[(p + q) * W + W - 1];
                dc[0] += t0;
                dc[W - 1] += t1;
                sp = fmadd(t1, cw[W - 1], t0 * cw[0]);
            } else {
                const V t = e[q] * gw[p + q];
                dc[0] += t;
                sp = t * cw[0];
            }
            s[(p + q) * stride] = sp;
        }
    }
    for (int f = 0; f < F; ++f) da[f] = V{};
    for (int p = 0; p < P; ++p) {
        const V sp = s[p * stride];
        for (int f = 0; f < F; ++f) da[f] = fmadd(sp, splat(x[p * F + f]), da[f]);
    }
}

// Backward pass 2 for two points: dx += sum over the chunk's blocks of s a (lanes).
template <typename T, int F, int CHUNK>
static inline void backward_dx(const T* const* blocks, int count, const vec<T>* __restrict s0,
                               const vec<T>* __restrict s1, vec<T>* __restrict dx0, vec<T>* __restrict dx1) {
    constexpr int L = lanes<T>();
    typedef vec<T> V;
    V acc0[F], acc1[F];
    for (int f = 0; f < F; ++f) { acc0[f] = dx0[f]; acc1[f] = dx1[f]; }
    for (int k = 0; k < count; ++k) {
        const T* __restrict blk = blocks[k];
        const V u = s0[k], v = s1[k];
        for (int f = 0; f < F; ++f) {
            const V a = loadv(blk + f * L);
            acc0[f] = fmadd(u, a, acc0[f]);
            acc1[f] = fmadd(v, a, acc1[f]);
        }
    }
    for (int f = 0; f < F; ++f) { dx0[f] = acc0[f]; dx1[f] = acc1[f]; }
}

// Backward: each exponential is computed once and feeds all three gradients.
// P points at a time against a chunk of Gaussian blocks.  Pass 1, per block:
// the exponent and s = e (g . c) for the P points, with dA and dc of the
// block's lanes summed over the points in registers (read-modified-written
// once per block for P points) and s kept in L1; pass 2: dX += s a from the
// same chunk, two points per load of a, in lane accumulators summed across
// lanes once per block of points.
// Work items (mixture, chunk of point tiles) are handed out dynamically (an
// atomic counter, as in the forward), so a thread slowed by other jobs on its
// core does not hold up the others.  Each item accumulates dA and dc in its
// own buffer; a mixture split into several chunks (only when there are fewer
// than 4 mixtures per thread) has them summed in chunk order at the end, so
// the result does not depend on which thread ran what.  go is [G, M, W],
// gA [G, N, F], gc [G, N, W].
template <typename T, int F, int W>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* packed, const T* go,
                     T* gX, T* gA, T* gc, i64 tm, i64 tn, const uint8_t* mask, int threads) {
    constexpr int L = lanes<T>(), B = (F + W) * L;
    constexpr int P = 8, CHUNK = 16;
    typedef vec<T> V;
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn, nb = blocks_of<T>(N);
    const i64 wanted = G >= 4 * (i64)threads || G == 0 ? 1 : (4 * (i64)threads + G - 1) / G;
    const i64 chunks_per_g = wanted < nmt ? wanted : (nmt > 0 ? nmt : 1);
    const i64 pts_per_chunk = ((nmt + chunks_per_g - 1) / chunks_per_g);
    const i64 items = G * chunks_per_g;
    const size_t grad_size = (size_t)nb * B;  // dA and dc of a mixture, packed layout
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    std::vector<T> partial(chunks_per_g > 1 ? (size_t)items * grad_size : 0);
    auto write_out = [&](i64 g, const T* d) {
        for (i64 j = 0; j < N; ++j) {
            const T* blk = d + (j / L) * B + j % L;
            if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] = blk[(F + w) * L];
            if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] = blk[f * L];
        }
    };
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        std::vector<T> own(chunks_per_g > 1 ? 0 : grad_size);
        alignas(64) V sbuf[P][CHUNK];
        alignas(64) V dx[P][F];
        Chunk<T, F, W, CHUNK> chunk;
        for (i64 w = next++; w < items; w = next++) {
            const i64 g = w / chunks_per_g, part = w % chunks_per_g;
            T* d = chunks_per_g > 1 ? partial.data() + (size_t)w * grad_size : own.data();
            std::fill(d, d + grad_size, T(0));
            const T* gp = packed + g * nb * B;
            const i64 pt0 = part * pts_per_chunk;
            const i64 pt1 = pt0 + pts_per_chunk < nmt ? pt0 + pts_per_chunk : nmt;
            for (i64 pt = pt0; pt < pt1; ++pt) {
                const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
                const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
                for (i64 ib = pt * tm; ib < i1; ib += P) {
                    const i64 np = i1 - ib < P ? i1 - ib : P;
                    // A block of P points (zero-padded; a padded point has no gradient).
                    T x[P][F], gw[P][W];
                    bool any = false;
                    for (int p = 0; p < P; ++p) {
                        const bool real = p < np;
                        for (int v = 0; v < W; ++v) {
                            gw[p][v] = real ? go[(g * M + ib + p) * W + v] : T(0);
                            any |= gw[p][v] != T(0);
                        }
                        for (int f = 0; f < F; ++f) {
                            x[p][f] = real ? X[(g * M + ib + p) * F + f] : T(0);
                            dx[p][f] = V{};
                        }
                    }
                    if (!any) continue;
                    for_each_run(row, nnt, tn, N, [&](i64 j0, i64 j1) {
                        const i64 b_end = (j1 + L - 1) / L;
                        for (i64 b = j0 / L; b < b_end;) {
                            b = chunk.fill(gp, N, j0, j1, b, b_end);
                            for (int k = 0; k < chunk.count; ++k) {  // pass 1
                                V da[F], dc[W];
                                backward_block<T, F, W, P>(chunk.block[k], &x[0][0], &gw[0][0], &sbuf[0][k], CHUNK, da, dc);
                                T* dst = d + chunk.index[k] * B;
                                const int copy = chunk.partial[k];
                                for (int f = 0; f < F; ++f) {
                                    const V add = copy < 0 ? da[f] : (chunk.keep[copy] ? da[f] : V{});
                                    storev(dst + f * L, loadv(dst + f * L) + add);
                                }
                                for (int v = 0; v < W; ++v) {
                                    const V add = copy < 0 ? dc[v] : (chunk.keep[copy] ? dc[v] : V{});
                                    storev(dst + (F + v) * L, loadv(dst + (F + v) * L) + add);
                                }
                            }
                            for (int p = 0; p < P; p += 2)  // pass 2
                                backward_dx<T, F, CHUNK>(chunk.block, chunk.count, sbuf[p], sbuf[p + 1], dx[p], dx[p + 1]);
                        }
                    });
                    if (gX) for (int p = 0; p < np; ++p)
                        for (int f = 0; f < F; ++f) gX[(g * M + ib + p) * F + f] = hsum<T>(dx[p][f]);
                }
            }
            if (chunks_per_g == 1) write_out(g, d);
        }
    });
    if (chunks_per_g > 1) {  // sum each mixture's chunks in chunk order
        std::atomic<i64> next_g(0);
        run_parallel(threads, [&](int, int) {
            std::vector<T> sum(grad_size);
            for (i64 g = next_g++; g < G; g = next_g++) {
                const T* first = partial.data() + (size_t)g * chunks_per_g * grad_size;
                std::copy(first, first + grad_size, sum.begin());
                for (i64 k = 1; k < chunks_per_g; ++k) {
                    const T* part = first + (size_t)k * grad_size;
                    for (size_t n = 0; n < grad_size; ++n) sum[n] += part[n];
                }
                write_out(g, sum.data());
            }
        });
    }
}

extern "C" int ekmv_vector_bytes() { return GMBENCH_VECTOR_BYTES; }

#define INSTANTIATE(T, F, W, SUFFIX)                                                         \
extern "C" void ekmv_pack_##SUFFIX(i64 G, i64 N, const T* A, const T* c, T* packed,      \
        int threads) {                                                                     \
    advise_huge_pages(packed, sizeof(T) * G * blocks_of<T>(N) * (F + W) * lanes<T>());     \
    pack<T, F, W>(G, N, A, c, packed, threads);                                            \
}                                                                                          \
extern "C" void ekmv_forward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* packed,  \
        T* out, i64 tm, i64 tn, const uint8_t* mask, int threads) {                        \
    forward<T, F, W>(G, M, N, X, packed, out, tm, tn, mask, threads);                      \
}                                                                                          \
extern "C" void ekmv_backward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* packed, \
        const T* go, T* gX, T* gA, T* gc, i64 tm, i64 tn, const uint8_t* mask,            \
        int threads) {                                                                     \
    advise_huge_pages(gX, sizeof(T) * G * M * F);                                          \
    advise_huge_pages(gA, sizeof(T) * G * N * F);                                          \
    backward<T, F, W>(G, M, N, X, packed, go, gX, gA, gc, tm, tn, mask, threads);          \
}
INSTANTIATE(float, 6, 1, f32_6_w1)
INSTANTIATE(float, 10, 1, f32_10_w1)
INSTANTIATE(double, 6, 1, f64_6_w1)
INSTANTIATE(double, 10, 1, f64_10_w1)
INSTANTIATE(float, 6, 2, f32_6_w2)
INSTANTIATE(float, 10, 2, f32_10_w2)
INSTANTIATE(double, 6, 2, f64_6_w2)
INSTANTIATE(double, 10, 2, f64_10_w2)
