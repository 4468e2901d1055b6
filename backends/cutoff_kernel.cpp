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
#include <numeric>
#include <thread>
#include <vector>

#include "fast_exp.h"  // exp_nonpositive: pasted in by native.py before compiling

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

// Builds the tree over order[begin, end); sorts the range when `sort` is set
// (otherwise the order is given and only boxes are computed).  Leaves hold at
// most tm points; split sizes are multiples of tm, so only the last tile of a
// mixture can be partial and tile t holds points [t tm, (t + 1) tm).
template <int D>
static i64 build(std::vector<Node<D>>& nodes, const double* x, i64* order, i64 begin, i64 end, i64 tm, bool sort) {
    Node<D> node;
    node.begin = begin; node.end = end; node.left = node.right = -1;
    for (int d = 0; d < D; ++d) { node.lo[d] = INFINITY; node.hi[d] = -INFINITY; }
    for (i64 k = begin; k < end; ++k)
        for (int d = 0; d < D; ++d) {
            const double v = x[order[k] * D + d];
            node.lo[d] = std::min(node.lo[d], v);
            node.hi[d] = std::max(node.hi[d], v);
        }
    const i64 id = (i64)nodes.size();
    nodes.push_back(node);
    const i64 n = end - begin;
    if (n <= tm) return id;
    const i64 tiles = (n + tm - 1) / tm;
    const i64 mid = begin + (tiles / 2) * tm;
    if (sort) {
        int axis = 0;
        for (int d = 1; d < D; ++d)
            if (node.hi[d] - node.lo[d] > node.hi[axis] - node.lo[axis]) axis = d;
        std::nth_element(order + begin, order + mid, order + end,
                         [&](i64 a, i64 b) { return x[a * D + axis] < x[b * D + axis]; });
    }
    const i64 left = build<D>(nodes, x, order, begin, mid, tm, sort);
    const i64 right = build<D>(nodes, x, order, mid, end, tm, sort);
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

// The influences of one mixture's Gaussians, one array per field, so that the
// test of a box against many Gaussians vectorises.
template <int D>
struct Influences {
    std::vector<double> b[D], half[D], w[D][D];
    std::vector<i32> id;
    i64 size = 0;
    void resize(i64 n) {
        for (int d = 0; d < D; ++d) {
            b[d].resize(n); half[d].resize(n);
            for (int e = 0; e < D; ++e) w[d][e].resize(n);
        }
        id.resize(n);
    }
    void set(i64 k, const Influence<D>& g, i32 j) {
        for (int d = 0; d < D; ++d) {
            b[d][k] = g.b[d]; half[d][k] = g.half[d];
            for (int e = 0; e < D; ++e) w[d][e][k] = g.w[d][e];
        }
        id[k] = j;
    }
    void copy(i64 k, const Influences& from, i64 f) {
        for (int d = 0; d < D; ++d) {
            b[d][k] = from.b[d][f]; half[d][k] = from.half[d][f];
            for (int e = 0; e < D; ++e) w[d][e][k] = from.w[d][e][f];
        }
        id[k] = from.id[f];
    }
};

// keep[k] = 1 iff the box [lo, hi] may hold a point where Gaussian k exceeds
// tau: its axis-aligned box meets the box, and the whitened lower bound
// sum_k dist(0, I_k)^2 is at most 1 (slack 1e-9 for the rounding of the bound).
template <int D>
static void test_box(const Influences<D>& s, i64 count, const double* lo, const double* hi, uint8_t* __restrict keep) {
    double c[D], h[D], l[D], u[D];
    for (int d = 0; d < D; ++d) { c[d] = 0.5 * (lo[d] + hi[d]); h[d] = 0.5 * (hi[d] - lo[d]); l[d] = lo[d]; u[d] = hi[d]; }
    // Loop-invariant local pointers: keep (a char type) may alias anything, and the
    // vectors' data pointers would otherwise be reloaded in every iteration.
    const double* __restrict b[D];
    const double* __restrict half[D];
    const double* __restrict w[D][D];
    for (int d = 0; d < D; ++d) {
        b[d] = s.b[d].data(); half[d] = s.half[d].data();
        for (int e = 0; e < D; ++e) w[d][e] = s.w[d][e].data();
    }
    #pragma omp simd
    for (i64 k = 0; k < count; ++k) {
        int ok = 1;
        double rel[D];
        for (int d = 0; d < D; ++d) {
            ok &= (l[d] <= b[d][k] + half[d][k]) & (u[d] >= b[d][k] - half[d][k]);
            rel[d] = c[d] - b[d][k];
        }
        double near = 0;
        for (int a = 0; a < D; ++a) {
            double centre = 0, extent = 0;
            for (int d = 0; d < D; ++d) { centre += w[a][d][k] * rel[d]; extent += std::fabs(w[a][d][k]) * h[d]; }
            double dist = std::fabs(centre) - extent;
            dist = dist > 0.0 ? dist : 0.0;  // not std::fmax: a libm call that blocks vectorisation
            near += dist * dist;
        }
        keep[k] = (uint8_t)(ok & (near <= 1.0 + 1e-9));
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
static void box_of(const double* x, const i64* ord, i64 begin, i64 end, double* lo, double* hi) {
    for (int d = 0; d < D; ++d) { lo[d] = INFINITY; hi[d] = -INFINITY; }
    for (i64 k = begin; k < end; ++k)
        for (int d = 0; d < D; ++d) {
            const double v = x[ord[k] * D + d];
            lo[d] = std::min(lo[d], v);
            hi[d] = std::max(hi[d], v);
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
        Influences<D> all, candidates;
        std::vector<uint8_t> keep;
        for (i64 g = next++; g < G; g = next++) {
            const double* x = points + g * M * D;
            i64* ord = order + g * M;
            std::iota(ord, ord + M, (i64)0);
            i64* cnt = counts + g * tiles;
            std::fill(cnt, cnt + tiles, (i64)0);
            if (M == 0) continue;
            nodes.clear();
            build<D>(nodes, x, ord, 0, M, tm, true);
            const double* pk = peaks + g * N;
            double top = 0;
            for (i64 j = 0; j < N; ++j) top = std::max(top, std::fabs(pk[j]));
            const double tau = tol * top;
            all.resize(N);
            i64 valid = 0;
            for (i64 j = 0; j < N; ++j) {
                Influence<D> inf;
                if (influence<D>(centres + (g * N + j) * D, covariances + (g * N + j) * D * D, std::fabs(pk[j]), tau, inf))
                    all.set(valid++, inf, (i32)j);
            }
            if ((i64)keep.size() < valid) keep.resize(valid);
            candidates.resize(valid);
            std::vector<i32>& index = result->mixtures[g].index;
            index.clear();
            for (i64 ct = 0; ct < tiles; ct += COARSE) {
                const i64 ct1 = std::min(ct + COARSE, tiles);
                double lo[D], hi[D];
                box_of<D>(x, ord, ct * tm, std::min(ct1 * tm, M), lo, hi);
                test_box<D>(all, valid, lo, hi, keep.data());
                i64 survivors = 0;
                for (i64 k = 0; k < valid; ++k)
                    if (keep[k]) candidates.copy(survivors++, all, k);
                for (i64 t = ct; t < ct1; ++t) {
                    box_of<D>(x, ord, t * tm, std::min((t + 1) * tm, M), lo, hi);
                    test_box<D>(candidates, survivors, lo, hi, keep.data());
                    const size_t before = index.size();
                    for (i64 k = 0; k < survivors; ++k)
                        if (keep[k]) index.push_back(candidates.id[k]);
                    cnt[t] = (i64)(index.size() - before);
                }
            }
        }
    });
    return result;
}

// ---------------------------------------------------------------- evaluation

// The listed Gaussians of one tile, gathered contiguous per feature
// (a[f * L + k]) from the transposed coefficients At [F, N], c [W, N]: the
// inner loop is a vector gather with contiguous stores.
template <typename T, int F, int W>
struct Gathered {
    std::vector<T> a, c;
    i64 L = 0;
    void gather(const T* At, const T* C, i64 N, const i32* __restrict idx, i64 count) {
        L = count;
        if ((i64)a.size() < F * L) { a.resize(F * L); c.resize(W * L); }
        for (int f = 0; f < F; ++f) {
            const T* __restrict src = At + f * N;
            T* __restrict dst = a.data() + f * L;
            #pragma omp simd
            for (i64 k = 0; k < L; ++k) dst[k] = src[idx[k]];
        }
        for (int w = 0; w < W; ++w) {
            const T* __restrict src = C + w * N;
            T* __restrict dst = c.data() + w * L;
            #pragma omp simd
            for (i64 k = 0; k < L; ++k) dst[k] = src[idx[k]];
        }
    }
};

// X [G, M, F] in tile order, At [G, F, N], c [G, W, N] (transposed), out [G, M, W];
// offsets [G * Tm + 1] and index (Gaussian numbers within the mixture).
template <typename T, int F, int W>
static void forward(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c, T* out, i64 tm, const i64* offsets,
                    const i32* index, int threads) {
    const i64 tiles = (M + tm - 1) / tm;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        Gathered<T, F, W> s;
        for (i64 item = next++; item < G * tiles; item = next++) {
            const i64 g = item / tiles, pt = item % tiles;
            s.gather(A + g * N * F, c + g * N * W, N, index + offsets[item], offsets[item + 1] - offsets[item]);
            const T* a = s.a.data();
            const T* c0 = s.c.data();
            const T* c1 = c0 + (W - 1) * s.L;
            const i64 L = s.L;
            const i64 i1 = std::min((pt + 1) * tm, M);
            for (i64 i = pt * tm; i < i1; ++i) {
                T x[F];
                for (int f = 0; f < F; ++f) x[f] = X[(g * M + i) * F + f];
                T acc0 = 0, acc1 = 0;
                #pragma omp simd reduction(+ : acc0, acc1)
                for (i64 k = 0; k < L; ++k) {
                    T q = 0;
                    for (int f = 0; f < F; ++f) q += x[f] * a[f * L + k];
                    q = q > T(0) ? T(0) : q;  // NaN stays NaN
                    const T e = exp_nonpositive(q);
                    acc0 += c0[k] * e;
                    if (W == 2) acc1 += c1[k] * e;
                }
                out[(g * M + i) * W] = acc0;
                if (W == 2) out[(g * M + i) * W + 1] = acc1;
            }
        }
    });
}

// Backward: each exponential once for all three gradients.  Work items (tiles)
// are split contiguously over the threads; each thread accumulates dA and dc
// of its current mixture privately ([F][N], [W][N]) and adds them to the
// output under a lock when it moves on.  At [G, F, N] and c [G, W, N] as in
// forward; go [G, M, W], gX [G, M, F],
// gA [G, N, F], gc [G, N, W].
template <typename T, int F, int W>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c, const T* go, T* gX, T* gA, T* gc,
                     i64 tm, const i64* offsets, const i32* index, int threads) {
    const i64 tiles = (M + tm - 1) / tm;
    const i64 items = G * tiles;
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    if (gA) std::memset(gA, 0, sizeof(T) * G * N * F);
    if (gc) std::memset(gc, 0, sizeof(T) * G * N * W);
    std::mutex flush_lock;
    run_parallel(threads, [&](int tid, int nth) {
        const i64 w0 = items * tid / nth, w1 = items * (tid + 1) / nth;
        std::vector<T> dAt((size_t)F * N), dc((size_t)W * N), la, lc, sv;
        Gathered<T, F, W> s;
        i64 current = -1;
        auto flush = [&](i64 g) {
            if (g < 0) return;
            std::lock_guard<std::mutex> guard(flush_lock);
            for (i64 j = 0; j < N; ++j) {
                if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] += dc[w * N + j];
                if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] += dAt[f * N + j];
            }
        };
        for (i64 item = w0; item < w1; ++item) {
            const i64 g = item / tiles, pt = item % tiles;
            if (g != current) {
                flush(current);
                std::fill(dAt.begin(), dAt.end(), T(0));
                std::fill(dc.begin(), dc.end(), T(0));
                current = g;
            }
            const i32* idx = index + offsets[item];
            s.gather(A + g * N * F, c + g * N * W, N, idx, offsets[item + 1] - offsets[item]);
            const i64 L = s.L;
            if ((i64)la.size() < F * L) { la.resize(F * L); lc.resize(W * L); sv.resize(L); }
            std::fill(la.begin(), la.begin() + F * L, T(0));
            std::fill(lc.begin(), lc.begin() + W * L, T(0));
            const T* a = s.a.data();
            const T* c0 = s.c.data();
            const T* c1 = c0 + (W - 1) * L;
            T* da = la.data();
            T* dc0 = lc.data();
            T* dc1 = dc0 + (W - 1) * L;
            T* sp = sv.data();
            const i64 i1 = std::min((pt + 1) * tm, M);
            for (i64 i = pt * tm; i < i1; ++i) {
                const T g0 = go[(g * M + i) * W];
                const T g1 = W == 2 ? go[(g * M + i) * W + 1] : T(0);
                if (g0 == T(0) && g1 == T(0)) continue;
                T x[F];
                for (int f = 0; f < F; ++f) x[f] = X[(g * M + i) * F + f];
                #pragma omp simd
                for (i64 k = 0; k < L; ++k) {
                    T q = 0;
                    for (int f = 0; f < F; ++f) q += x[f] * a[f * L + k];
                    q = q > T(0) ? T(0) : q;  // NaN stays NaN
                    const T e = exp_nonpositive(q);
                    dc0[k] += g0 * e;
                    if (W == 2) dc1[k] += g1 * e;
                    const T sk = W == 2 ? e * (g0 * c0[k] + g1 * c1[k]) : g0 * e * c0[k];
                    sp[k] = sk;
                    for (int f = 0; f < F; ++f) da[f * L + k] += sk * x[f];
                }
                if (gX) for (int f = 0; f < F; ++f) {
                    T acc = 0;
                    #pragma omp simd reduction(+ : acc)
                    for (i64 k = 0; k < L; ++k) acc += sp[k] * a[f * L + k];
                    gX[(g * M + i) * F + f] = acc;
                }
            }
            for (i64 k = 0; k < L; ++k) {
                const i64 j = idx[k];
                for (int w = 0; w < W; ++w) dc[w * N + j] += lc[w * L + k];
                for (int f = 0; f < F; ++f) dAt[f * N + j] += la[f * L + k];
            }
        }
        flush(current);
    });
}

extern "C" {
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
        T* out, i64 tm, const i64* offsets, const i32* index, int threads) {                           \
    forward<T, F, W>(G, M, N, X, A, c, out, tm, offsets, index, threads);                              \
}                                                                                                      \
extern "C" void sparse_backward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* A, const T* c,    \
        const T* go, T* gX, T* gA, T* gc, i64 tm, const i64* offsets, const i32* index, int threads) {  \
    backward<T, F, W>(G, M, N, X, A, c, go, gX, gA, gc, tm, offsets, index, threads);                  \
}
INSTANTIATE(float, 6, 1, f32_6_w1)
INSTANTIATE(float, 10, 1, f32_10_w1)
INSTANTIATE(double, 6, 1, f64_6_w1)
INSTANTIATE(double, 10, 1, f64_10_w1)
INSTANTIATE(float, 6, 2, f32_6_w2)
INSTANTIATE(float, 10, 2, f32_10_w2)
INSTANTIATE(double, 6, 2, f64_6_w2)
INSTANTIATE(double, 10, 2, f64_10_w2)
