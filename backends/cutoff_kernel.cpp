// Spatial cut-off of gmbench's torch backend on CPU: the plan (kd tiles of
// points, for each tile the list of Gaussians that may exceed the threshold)
// and the exponential-kernel mat-vec over those lists, forward and backward.
// Built and loaded by gmbench/backends/cutoff_native.py (through native.py);
// plain C ABI, no PyTorch headers.
//
// Plan, per mixture g (one task per mixture):
//  * tau = tol * max_j |c_j|; Gaussian j matters only inside the ellipsoid
//    (x - b)^T C^-1 (x - b) <= R^2 = 2 ln(|c_j| / tau) (none if |c_j| <= tau);
//  * points are ordered by a kd split (median along the widest axis of the
//    box, split sizes multiples of the tile) so every tile of tm consecutive
//    points is spatially compact; the splits form a tree of boxes;
//  * every group of 8 consecutive tiles, then every tile of the group (against
//    the group's survivors only) is tested against the Gaussians in one
//    vectorised loop; a Gaussian is listed for a tile whose box may meet its
//    ellipsoid: first the ellipsoid's axis-aligned box
//    (half-widths R sqrt(C_kk)), then, with y = L^-1 (x - b) / R (C = L L^T),
//    the box maps to a parallelepiped whose extent along each y axis is an
//    interval I_k; |y|^2 >= sum_k dist(0, I_k)^2, so a tile with that sum
//    above 1 holds no point within the ellipsoid.  Both tests are
//    conservative: every pair above tau is listed.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "fast_exp.h"  // exp_nonpositive: pasted in by native.py before compiling

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CUTOFF_COMPRESS_AVX512 1
#elif defined(__AVX2__)
#define CUTOFF_COMPRESS_AVX2 1
#endif

typedef int64_t i64;
typedef int32_t i32;

template <typename Body>
static void run_parallel(int threads, Body body) {
    // Plain threads, not OpenMP: PyTorch ships its own libgomp (see cpu_kernel.cpp).
    if (threads <= 1) { body(0, 1); return; }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) pool.emplace_back(body, t, threads);
    body(0, threads);
    for (auto& thread : pool) thread.join();
}

// ---------------------------------------------------------------- planning

template <int D>
struct Node {
    i64 begin, end;      // range of ordered points
    i64 left, right;     // children (-1: leaf)
    double lo[D], hi[D];
};

// A point with its number, so that the kd split moves contiguous records
// (nth_element through an index array missed the cache on every comparison).
template <int D>
struct Point {
    double x[D];
    i64 id;
};

// Reorders pts[0, n) so that the first k are the k smallest along axis (ties
// broken by position).  The selection runs on 8-byte keys (the coordinate as
// float, in an order-preserving integer form, above the record's offset: all
// distinct) with branch-free Lomuto partitions, then the records are permuted
// once: std::nth_element on the records mispredicted about every other
// comparison of these random coordinates (perf: a third of the plan).  The
// float key only shapes the split; the tiles' boxes use the exact points.
template <int D>
static void split_at(Point<D>* pts, i64 n, i64 k, int axis) {
    static thread_local std::vector<uint64_t> keys;
    static thread_local std::vector<Point<D>> moved;
    keys.resize(n);
    uint64_t* a = keys.data();
    for (i64 i = 0; i < n; ++i) {
        uint32_t bits;
        const float v = (float)pts[i].x[axis];
        std::memcpy(&bits, &v, sizeof(bits));
        bits ^= (uint32_t)((int32_t)bits >> 31) | 0x80000000u;  // float order as unsigned order
        a[i] = (uint64_t)bits << 32 | (uint64_t)i;
    }
    i64 lo = 0, hi = n;
    while (hi - lo > 16) {
        const uint64_t u = a[lo], v = a[lo + (hi - lo) / 2], w = a[hi - 1];
        const uint64_t pivot = std::max(std::min(u, v), std::min(std::max(u, v), w));  // median of three
        i64 lt = lo;  // [lo, lt) < pivot; the keys are distinct, so [lt] becomes the pivot
        for (i64 i = lo; i < hi; ++i) {
            const uint64_t t = a[i];
            const bool less = t < pivot;
            a[i] = a[lt];
            a[lt] = t;
            lt += less;
        }
        // The pivot is in [lt, hi); move it to lt, so that [lo, lt) < a[lt] <= [lt + 1, hi).
        for (i64 i = lt; i < hi; ++i)
            if (a[i] == pivot) { std::swap(a[i], a[lt]); break; }
        if (k < lt) hi = lt;
        else if (k == lt) break;
        else lo = lt + 1;
    }
    if (hi - lo <= 16) std::sort(a + lo, a + hi);
    moved.resize(n);
    for (i64 i = 0; i < n; ++i) moved[i] = pts[a[i] & 0xFFFFFFFFu];
    std::copy(moved.begin(), moved.end(), pts);
}

// Builds the tree over pts[begin, end), reordering the range.  Leaves hold at
// most tm points; split sizes are multiples of tm, so only the last tile of a
// mixture can be partial and tile t holds points [t tm, (t + 1) tm).
template <int D>
static i64 build(std::vector<Node<D>>& nodes, Point<D>* pts, i64 begin, i64 end, i64 tm) {
    Node<D> node;
    node.begin = begin; node.end = end; node.left = node.right = -1;
    for (int d = 0; d < D; ++d) { node.lo[d] = INFINITY; node.hi[d] = -INFINITY; }
    for (i64 k = begin; k < end; ++k)
        for (int d = 0; d < D; ++d) {
            node.lo[d] = std::min(node.lo[d], pts[k].x[d]);
            node.hi[d] = std::max(node.hi[d], pts[k].x[d]);
        }
    const i64 id = (i64)nodes.size();
    nodes.push_back(node);
    const i64 n = end - begin;
    if (n <= tm) return id;
    const i64 tiles = (n + tm - 1) / tm;
    const i64 mid = begin + (tiles / 2) * tm;
    int axis = 0;
    for (int d = 1; d < D; ++d)
        if (node.hi[d] - node.lo[d] > node.hi[axis] - node.lo[axis]) axis = d;
    split_at<D>(pts + begin, end - begin, mid - begin, axis);
    const i64 left = build<D>(nodes, pts, begin, mid, tm);
    const i64 right = build<D>(nodes, pts, mid, end, tm);
    nodes[id].left = left;
    nodes[id].right = right;
    return id;
}

template <int D>
struct Influence {
    double b[D], half[D];
    double w[D][D];   // y = w (x - b), |y| <= 1 inside the cut-off ellipsoid (lower triangular)
};

// False when the Gaussian is below tau everywhere (or its covariance is not
// positive definite, which the evaluation could not handle either: listed everywhere).
template <int D>
static bool influence(const double* b, const double* C, double peak, double tau, Influence<D>& out) {
    if (!(peak > tau)) return false;
    const double r = std::sqrt(2.0 * std::log(peak / tau));
    double L[D][D] = {};
    bool ok = true;
    for (int i = 0; i < D; ++i)
        for (int j = 0; j <= i; ++j) {
            double s = C[i * D + j];
            for (int k = 0; k < j; ++k) s -= L[i][k] * L[j][k];
            if (i == j) { ok = ok && s > 0; L[i][i] = std::sqrt(s > 0 ? s : 0); }
            else L[i][j] = L[j][j] > 0 ? s / L[j][j] : 0;
        }
    for (int d = 0; d < D; ++d) {
        out.b[d] = b[d];
        out.half[d] = r * std::sqrt(std::max(C[d * D + d], 0.0));
    }
    // w = L^-1 / r (forward substitution on the identity).
    double inv[D][D] = {};
    for (int c = 0; c < D; ++c)
        for (int i = 0; i < D; ++i) {
            double s = i == c ? 1.0 : 0.0;
            for (int k = 0; k < i; ++k) s -= L[i][k] * inv[k][c];
            inv[i][c] = L[i][i] > 0 ? s / L[i][i] : 0;
        }
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j) out.w[i][j] = ok && std::isfinite(inv[i][j]) ? inv[i][j] / r : 0.0;
    if (!ok) for (int d = 0; d < D; ++d) out.half[d] = INFINITY;  // no bound: keep every tile
    return true;
}

// Slack after every array compress() writes into: it stores whole vectors.
static const i64 COMPRESS_SLACK = 16;

// dst = the src[k] (4-byte values) with keep[k] set, k < n, in order; returns
// their number.  With AVX-512 16 at a time (vpcompressd, one vector store, so
// dst needs COMPRESS_SLACK entries beyond the result); else branch-free scalar
// (whether a Gaussian survives is unpredictable).
template <typename V>
static i64 compress(const V* __restrict src, const uint8_t* __restrict keep, i64 n, V* __restrict dst) {
    static_assert(sizeof(V) == 4, "4-byte values");
    i64 count = 0;
#ifdef CUTOFF_COMPRESS_AVX512
    for (i64 k = 0; k < n; k += 16) {
        const __mmask16 valid = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
        const __m128i flags = _mm_maskz_loadu_epi8(valid, keep + k);
        const __mmask16 take = _mm_test_epi8_mask(flags, flags);
        const __m512i values = _mm512_maskz_loadu_epi32(valid, src + k);
        _mm512_storeu_si512(dst + count, _mm512_maskz_compress_epi32(take, values));
        count += __builtin_popcount((unsigned)take);
    }
#elif defined(CUTOFF_COMPRESS_AVX2)
    // 8 at a time: a permutation from a table of the 256 keep patterns (vpermd), one vector store.
    struct Table {
        alignas(32) int32_t perm[256][8];
        Table() {
            for (int m = 0; m < 256; ++m) {
                int c = 0;
                for (int b = 0; b < 8; ++b) if (m >> b & 1) perm[m][c++] = b;
                for (; c < 8; ++c) perm[m][c] = 0;
            }
        }
    };
    static const Table table;
    for (i64 k = 0; k < n; k += 8) {
        const i64 left = n - k < 8 ? n - k : 8;
        uint64_t flags = 0;  // keep has no slack: copy only its entries
        std::memcpy(&flags, keep + k, (size_t)left);
        const __m128i bytes = _mm_cvtsi64_si128((long long)flags);
        const unsigned take = ~(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128())) & 0xFFu;
        // src has COMPRESS_SLACK entries beyond n (Influences::resize, the lists' ids): a whole load is in bounds.
        const __m256i values = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.perm[take]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + count), _mm256_permutevar8x32_epi32(values, perm));
        count += __builtin_popcount(take);
    }
#else
    for (i64 k = 0; k < n; ++k) { dst[count] = src[k]; count += keep[k]; }
#endif
    return count;
}

// Float bounds of a double: at most / at least it.  Moved away by more than
// the half ulp of rounding to nearest (2^-24 relative; 1e-37 absolute for
// the smallest values), without branches or libm calls.
static inline float float_below(double v) { return (float)(v - (std::fabs(v) * (1.0 / (1 << 22)) + 1e-37)); }
static inline float float_above(double v) { return (float)(v + (std::fabs(v) * (1.0 / (1 << 22)) + 1e-37)); }

// Relative slack of the float tests: covers the rounding of the centre,
// difference, dot products and sums (about (D + 4) 2^-24 relative each) with
// a factor of more than 10 to spare.
static const double ROUNDING = 1.0 / (1 << 19);

// The influences of one mixture's Gaussians in float, one array per field, so
// that the test of a box against many Gaussians runs in wide vectors (twice
// the lanes and half the memory traffic of double, which bound the plan).
// Coordinates are relative to the mixture's origin o (the centre of its
// points' box), so their float rounding is relative to the mixture's extent.
// Still conservative: the axis-aligned boxes are rounded outwards, and each
// whitened distance is reduced by err_a = ROUNDING sum_d |w_ad| (P_d + |b_d|)
// (P_d = max |x_d - o_d| over the points), a bound on the float error of
// w_a . (c - b) and of the extent.
template <int D>
struct Influences {
    static const int WN = D * (D + 1) / 2;  // w is lower triangular: w[a][d], d <= a
    std::vector<float> lo[D], hi[D], b[D], err[D], w[WN];
    std::vector<i32> id;
    i64 size = 0;
    void resize(i64 n) {
        n += COMPRESS_SLACK;
        for (int d = 0; d < D; ++d) { lo[d].resize(n); hi[d].resize(n); b[d].resize(n); err[d].resize(n); }
        for (int e = 0; e < WN; ++e) w[e].resize(n);
        id.resize(n);
    }
    void set(i64 k, const Influence<D>& g, i32 j, const double* origin, const double* extent) {
        double rel[D];
        for (int d = 0; d < D; ++d) {
            rel[d] = g.b[d] - origin[d];
            lo[d][k] = float_below(rel[d] - g.half[d]);
            hi[d][k] = float_above(rel[d] + g.half[d]);
            b[d][k] = (float)rel[d];
        }
        int e = 0;
        for (int a = 0; a < D; ++a) {
            double bound = 0;
            for (int d = 0; d <= a; ++d, ++e) {
                w[e][k] = (float)g.w[a][d];
                bound += std::fabs(g.w[a][d]) * (extent[d] + std::fabs(rel[d]));
            }
            err[a][k] = float_above(ROUNDING * bound);
        }
        id[k] = j;
    }
    // This = the entries k < n of from with keep[k] set, one field at a time; returns their number.
    i64 select(const Influences& from, const uint8_t* keep, i64 n) {
        for (int d = 0; d < D; ++d) {
            compress(from.lo[d].data(), keep, n, lo[d].data());
            compress(from.hi[d].data(), keep, n, hi[d].data());
            compress(from.b[d].data(), keep, n, b[d].data());
            compress(from.err[d].data(), keep, n, err[d].data());
        }
        for (int e = 0; e < WN; ++e) compress(from.w[e].data(), keep, n, w[e].data());
        size = compress(from.id.data(), keep, n, id.data());
        return size;
    }
};

// keep[k] = 1 iff the box [lo, hi] (relative to the mixture's origin) may
// hold a point where Gaussian k exceeds tau: its axis-aligned box meets the
// box, and the whitened lower bound sum_a dist(0, I_a)^2 is at most 1.
template <int D>
static void test_box(const Influences<D>& s, i64 count, const double* lo, const double* hi, uint8_t* __restrict keep) {
    float c[D], h[D], l[D], u[D];
    for (int d = 0; d < D; ++d) {
        l[d] = float_below(lo[d]); u[d] = float_above(hi[d]);
        c[d] = (float)(0.5 * (lo[d] + hi[d]));
        h[d] = float_above(0.5 * (hi[d] - lo[d]));
    }
    // Loop-invariant local pointers: keep (a char type) may alias anything, and the
    // vectors' data pointers would otherwise be reloaded in every iteration.
    const float* __restrict blo[D];
    const float* __restrict bhi[D];
    const float* __restrict b[D];
    const float* __restrict err[D];
    const float* __restrict w[Influences<D>::WN];
    for (int d = 0; d < D; ++d) { blo[d] = s.lo[d].data(); bhi[d] = s.hi[d].data(); b[d] = s.b[d].data(); err[d] = s.err[d].data(); }
    for (int e = 0; e < Influences<D>::WN; ++e) w[e] = s.w[e].data();
    #pragma omp simd
    for (i64 k = 0; k < count; ++k) {
        int ok = 1;
        float rel[D];
        for (int d = 0; d < D; ++d) {
            ok &= (l[d] <= bhi[d][k]) & (u[d] >= blo[d][k]);
            rel[d] = c[d] - b[d][k];
        }
        float near = 0;
        #pragma GCC unroll 4
        for (int a = 0; a < D; ++a) {
            float centre = 0, extent = 0;
            #pragma GCC unroll 4
            for (int d = 0; d < D; ++d) {
                if (d > a) continue;  // resolved at compile time once unrolled
                const float wk = w[a * (a + 1) / 2 + d][k];
                centre += wk * rel[d];
                extent += std::fabs(wk) * h[d];
            }
            float dist = std::fabs(centre) - extent - err[a][k];
            dist = dist > 0.0f ? dist : 0.0f;  // not std::fmax: a libm call that blocks vectorisation
            near += dist * dist;
        }
        keep[k] = (uint8_t)(ok & !(near > 1.0f + 1e-5f));  // NaN (an overflowed bound): kept
    }
}

// The lists of one mixture, tile-major (CSR), kept until Python has sized the output.
struct MixturePlan {
    std::vector<i32> index;
};
struct Plan {
    std::vector<MixturePlan> mixtures;
};

// Tiles per coarse tile: each coarse tile (COARSE consecutive tiles in kd
// order) is tested against every Gaussian, each tile only against the
// coarse tile's survivors.
static const i64 COARSE = 8;

template <int D>
static void box_of(const Point<D>* pts, i64 begin, i64 end, double* lo, double* hi) {
    for (int d = 0; d < D; ++d) { lo[d] = INFINITY; hi[d] = -INFINITY; }
    for (i64 k = begin; k < end; ++k)
        for (int d = 0; d < D; ++d) {
            lo[d] = std::min(lo[d], pts[k].x[d]);
            hi[d] = std::max(hi[d], pts[k].x[d]);
        }
}


// Orders points (order [G, M]), counts the listed Gaussians of every tile
// (counts [G * Tm]) and keeps the lists; cutoff_plan_take copies them out.
template <int D>
static Plan* plan(i64 G, i64 M, i64 N, const double* points, const double* centres, const double* covariances,
                  const double* peaks, double tol, i64 tm, i64* order, i64* counts, int threads) {
    const i64 tiles = (M + tm - 1) / tm;
    Plan* result = new Plan();
    result->mixtures.resize(G);
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        std::vector<Node<D>> nodes;
        std::vector<Point<D>> pts;
        Influences<D> all, candidates;
        std::vector<uint8_t> keep;
        for (i64 g = next++; g < G; g = next++) {
            const double* x = points + g * M * D;
            i64* ord = order + g * M;
            i64* cnt = counts + g * tiles;
            std::fill(cnt, cnt + tiles, (i64)0);
            if (M == 0) continue;
            pts.resize(M);
            for (i64 i = 0; i < M; ++i) {
                for (int d = 0; d < D; ++d) pts[i].x[d] = x[i * D + d];
                pts[i].id = i;
            }
            nodes.clear();
            build<D>(nodes, pts.data(), 0, M, tm);
            for (i64 i = 0; i < M; ++i) ord[i] = pts[i].id;
            // Origin and extent of the float tests; the points and boxes relative to it.
            double origin[D], extent[D];
            for (int d = 0; d < D; ++d) {
                origin[d] = 0.5 * (nodes[0].lo[d] + nodes[0].hi[d]);
                extent[d] = 0.5 * (nodes[0].hi[d] - nodes[0].lo[d]);
            }
            for (i64 i = 0; i < M; ++i)
                for (int d = 0; d < D; ++d) pts[i].x[d] -= origin[d];
            const double* pk = peaks + g * N;
            double top = 0;
            for (i64 j = 0; j < N; ++j) top = std::max(top, std::fabs(pk[j]));
            const double tau = tol * top;
            all.resize(N);
            i64 valid = 0;
            for (i64 j = 0; j < N; ++j) {
                Influence<D> inf;
                if (influence<D>(centres + (g * N + j) * D, covariances + (g * N + j) * D * D, std::fabs(pk[j]), tau, inf))
                    all.set(valid++, inf, (i32)j, origin, extent);
            }
            if ((i64)keep.size() < valid) keep.resize(valid);
            candidates.resize(valid);
            std::vector<i32>& index = result->mixtures[g].index;
            index.clear();
            for (i64 ct = 0; ct < tiles; ct += COARSE) {
                const i64 ct1 = std::min(ct + COARSE, tiles);
                double lo[D], hi[D];
                box_of<D>(pts.data(), ct * tm, std::min(ct1 * tm, M), lo, hi);
                test_box<D>(all, valid, lo, hi, keep.data());
                const i64 survivors = candidates.select(all, keep.data(), valid);
                for (i64 t = ct; t < ct1; ++t) {
                    box_of<D>(pts.data(), t * tm, std::min((t + 1) * tm, M), lo, hi);
                    test_box<D>(candidates, survivors, lo, hi, keep.data());
                    const size_t before = index.size();
                    index.resize(before + survivors + COMPRESS_SLACK);
                    const i64 listed = compress(candidates.id.data(), keep.data(), survivors, index.data() + before);
                    index.resize(before + listed);
                    cnt[t] = listed;
                }
            }
        }
    });
    return result;
}

// ---------------------------------------------------------------- evaluation

// A 64-byte aligned scratch array (std::vector only guarantees 16 bytes).
template <typename T>
struct Aligned {
    std::vector<T> storage;
    T* data = nullptr;
    i64 capacity = 0;
    void reserve(i64 n) {
        if (n <= capacity) return;
        storage.assign((size_t)n + 64 / sizeof(T), T(0));
        const uintptr_t raw = reinterpret_cast<uintptr_t>(storage.data());
        data = reinterpret_cast<T*>((raw + 63) & ~(uintptr_t)63);
        capacity = n;
    }
};

// The listed Gaussians of one tile, gathered contiguous per feature
// (a[f * S + k]) from the transposed coefficients At [F, N], c [W, N]: the
// inner loop is a vector gather with contiguous stores.  Rows are padded to
// S, a multiple of 64 bytes, with copies of the last listed Gaussian's
// coefficients and zero peaks: the evaluation loops run over whole aligned
// vectors (no remainder loop) and a padding entry contributes exactly 0 to
// every sum (its exponential is that of a listed pair, so it is as finite).
template <typename T, int F, int W>
struct Gathered {
    static const i64 LANES = 64 / sizeof(T);
    Aligned<T> a, c;
    i64 L = 0, S = 0;
    void gather(const T* At, const T* C, i64 N, const i32* __restrict idx, i64 count) {
        L = count;
        S = (L + LANES - 1) / LANES * LANES;
        a.reserve(F * S); c.reserve(W * S);
        for (int f = 0; f < F; ++f) {
            const T* __restrict src = At + f * N;
            T* __restrict dst = a.data + f * S;
            #pragma omp simd
            for (i64 k = 0; k < L; ++k) dst[k] = src[idx[k]];
            for (i64 k = L; k < S; ++k) dst[k] = dst[L - 1];
        }
        for (int w = 0; w < W; ++w) {
            const T* __restrict src = C + w * N;
            T* __restrict dst = c.data + w * S;
            #pragma omp simd
            for (i64 k = 0; k < L; ++k) dst[k] = src[idx[k]];
            for (i64 k = L; k < S; ++k) dst[k] = T(0);
        }
    }
};

// Row of the i-th point (in tile order) of mixture g: X and out stay in the
// caller's order, so no permuted copies are made (forward or backward).
static inline i64 row_of(const i64* order, i64 g, i64 M, i64 i) { return order ? order[g * M + i] : i; }

// X [G, M, F], At [G, F, N], c [G, W, N] (transposed), out [G, M, W];
// offsets [G * Tm + 1] and index (Gaussian numbers within the mixture) per
// tile of the plan's point order (order [G, M], null: the identity).
// (Blocking 4 points per loaded Gaussian did not pay: the loop is bound by
// the exponential, not by loads.)
template <typename T, int F, int W>
static void forward(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c, T* out, i64 tm, const i64* offsets,
                    const i32* index, const i64* order, int threads) {
    const i64 tiles = (M + tm - 1) / tm;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        Gathered<T, F, W> s;
        for (i64 item = next++; item < G * tiles; item = next++) {
            const i64 g = item / tiles, pt = item % tiles;
            s.gather(A + g * N * F, c + g * N * W, N, index + offsets[item], offsets[item + 1] - offsets[item]);
            const T* __restrict a = s.a.data;
            const T* __restrict c0 = s.c.data;
            const T* __restrict c1 = c0 + (W - 1) * s.S;
            const i64 S = s.S;
            const i64 i1 = std::min((pt + 1) * tm, M);
            for (i64 i = pt * tm; i < i1; ++i) {
                const i64 row = row_of(order, g, M, i);
                T x[F];
                for (int f = 0; f < F; ++f) x[f] = X[(g * M + row) * F + f];
                T acc0 = 0, acc1 = 0;
                #pragma omp simd reduction(+ : acc0, acc1)
                for (i64 k = 0; k < S; ++k) {
                    T q = 0;
                    for (int f = 0; f < F; ++f) q += x[f] * a[f * S + k];
                    q = q > T(0) ? T(0) : q;  // NaN stays NaN
                    const T e = exp_nonpositive(q);
                    acc0 += c0[k] * e;
                    if (W == 2) acc1 += c1[k] * e;
                }
                out[(g * M + row) * W] = acc0;
                if (W == 2) out[(g * M + row) * W + 1] = acc1;
            }
        }
    });
}

// Float forward vectorised over the points of a tile instead of over its
// Gaussians: the TILE (16) points are one vector with AVX-512, two without
// (GCC vector extensions; the loop-vectoriser left a 16-iteration loop
// scalar), each listed Gaussian's
// coefficients are one row of Rows [G, N, ROW] (F exponent coefficients, then
// the W peaks, zero-padded) read by address and broadcast.  Nothing is
// gathered and nothing is reduced horizontally: about 2.5x faster than the
// gathered loop above, whose gathers of F + W coefficients per listed
// Gaussian and tile cost as much as the exponentials.  Each point's sum runs
// over its tile's list in order.
static const int TILE = 16;
static const int ROW = 16;
// Lanes per vector: the whole tile with AVX-512 (32 registers of 16 floats).
// With AVX2 only (16 registers of 8) a 16-lane vector takes two registers, and
// the F = 10 point features alone would take 20: the loop spilled and ran 2x
// slower relative to the exact kernel (znver3, 2026-12-02), so each tile is
// swept in halves of 8 points (every listed row read twice, from L1).
#ifdef __AVX512F__
static const int LANES = 16;
#else
static const int LANES = 8;
#endif
static_assert(TILE % LANES == 0, "a tile is whole vectors");
typedef float lanes_f __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t lanes_i __attribute__((vector_size(LANES * sizeof(int32_t))));

// exp_nonpositive (fast_exp.h) on a vector: the same reduction and polynomial;
// n is rounded by truncating x log2(e) - 1/2 (x <= 0), ties downwards.
static inline lanes_f exp_nonpositive(lanes_f x) {
    const lanes_f zero = {};
    x = x < -87.0f ? zero - 87.0f : x;
    const lanes_i ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, lanes_i);
    const lanes_f n = __builtin_convertvector(ni, lanes_f);
    const lanes_f r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    lanes_f p = zero + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    return p * (lanes_f)((ni + 127) << 23);
}

template <int F, int W>
static void forward_rows(i64 G, i64 M, i64 N, const float* X, const float* Rows, float* out, const i64* offsets,
                         const i32* index, const i64* order, int threads) {
    static_assert(F + W <= ROW, "coefficient row too short");
    const i64 tiles = (M + TILE - 1) / TILE;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        for (i64 item = next++; item < G * tiles; item = next++) {
            const i64 g = item / tiles, pt = item % tiles;
            const i64 i0 = pt * TILE, np = std::min((i64)TILE, M - i0);
            const i32* idx = index + offsets[item];
            const i64 L = offsets[item + 1] - offsets[item];
            const float* base = Rows + g * N * ROW;
            for (i64 h = 0; h < np; h += LANES) {
                const int nh = (int)std::min((i64)LANES, np - h);
                i64 rows[LANES];
                lanes_f x[F];  // padding lanes: features 0 (exponential 1), dropped
                for (int f = 0; f < F; ++f) x[f] = lanes_f{};
                for (int p = 0; p < nh; ++p) {
                    rows[p] = row_of(order, g, M, i0 + h + p);
                    for (int f = 0; f < F; ++f) x[f][p] = X[(g * M + rows[p]) * F + f];
                }
                lanes_f acc0 = {}, acc1 = {};
                for (i64 k = 0; k < L; ++k) {
                    const float* __restrict r = base + (i64)idx[k] * ROW;
                    lanes_f q = x[0] * r[0];
                    for (int f = 1; f < F; ++f) q += x[f] * r[f];
                    q = q > 0.0f ? lanes_f{} : q;  // NaN stays NaN
                    const lanes_f e = exp_nonpositive(q);
                    acc0 += r[F] * e;
                    if (W == 2) acc1 += r[F + 1] * e;
                }
                for (int p = 0; p < nh; ++p) {
                    out[(g * M + rows[p]) * W] = acc0[p];
                    if (W == 2) out[(g * M + rows[p]) * W + 1] = acc1[p];
                }
            }
        }
    });
}

// One chunk of the pair-list backward, shared by the gathering (any T) and the row-reading
// (float32) backward: the block's P points x against the len listed Gaussians whose coefficient
// rows (stride S) start at ac (F rows) and c0c / c1c (the weight rows). Each exponential is
// computed once for the three gradients: dx[p] += s_pj a_j, dc_j += sum_p g_p e_pj (per weight
// set), da_j += sum_p s_pj x_p, with s_pj = e_pj (g_p . c_j).
template <typename T, int F, int W, int P, int JC>
static inline __attribute__((always_inline)) void backward_chunk(
        const T* __restrict ac, const T* __restrict c0c, const T* __restrict c1c, i64 S, i64 len,
        const T (&x)[P][F], const T (&g0)[P], const T (&g1)[P], T (&dx)[P][F],
        T (&sbuf)[P][JC], T (&ebuf)[W == 2 ? P : 1][JC],
        T* __restrict da, T* __restrict dc0, T* __restrict dc1) {
    for (int p = 0; p < P; ++p) {
        T* __restrict sp = sbuf[p];
        T* __restrict ep = ebuf[W == 2 ? p : 0];
        const T gp0 = g0[p], gp1 = g1[p];
        T xp[F], dxp[F];
        for (int f = 0; f < F; ++f) { xp[f] = x[p][f]; dxp[f] = 0; }
        #pragma omp simd reduction(+ : dxp[:F])
        for (i64 j = 0; j < len; ++j) {
            T q = 0;
            for (int f = 0; f < F; ++f) q += xp[f] * ac[f * S + j];
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
            for (int f = 0; f < F; ++f) dxp[f] += sj * ac[f * S + j];
        }
        for (int f = 0; f < F; ++f) dx[p][f] += dxp[f];
    }
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
        T xf[P];
        for (int p = 0; p < P; ++p) xf[p] = x[p][f];
        T* __restrict daf = da + f * S;
        #pragma omp simd
        for (i64 j = 0; j < len; ++j) {
            T acc = 0;
            for (int p = 0; p < P; ++p) acc += sbuf[p][j] * xf[p];
            daf[j] += W == 2 ? acc : acc * c0c[j];
        }
    }
}

// Backward: each exponential once for all three gradients, laid out as the
// exact kernel's backward (cpu_kernel.cpp) within each tile: the tile's P
// points against chunks of JC listed Gaussians, the per-pair values of the
// block (s = g . c_j e and e) kept in L1, dX accumulated from the same loads
// as the exponent; then dA and dc of the tile's Gaussians from the block, one
// read-modify-write per Gaussian for all P points, and one scatter per tile
// into the mixture's sums.  Work items (tiles) are split contiguously over the
// threads; each thread accumulates dA and dc of its current mixture privately
// (one row [F + W] per Gaussian, padded to 16 values: the scatter touches one
// cache line per listed Gaussian, not F + W) and adds them to the output
// under a lock when it moves on.
// At [G, F, N] and c [G, W, N] as in forward; go [G, M, W], gX [G, M, F],
// gA [G, N, F], gc [G, N, W], all in the caller's point order.
template <typename T, int F, int W, int P = 16, int JC = 1024 / sizeof(T)>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c, const T* go, T* gX, T* gA, T* gc,
                     i64 tm, const i64* offsets, const i32* index, const i64* order, int threads) {
    const i64 tiles = (M + tm - 1) / tm;
    const i64 items = G * tiles;
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    if (gA) std::memset(gA, 0, sizeof(T) * G * N * F);
    if (gc) std::memset(gc, 0, sizeof(T) * G * N * W);
    std::mutex flush_lock;
    run_parallel(threads, [&](int tid, int nth) {
        const i64 w0 = items * tid / nth, w1 = items * (tid + 1) / nth;
        static const int R = 16;  // row stride of the private sums, >= F + W
        static_assert(F + W <= R, "row of the private sums too short");
        std::vector<T> sums((size_t)R * N);
        Aligned<T> la, lc;
        alignas(64) T sbuf[P][JC];
        alignas(64) T ebuf[W == 2 ? P : 1][JC];
        Gathered<T, F, W> s;
        i64 current = -1;
        auto flush = [&](i64 g) {
            if (g < 0) return;
            std::lock_guard<std::mutex> guard(flush_lock);
            for (i64 j = 0; j < N; ++j) {
                if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] += sums[j * R + f];
                if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] += sums[j * R + F + w];
            }
        };
        for (i64 item = w0; item < w1; ++item) {
            const i64 g = item / tiles, pt = item % tiles;
            if (g != current) {
                flush(current);
                std::fill(sums.begin(), sums.end(), T(0));
                current = g;
            }
            const i32* idx = index + offsets[item];
            s.gather(A + g * N * F, c + g * N * W, N, idx, offsets[item + 1] - offsets[item]);
            const i64 L = s.L, S = s.S;
            la.reserve(F * S); lc.reserve(W * S);
            std::fill(la.data, la.data + F * S, T(0));
            std::fill(lc.data, lc.data + W * S, T(0));
            const T* a = s.a.data;
            const T* c0 = s.c.data;
            const T* c1 = c0 + (W - 1) * S;
            const i64 i1 = std::min((pt + 1) * tm, M);
            for (i64 ib = pt * tm; ib < i1; ib += P) {
                const i64 np = std::min((i64)P, i1 - ib);
                // A block of P points (zero-padded; a padded point has no gradient).
                i64 rows[P];
                T x[P][F], dx[P][F], g0[P], g1[P];
                bool any = false;
                for (int p = 0; p < P; ++p) {
                    const bool real = p < np;
                    rows[p] = real ? row_of(order, g, M, ib + p) : 0;
                    g0[p] = real ? go[(g * M + rows[p]) * W] : T(0);
                    g1[p] = real && W == 2 ? go[(g * M + rows[p]) * W + 1] : T(0);
                    any |= g0[p] != T(0) || g1[p] != T(0);
                    for (int f = 0; f < F; ++f) { x[p][f] = real ? X[(g * M + rows[p]) * F + f] : T(0); dx[p][f] = 0; }
                }
                if (!any) continue;
                for (i64 jc = 0; jc < S; jc += JC) {
                    const i64 len = std::min((i64)JC, S - jc);
                    const T* __restrict ac = a + jc;
                    const T* __restrict c0c = c0 + jc;
                    const T* __restrict c1c = c1 + jc;
                    backward_chunk<T, F, W, P, JC>(ac, c0c, c1c, S, len, x, g0, g1, dx, sbuf, ebuf, la.data + jc,
                                                   lc.data + jc, lc.data + (W - 1) * S + jc);
                }
                if (gX) for (int p = 0; p < np; ++p)
                    for (int f = 0; f < F; ++f) gX[(g * M + rows[p]) * F + f] = dx[p][f];
            }
            for (i64 k = 0; k < L; ++k) {  // the padding entries (k >= L) are dropped
                T* __restrict row = sums.data() + idx[k] * R;
                for (int f = 0; f < F; ++f) row[f] += la.data[f * S + k];
                for (int w = 0; w < W; ++w) row[F + w] += lc.data[w * S + k];
            }
        }
        flush(current);
    });
}

// A 16 x 16 float transpose between rows addressed by pointer: out[j][i] =
// in[i][j] (each pointer addresses 16 floats; unaligned).  The float
// backward gathers each tile's Gaussians from coefficient rows and scatters
// their gradient rows with it: one cache line read or written per listed
// Gaussian, instead of a vector gather (or scalar stores) per feature that
// touched a line per feature and Gaussian (the gathers and the scalar
// scatter were 2/3 of the backward's time, perf, AVX-512 EPYC, 2026-12-02).
static inline void transpose16(const float* const in[16], float* const out[16]) {
#if defined(__AVX512F__)
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in[i]);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // r[4 b + c] now holds, in each 128-bit lane l, column 4 l + c of rows 4 b .. 4 b + 3.
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out[i], r[i]);  // r[i] = column i
#elif defined(__AVX2__)
    // Four 8 x 8 transposes.
    for (int bi = 0; bi < 16; bi += 8)
        for (int bj = 0; bj < 16; bj += 8) {
            __m256 r[8], t[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in[bi + i] + bj);
            for (int i = 0; i < 8; i += 2) {
                t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int i = 0; i < 4; ++i) {
                _mm256_storeu_ps(out[bj + i] + bi, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                _mm256_storeu_ps(out[bj + i + 4] + bi, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
            }
        }
#else
    float block[16][16];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) block[j][i] = in[i][j];
    for (int j = 0; j < 16; ++j) std::memcpy(out[j], block[j], sizeof(block[j]));
#endif
}

// The float backward of forward_rows: the arithmetic of backward above, with
// the tile's listed Gaussians read from the coefficient rows Rows [G, N, ROW]
// (transposed 16 at a time into per-feature arrays, rows F .. F + W - 1 the
// peaks) and its gradient rows (dA, then dc; one 16-value row of the private
// sums per Gaussian) transposed back and added one row per Gaussian.
// Padding entries (k >= L) copy the last listed Gaussian with zero peaks, as
// in Gathered; their gradients are dropped.
template <int F, int W, int JC = 256>
static void backward_rows(i64 G, i64 M, i64 N, const float* X, const float* Rows, const float* go, float* gX,
                          float* gA, float* gc, const i64* offsets, const i32* index, const i64* order,
                          int threads) {
    static const int P = TILE, K = F + W;
    static_assert(K <= ROW && ROW == 16, "a coefficient row is one 16 x 16 transpose's row");
    const i64 tiles = (M + P - 1) / P;
    const i64 items = G * tiles;
    if (gX) std::memset(gX, 0, sizeof(float) * G * M * F);
    if (gA) std::memset(gA, 0, sizeof(float) * G * N * F);
    if (gc) std::memset(gc, 0, sizeof(float) * G * N * W);
    std::mutex flush_lock;
    run_parallel(threads, [&](int tid, int nth) {
        const i64 w0 = items * tid / nth, w1 = items * (tid + 1) / nth;
        std::vector<float> sums((size_t)ROW * N);
        Aligned<float> coef, grad;  // [K][S] each: the tile's coefficients and their gradients
        alignas(64) float sbuf[P][JC];
        alignas(64) float ebuf[W == 2 ? P : 1][JC];
        alignas(64) float pad[ROW];
        alignas(64) float zero[ROW] = {};
        alignas(64) float scratch[ROW][ROW];
        i64 current = -1;
        auto flush = [&](i64 g) {
            if (g < 0) return;
            std::lock_guard<std::mutex> guard(flush_lock);
            for (i64 j = 0; j < N; ++j) {
                if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] += sums[j * ROW + f];
                if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] += sums[j * ROW + F + w];
            }
        };
        for (i64 item = w0; item < w1; ++item) {
            const i64 g = item / tiles, pt = item % tiles;
            if (g != current) {
                flush(current);
                std::fill(sums.begin(), sums.end(), 0.0f);
                current = g;
            }
            const i32* idx = index + offsets[item];
            const i64 L = offsets[item + 1] - offsets[item];
            if (L == 0) continue;
            const i64 S = (L + ROW - 1) / ROW * ROW;
            coef.reserve(K * S); grad.reserve(K * S);
            const float* base = Rows + g * N * ROW;
            std::memcpy(pad, base + (i64)idx[L - 1] * ROW, sizeof(pad));
            for (int w = 0; w < W; ++w) pad[F + w] = 0.0f;
            for (i64 k0 = 0; k0 < S; k0 += ROW) {
                const float* in[ROW];
                float* out[ROW];
                for (int i = 0; i < ROW; ++i) {
                    in[i] = k0 + i < L ? base + (i64)idx[k0 + i] * ROW : pad;
                    out[i] = i < K ? coef.data + i * S + k0 : scratch[i];
                }
                transpose16(in, out);
            }
            std::fill(grad.data, grad.data + K * S, 0.0f);
            const float* a = coef.data;
            const float* c0 = a + F * S;
            const float* c1 = a + (F + W - 1) * S;
            const i64 i0 = pt * P, np = std::min((i64)P, M - i0);
            i64 rows[P];
            float x[P][F], dx[P][F], g0[P], g1[P];
            bool any = false;
            for (int p = 0; p < P; ++p) {
                const bool real = p < np;
                rows[p] = real ? row_of(order, g, M, i0 + p) : 0;
                g0[p] = real ? go[(g * M + rows[p]) * W] : 0.0f;
                g1[p] = real && W == 2 ? go[(g * M + rows[p]) * W + 1] : 0.0f;
                any |= g0[p] != 0.0f || g1[p] != 0.0f;
                for (int f = 0; f < F; ++f) { x[p][f] = real ? X[(g * M + rows[p]) * F + f] : 0.0f; dx[p][f] = 0; }
            }
            if (!any) continue;
            for (i64 jc = 0; jc < S; jc += JC) {
                const i64 len = std::min((i64)JC, S - jc);
                const float* __restrict ac = a + jc;
                const float* __restrict c0c = c0 + jc;
                const float* __restrict c1c = c1 + jc;
                backward_chunk<float, F, W, P, JC>(ac, c0c, c1c, S, len, x, g0, g1, dx, sbuf, ebuf, grad.data + jc,
                                                   grad.data + F * S + jc, grad.data + (F + W - 1) * S + jc);
            }
            if (gX) for (int p = 0; p < np; ++p)
                for (int f = 0; f < F; ++f) gX[(g * M + rows[p]) * F + f] = dx[p][f];
            for (i64 k0 = 0; k0 < L; k0 += ROW) {  // the padding entries (k >= L) are dropped
                const float* in[ROW];
                float* out[ROW];
                for (int i = 0; i < ROW; ++i) {
                    in[i] = i < K ? grad.data + i * S + k0 : zero;
                    out[i] = scratch[i];
                }
                transpose16(in, out);
                const int n = (int)std::min((i64)ROW, L - k0);
                for (int i = 0; i < n; ++i) {
                    float* __restrict row = sums.data() + (i64)idx[k0 + i] * ROW;
                    const float* __restrict add = scratch[i];
                    #pragma omp simd
                    for (int v = 0; v < ROW; ++v) row[v] += add[v];
                }
            }
        }
        flush(current);
    });
}

extern "C" {
int cutoff_tile_points() { return TILE; }
void* cutoff_plan_d2(i64 G, i64 M, i64 N, const double* p, const double* b, const double* C, const double* peaks,
                     double tol, i64 tm, i64* order, i64* counts, int threads) {
    return plan<2>(G, M, N, p, b, C, peaks, tol, tm, order, counts, threads);
}
void* cutoff_plan_d3(i64 G, i64 M, i64 N, const double* p, const double* b, const double* C, const double* peaks,
                     double tol, i64 tm, i64* order, i64* counts, int threads) {
    return plan<3>(G, M, N, p, b, C, peaks, tol, tm, order, counts, threads);
}
// Copies the lists of all mixtures (concatenated, mixture-major) to index and frees the plan.
void cutoff_plan_take(void* handle, i32* index) {
    Plan* p = static_cast<Plan*>(handle);
    for (const MixturePlan& m : p->mixtures) {
        if (index && !m.index.empty()) std::memcpy(index, m.index.data(), sizeof(i32) * m.index.size());
        if (index) index += m.index.size();
    }
    delete p;
}
}

#define INSTANTIATE(T, F, W, SUFFIX)                                                                   \
extern "C" void sparse_forward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c,     \
        T* out, i64 tm, const i64* offsets, const i32* index, const i64* order, int threads) {         \
    forward<T, F, W>(G, M, N, X, A, c, out, tm, offsets, index, order, threads);                       \
}                                                                                                      \
extern "C" void sparse_backward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c,    \
        const T* go, T* gX, T* gA, T* gc, i64 tm, const i64* offsets, const i32* index,                \
        const i64* order, int threads) {                                                               \
    backward<T, F, W>(G, M, N, X, A, c, go, gX, gA, gc, tm, offsets, index, order, threads);           \
}
INSTANTIATE(float, 6, 1, f32_6_w1)
INSTANTIATE(float, 10, 1, f32_10_w1)
INSTANTIATE(double, 6, 1, f64_6_w1)
INSTANTIATE(double, 10, 1, f64_10_w1)
INSTANTIATE(float, 6, 2, f32_6_w2)
INSTANTIATE(float, 10, 2, f32_10_w2)
INSTANTIATE(double, 6, 2, f64_6_w2)
INSTANTIATE(double, 10, 2, f64_10_w2)

#define INSTANTIATE_ROWS(F, W, SUFFIX)                                                                 \
extern "C" void sparse_forward_rows_##SUFFIX(i64 G, i64 M, i64 N, const float* X, const float* Rows,  \
        float* out, const i64* offsets, const i32* index, const i64* order, int threads) {             \
    forward_rows<F, W>(G, M, N, X, Rows, out, offsets, index, order, threads);                         \
}                                                                                                      \
extern "C" void sparse_backward_rows_##SUFFIX(i64 G, i64 M, i64 N, const float* X, const float* Rows, \
        const float* go, float* gX, float* gA, float* gc, const i64* offsets, const i32* index,        \
        const i64* order, int threads) {                                                               \
    backward_rows<F, W>(G, M, N, X, Rows, go, gX, gA, gc, offsets, index, order, threads);             \
}
INSTANTIATE_ROWS(6, 1, f32_6_w1)
INSTANTIATE_ROWS(10, 1, f32_10_w1)
INSTANTIATE_ROWS(6, 2, f32_6_w2)
INSTANTIATE_ROWS(10, 2, f32_10_w2)
