// Fused E and M steps of the reduction methods (TreeHEM's node fits, MEM), CPU.
// MEM's E and M step and the whole MEM reduction, with sparse responsibilities,
// are in mem_kernel.h (pasted in below); this file has TreeHEM's dense node fits.
//
// The same function as gmbench/reduction/em.py (em_step) and node_fit.py
// (fit_nodes: single-linkage initial Gaussians, then em_step), one small
// problem per loop iteration, all intermediates in per-thread scratch memory.
// Forward can keep each problem's E step (responsibilities, log-likelihoods,
// which rows had an allowed pair) and TreeHEM's initial-Gaussian choices in a
// state buffer; backward then recomputes only the cheap rest (features, M-step
// sums), else it recomputes the whole forward of its problem.  It applies the
// chain rule written out below; the
// PyTorch code is the reference it is tested against (values, gradients,
// gates, detached terms and the asymmetric use of covariance entries by the
// closed-form inverse, see gmbench.mixture.symmetric_inverse_and_logdet).
//
// Layouts: a problem's Gaussians are rows of K = 1 + D + D*D values (weight,
// position, row-major covariance); masks are uint8.  Loaded with ctypes (no
// PyTorch headers); threads are plain std::threads (see cpu_kernel.cpp on why
// not OpenMP).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "fast_exp.h"  // exp_nonpositive: pasted in by native.py before compiling
#include "huge_pages.h"  // advise_huge_pages: pasted in by native.py before compiling

typedef int64_t i64;

namespace {

template <typename Body>
void run_parallel(int threads, Body body) {
    if (threads <= 1) { body(); return; }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) pool.emplace_back(body);
    body();
    for (auto& thread : pool) thread.join();
}

// Problems are handed out in chunks from an atomic counter: node fits are
// tiny (a chunk amortises the atomic), MEM problems are large (chunk 1).
template <typename Work>
void for_each_problem(i64 count, i64 chunk, int threads, Work work) {
    std::atomic<i64> next(0);
    const i64 useful = (count + chunk - 1) / chunk;
    run_parallel(threads < useful ? threads : (int)std::max<i64>(useful, 1), [&]() {
        typename Work::Scratch scratch;
        for (i64 begin = next.fetch_add(chunk); begin < count; begin = next.fetch_add(chunk)) {
            const i64 end = begin + chunk < count ? begin + chunk : count;
            for (i64 p = begin; p < end; ++p) work(p, scratch);
        }
    });
}


struct Settings {
    double virtual_points;
    int use_kl;
    double kl_threshold;
};

template <typename T>
inline T tiny() { return std::numeric_limits<T>::min(); }  // torch.finfo(T).tiny

template <typename T>
inline T sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0)); }

template <typename T>
inline T clamp_tiny(T x) { return x < tiny<T>() ? tiny<T>() : x; }  // NaN stays NaN, as clamp_min

// Adjugate and determinant from the upper-triangle entries, exactly the
// formulas of gmbench.mixture.symmetric_inverse_and_logdet.
template <typename T, int D> struct Inverse;

template <typename T> struct Inverse<T, 2> {
    static T adjugate(const T* C, T* adj) {
        const T a = C[0], b = C[1], c = C[3];
        adj[0] = c; adj[1] = -b; adj[2] = -b; adj[3] = a;
        return a * c - b * b;
    }
    // Accumulates the gradient of (adj, det) into gC (entries 00, 01, 11 only).
    static void backward(const T* C, const T* gadj, T gdet, T* gC) {
        const T a = C[0], b = C[1], c = C[3];
        gC[0] += gdet * c + gadj[3];
        gC[1] += -T(2) * b * gdet - gadj[1] - gadj[2];
        gC[3] += gdet * a + gadj[0];
    }
};

template <typename T> struct Inverse<T, 3> {
    static T adjugate(const T* C, T* adj) {
        const T a = C[0], b = C[1], c = C[2], e = C[4], f = C[5], i = C[8];
        const T A = e * i - f * f, B = c * f - b * i, Cc = b * f - c * e;
        const T E = a * i - c * c, F = b * c - a * f, I = a * e - b * b;
        adj[0] = A; adj[1] = B; adj[2] = Cc;
        adj[3] = B; adj[4] = E; adj[5] = F;
        adj[6] = Cc; adj[7] = F; adj[8] = I;
        return a * A + b * B + c * Cc;
    }
    static void backward(const T* C, const T* gadj, T gdet, T* gC) {
        const T a = C[0], b = C[1], c = C[2], e = C[4], f = C[5], i = C[8];
        const T A = e * i - f * f, B = c * f - b * i, Cc = b * f - c * e;
        const T gA = gadj[0] + gdet * a, gB = gadj[1] + gadj[3] + gdet * b, gCc = gadj[2] + gadj[6] + gdet * c;
        const T gE = gadj[4], gF = gadj[5] + gadj[7], gI = gadj[8];
        gC[0] += gdet * A + gE * i - gF * f + gI * e;
        gC[1] += gdet * B - gB * i + gCc * f + gF * c - T(2) * gI * b;
        gC[2] += gdet * Cc + gB * f - gCc * e - T(2) * gE * c + gF * b;
        gC[4] += gA * i - gCc * c + gI * a;
        gC[5] += -T(2) * gA * f + gB * c + gCc * b - gF * a;
        gC[8] += gA * e - gB * b + gE * a;
    }
};

template <typename T, int D>
T log_det_clamped(const T* C) {
    T adj[D * D];
    return std::log(clamp_tiny(Inverse<T, D>::adjugate(C, adj)));
}

// The fitted Gaussian from its M-step sums (Eq. 16): weight ws, mean sum sm [D] and
// second-moment sum sc [DD] (both weighted, relative to the node's centre), written to
// o [K] with the centre added back and the covariance symmetrised.  Shared by EMStep
// and the fused MEM (mem_kernel.h).
template <typename T, int D>
static inline void gaussian_from_moments(T ws, const T* sm, const T* sc, const T* centre, T* o) {
    constexpr int DD = D * D;
    T mean[D], cov[DD];
    for (int a = 0; a < D; ++a) mean[a] = sm[a] / ws;
    for (int c = 0; c < DD; ++c) cov[c] = sc[c] / ws;
    for (int a = 0; a < D; ++a)
        for (int b = 0; b < D; ++b) cov[a * D + b] -= mean[a] * mean[b];
    o[0] = ws;
    for (int a = 0; a < D; ++a) o[1 + a] = mean[a] + centre[a];
    for (int a = 0; a < D; ++a)
        for (int b = 0; b < D; ++b) o[1 + D + a * D + b] = T(0.5) * (cov[a * D + b] + cov[b * D + a]);
}

// Chain rule from one fitting Gaussian's features back to its parameters g
// (weight, mean, covariance; gradient added into gg): P = adj(C) / detc with
// detc = clamp_min(det C, tiny), the feature P m (gradient gPm), the constant
// m^T P m (gradient gk), log det = log(detc) (glds) and the log prior
// log(clamp_min(|w|, tiny)) (glprior).  gP holds the gradient of P on entry
// and is used as scratch.  Shared by EMStep and the fused MEM (mem_kernel.h).
template <typename T, int D>
static inline void fitting_features_backward(const T* g, const T* A, const T* m, const T* pm, const T* P, T* gP,
                                             const T* gPm, T gk, T detc, T det, T glds, T glprior, T* gg) {
    constexpr int DD = D * D;
    T gpm[D];
    for (int a = 0; a < D; ++a) gpm[a] = T(-2) * gPm[a] + gk * m[a];
    for (int a = 0; a < D; ++a) {
        T acc = gk * pm[a];
        for (int b = 0; b < D; ++b) acc += P[b * D + a] * gpm[b];
        gg[1 + a] += acc;
    }
    for (int a = 0; a < D; ++a)
        for (int b = 0; b < D; ++b) gP[a * D + b] += gpm[a] * m[b];
    T gadj[DD];
    T gdetc = glds / detc;
    for (int c = 0; c < DD; ++c) {
        gadj[c] = gP[c] / detc;
        gdetc -= gP[c] * (A[c] / detc) / detc;  // as torch: no underflow of detc^2
    }
    const T gdet = det >= tiny<T>() ? gdetc : T(0);
    Inverse<T, D>::backward(g + 1 + D, gadj, gdet, gg + 1 + D);
    const T aw = std::fabs(g[0]);
    if (aw >= tiny<T>()) gg[0] += sign(g[0]) * (glprior / aw);
}

// One E step (Eq. 15, with the sign and KL gates) and one M step (Eq. 16) of
// S target Gaussians onto Q fitting Gaussians: em.py's em_step.  QC > 0 fixes
// Q at compile time (TreeHEM's node fits, Q = T or 2T): the loops over the
// fitting Gaussians, which otherwise cost more in loop overhead than in
// arithmetic at Q = 2, unroll.
template <typename T, int D, int QC = 0>
struct EMStep {
    static constexpr int K = 1 + D + D * D, DD = D * D;
    static constexpr int FT = DD + D;      // target features: Sigma_i + m_i m_i^T (row-major), m_i
    static constexpr int FS = DD + D + 1;  // fitting features: P_s, -2 P_s m_s, m_s^T P_s m_s

    i64 S = 0, Q = 0;
    T centre[D];
    T total = 0, divisor = 1;
    std::vector<T> ft, virt, absw, ldt;           // [S][FT], [S] x 3
    std::vector<T> fs, adj, detc, det, lds, lprior, ms, pmu;  // [FS][Q], [Q][DD], [Q] x 4, [Q][D] x 2
    std::vector<T> r, ll;                          // [S][Q] (backward without a saved state only)
    std::vector<uint8_t> has_any;                  // [S]
    std::vector<T> U, ws;                          // [FT][Q] sum_i r_is w_i features_i, [Q]
    std::vector<T> logit, kl, e;                   // [Q] row temporaries
    std::vector<uint8_t> allowed, candidate, fsign;
    // backward
    std::vector<T> gU, gwt, gfs, glds, glprior, gvirt, grw, glogit;

    // The saved E step of one problem: r [S][Q] then has_any [S] (0 or 1), and ll [S][Q],
    // in two blocks (MEM keeps them in two buffers, TreeHEM one after the other).
    static i64 r_state_size(i64 s, i64 q) { return s * q + s; }
    i64 nq() const { return QC > 0 ? i64(QC) : Q; }
    static i64 state_size(i64 s, i64 q) { return r_state_size(s, q) + s * q; }

    void resize(i64 s, i64 q, bool backward) {
        S = s; Q = q;
        ft.resize(S * FT); virt.resize(S); absw.resize(S); ldt.resize(S); has_any.resize(S);
        fs.resize(FS * Q); adj.resize(Q * DD); detc.resize(Q); det.resize(Q); lds.resize(Q); lprior.resize(Q);
        ms.resize(Q * D); pmu.resize(Q * D);
        U.resize(FT * Q); ws.resize(Q);
        logit.resize(Q); kl.resize(Q); e.resize(Q); allowed.resize(Q); candidate.resize(Q); fsign.resize(Q);
        if (backward) {
            r.resize(S * Q); ll.resize(S * Q);
            gU.resize(FT * Q); gwt.resize(Q); gfs.resize(FS * Q); glds.resize(Q); glprior.resize(Q);
            gvirt.resize(S); grw.resize(Q); glogit.resize(Q);
        }
    }

    // With logs false the log determinants and log priors (only the E step's
    // row() reads them) are left out, as backward from a saved state needs.
    void prepare(const T* tg, const uint8_t* tv, const T* fit, const Settings& st, const int* fit_index,
                 bool logs = true) {
        const i64 Q = nq();  // a compile-time constant where QC is given
        for (int a = 0; a < D; ++a) centre[a] = 0;
        for (i64 i = 0; i < S; ++i)
            for (int a = 0; a < D; ++a) centre[a] += tg[i * K + 1 + a];
        for (int a = 0; a < D; ++a) centre[a] /= T(S);
        total = 0;
        for (i64 i = 0; i < S; ++i) {
            const T* g = tg + i * K;
            T m[D];
            for (int a = 0; a < D; ++a) m[a] = g[1 + a] - centre[a];
            T* f = &ft[i * FT];
            for (int a = 0; a < D; ++a)
                for (int b = 0; b < D; ++b) f[a * D + b] = g[1 + D + a * D + b] + m[a] * m[b];
            for (int a = 0; a < D; ++a) f[DD + a] = m[a];
            absw[i] = std::fabs(g[0]) * T(tv[i] ? 1 : 0);
            total += absw[i];
            if (logs) ldt[i] = log_det_clamped<T, D>(g + 1 + D);
        }
        divisor = total > T(0) ? total : T(1);
        for (i64 i = 0; i < S; ++i) virt[i] = T(st.virtual_points) * absw[i] / divisor;
        for (i64 s = 0; s < Q; ++s) {
            const T* g = fit + s * K;
            T* A = &adj[s * DD];
            det[s] = Inverse<T, D>::adjugate(g + 1 + D, A);
            detc[s] = clamp_tiny(det[s]);
            // A fitting Gaussian copied from target row fit_index[s] has that row's log det.
            if (logs) lds[s] = fit_index ? ldt[fit_index[s]] : std::log(detc[s]);
            T P[DD];
            for (int f = 0; f < DD; ++f) P[f] = A[f] / detc[s];
            T* m = &ms[s * D];
            T* pm = &pmu[s * D];
            for (int a = 0; a < D; ++a) m[a] = g[1 + a] - centre[a];
            T k = 0;
            for (int a = 0; a < D; ++a) {
                T acc = 0;
                for (int b = 0; b < D; ++b) acc += P[a * D + b] * m[b];
                pm[a] = acc;
            }
            for (int a = 0; a < D; ++a) k += m[a] * pm[a];
            for (int f = 0; f < DD; ++f) fs[f * Q + s] = P[f];
            for (int a = 0; a < D; ++a) fs[(DD + a) * Q + s] = T(-2) * pm[a];
            fs[(DD + D) * Q + s] = k;
            if (logs) lprior[s] = std::log(clamp_tiny(std::fabs(g[0])));
            fsign[s] = g[0] >= T(0);
        }
    }

    // The responsibilities of target row i (into e[]), and whether any pair is allowed.
    // Returns the log-likelihoods in ll_row when given.
    bool row(i64 i, const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, const Settings& st,
             T* ll_row) {
        const i64 Q = nq();  // a compile-time constant where QC is given
        const T log2pi_d = T(D * 1.8378770664093454835606594728112);  // D log(2 pi)
        const T* f = &ft[i * FT];
        const T w_i = tg[i * K];
        const T vi = virt[i], ldi = ldt[i];
        T* lg = logit.data();
        T* kd = kl.data();
        T* lq = e.data();  // the quadratic terms, before e holds the exponentials
        const T* k_s = &fs[(DD + D) * Q];
        #pragma omp simd
        for (i64 s = 0; s < Q; ++s) lq[s] = k_s[s];
        for (int c = 0; c < FT; ++c) {
            const T fc = f[c];
            const T* fsc = &fs[c * Q];
            #pragma omp simd
            for (i64 s = 0; s < Q; ++s) lq[s] += fc * fsc[s];
        }
        const T* ld = lds.data();
        const T* lp = lprior.data();
        #pragma omp simd
        for (i64 s = 0; s < Q; ++s) {
            const T q = lq[s];
            const T l = T(-0.5) * ((q + ld[s]) + log2pi_d);
            lg[s] = vi * l + lp[s];
            kd[s] = T(0.5) * (((q - T(D)) - ldi) + ld[s]);
            lq[s] = l;
        }
        if (ll_row) std::copy(lq, lq + Q, ll_row);
        // Gates (no gradient).  Only valid target rows get here, so a pair is
        // valid where its fitting Gaussian is.
        const uint8_t* pv = fv;
        const uint8_t sign_i = w_i >= T(0);
        uint8_t* cd = candidate.data();
        const uint8_t* fsg = fsign.data();
        uint8_t any_candidate = 0;
        #pragma omp simd reduction(| : any_candidate)
        for (i64 s = 0; s < Q; ++s) {
            cd[s] = pv[s] & (fsg[s] == sign_i);
            any_candidate |= cd[s];
        }
        const uint8_t* cand = any_candidate ? cd : pv;  // else any valid fitting Gaussian
        // argmin of (cand ? kl : inf): the first minimum; a NaN wins (torch.argmin).
        const T inf = std::numeric_limits<T>::infinity();
        T lowest = inf;
        uint8_t kl_nan = 0;
        #pragma omp simd reduction(min : lowest) reduction(| : kl_nan)
        for (i64 s = 0; s < Q; ++s) {
            const T v = cand[s] ? kd[s] : inf;
            kl_nan |= v != v;
            lowest = v < lowest ? v : lowest;
        }
        i64 best = 0;
        for (i64 s = 0; s < Q; ++s) {
            const T v = cand[s] ? kd[s] : inf;
            if (kl_nan ? v != v : v == lowest) { best = s; break; }
        }
        uint8_t any = 0;
        uint8_t* al = allowed.data();
        const int use_kl = st.use_kl;
        const T threshold = T(st.kl_threshold);
        #pragma omp simd reduction(| : any)
        for (i64 s = 0; s < Q; ++s) {
            const uint8_t gate = use_kl ? uint8_t(kd[s] < threshold) : uint8_t(1);
            al[s] = ((cand[s] & gate) | uint8_t(s == best)) & pv[s];
            any |= al[s];
        }
        if (!any)
            for (i64 s = 0; s < Q; ++s) al[s] = 1;
        T top = -inf;
        uint8_t top_nan = 0;
        #pragma omp simd reduction(max : top) reduction(| : top_nan)
        for (i64 s = 0; s < Q; ++s) {
            const T v = al[s] ? lg[s] : -inf;
            top_nan |= v != v;
            top = v > top ? v : top;
        }
        if (top_nan) top = std::numeric_limits<T>::quiet_NaN();
        T z = 0;
        T* ex = e.data();
        #pragma omp simd reduction(+ : z)
        for (i64 s = 0; s < Q; ++s) {
            const T v = exp_nonpositive_flushed(lg[s] - top);
            ex[s] = al[s] ? v : T(0);
            z += ex[s];
        }
        const T scale = any ? T(1) : T(0);
        #pragma omp simd
        for (i64 s = 0; s < Q; ++s) ex[s] = ex[s] / z * scale;
        return any;
    }

    // The M step's sums of target row i with responsibilities ex[Q].
    void accumulate(i64 i, const T* tg, const T* ex) {
        const i64 Q = nq();  // a compile-time constant where QC is given
        const T w_i = tg[i * K];
        const T* f = &ft[i * FT];
        T* wsp = ws.data();
        #pragma omp simd
        for (i64 s = 0; s < Q; ++s) wsp[s] += ex[s] * w_i;
        for (int c = 0; c < FT; ++c) {
            const T fc = f[c] * w_i;
            T* u = &U[c * Q];
            #pragma omp simd
            for (i64 s = 0; s < Q; ++s) u[s] += ex[s] * fc;
        }
    }

    // keep: the E step goes to the scratch r, ll, has_any (backward's
    // recompute); save, save_ll: to save[r_state_size(S, Q)], save_ll[S * Q]
    // (a forward whose backward reads them back).
    void forward(const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, const Settings& st,
                 T* out, uint8_t* out_valid, bool keep, const int* fit_index = nullptr, T* save = nullptr,
                 T* save_ll = nullptr) {
        const i64 Q = nq();  // a compile-time constant where QC is given
        prepare(tg, tv, fit, st, fit_index);
        std::fill(U.begin(), U.end(), T(0));
        std::fill(ws.begin(), ws.end(), T(0));
        const bool store = keep || save;
        T* R = save ? save : r.data();
        T* LL = save ? save_ll : ll.data();
        for (i64 i = 0; i < S; ++i) {
            if (!tv[i]) {  // no allowed pair: responsibilities 0, no gradient
                if (store) {
                    if (save) save[S * Q + i] = T(0); else has_any[i] = 0;
                    std::fill(R + i * Q, R + (i + 1) * Q, T(0));
                    if (save) std::fill(LL + i * Q, LL + (i + 1) * Q, T(0));
                }
                continue;
            }
            const bool any = row(i, tg, tv, fit, fv, st, store ? LL + i * Q : nullptr);
            if (store) {
                if (save) save[S * Q + i] = any ? T(1) : T(0); else has_any[i] = any;
                std::copy(e.begin(), e.begin() + Q, R + i * Q);
            }
            accumulate(i, tg, e.data());
        }
        if (!out) return;
        const T threshold = tiny<T>() * T(1e6);
        for (i64 s = 0; s < Q; ++s) {
            const T* g = fit + s * K;
            T* o = out + s * K;
            const bool nonzero = std::fabs(ws[s]) > threshold;
            out_valid[s] = nonzero && fv[s];
            if (!nonzero) {
                o[0] = 0;
                for (int c = 1; c < K; ++c) o[c] = g[c];
                continue;
            }
            T sm[D], sc[DD];  // this fitting Gaussian's sums (U is laid out [feature][Q])
            for (int a = 0; a < D; ++a) sm[a] = U[(DD + a) * Q + s];
            for (int c = 0; c < DD; ++c) sc[c] = U[c * Q + s];
            gaussian_from_moments<T, D>(ws[s], sm, sc, centre, o);
        }
    }

    // Accumulates (+=) the gradients of the target rows into gtg and of the
    // fitting rows into gfit, for the output gradient gout [Q][K].
    // saved, saved_ll: what forward(..., save, save_ll) wrote for these inputs, else the E step is recomputed.
    void backward(const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, const Settings& st,
                  const T* gout, T* gtg, T* gfit, const int* fit_index = nullptr, const T* saved = nullptr,
                  const T* saved_ll = nullptr) {
        const i64 Q = nq();  // a compile-time constant where QC is given
        if (saved) {
            prepare(tg, tv, fit, st, fit_index, false);
            std::fill(U.begin(), U.end(), T(0));
            std::fill(ws.begin(), ws.end(), T(0));
            for (i64 i = 0; i < S; ++i)
                if (tv[i]) accumulate(i, tg, saved + i * Q);
        } else {
            forward(tg, tv, fit, fv, st, nullptr, nullptr, true, fit_index);
        }
        const T* R = saved ? saved : r.data();
        const T* LL = saved ? saved_ll : ll.data();
        const T threshold = tiny<T>() * T(1e6);
        // M step, per fitting Gaussian: out = (w_s, U_mu / w_s + c, sym(U_2 / w_s - mu mu^T)).
        for (i64 s = 0; s < Q; ++s) {
            const bool nonzero = std::fabs(ws[s]) > threshold;
            if (!nonzero) {
                for (int c = 0; c < FT; ++c) gU[c * Q + s] = 0;
                gwt[s] = 0;
                continue;
            }
            const T* go = gout + s * K;
            T mean[D], gmom[FT], Gc[DD];
            for (int a = 0; a < D; ++a) mean[a] = U[(DD + a) * Q + s] / ws[s];
            for (int a = 0; a < D; ++a)
                for (int b = 0; b < D; ++b) Gc[a * D + b] = T(0.5) * (go[1 + D + a * D + b] + go[1 + D + b * D + a]);
            for (int c = 0; c < DD; ++c) gmom[c] = Gc[c];
            for (int a = 0; a < D; ++a) {
                T acc = 0;
                for (int b = 0; b < D; ++b) acc += (Gc[a * D + b] + Gc[b * D + a]) * mean[b];
                gmom[DD + a] = go[1 + a] - acc;
            }
            T gsafe = 0;
            for (int c = 0; c < FT; ++c) {
                gU[c * Q + s] = gmom[c] / ws[s];
                gsafe -= gmom[c] * (U[c * Q + s] / ws[s]);
            }
            gwt[s] = go[0] + gsafe / ws[s];
        }
        std::fill(gfs.begin(), gfs.end(), T(0));
        std::fill(glds.begin(), glds.end(), T(0));
        std::fill(glprior.begin(), glprior.end(), T(0));
        for (i64 i = 0; i < S; ++i) {
            gvirt[i] = 0;
            if (!tv[i]) continue;  // r = 0 for the whole row: nothing flows back
            const T* g = tg + i * K;
            const T w_i = g[0];
            const T* f = &ft[i * FT];
            const T* ri = R + i * Q;
            T gf[FT];
            T gw = 0;
            T* gr = grw.data();
            #pragma omp simd
            for (i64 s = 0; s < Q; ++s) gr[s] = gwt[s];
            for (int c = 0; c < FT; ++c) {
                const T fc = f[c];
                const T* gu = &gU[c * Q];
                T acc = 0;
                #pragma omp simd reduction(+ : acc)
                for (i64 s = 0; s < Q; ++s) {
                    gr[s] += gu[s] * fc;
                    acc += ri[s] * gu[s];
                }
                gf[c] = acc * w_i;
            }
            #pragma omp simd reduction(+ : gw)
            for (i64 s = 0; s < Q; ++s) gw += gr[s] * ri[s];
            gvirt[i] = 0;
            if (saved ? saved[S * Q + i] != T(0) : has_any[i] != 0) {
                // Softmax backward with everything taken relative to the most
                // responsible pair: mathematically the same (the logit
                // gradients sum to zero), but no cancellation of terms of
                // size |g| when the responsibilities are nearly one-hot.
                i64 top = 0;
                for (i64 s = 1; s < Q; ++s) if (ri[s] > ri[top]) top = s;
                const T* l = LL + i * Q;
                const T g_top = gr[top] * w_i, l_top = l[top];
                T dot = 0;
                #pragma omp simd reduction(+ : dot)
                for (i64 s = 0; s < Q; ++s) dot += s == top ? T(0) : ri[s] * (gr[s] * w_i - g_top);
                T gv = 0;
                T* gq = glogit.data();  // first the logit gradients, then those of the quadratic terms
                const T vi = virt[i];
                #pragma omp simd reduction(+ : gv)
                for (i64 s = 0; s < Q; ++s) {
                    const T gl = s == top ? -ri[s] * dot : ri[s] * ((gr[s] * w_i - g_top) - dot);
                    gv += s == top ? T(0) : gl * (l[s] - l_top);
                    const T gll = gl * vi;
                    glds[s] += T(-0.5) * gll;
                    glprior[s] += gl;
                    gq[s] = T(-0.5) * gll;
                }
                for (int c = 0; c < FT; ++c) {
                    const T fc = f[c];
                    const T* fsc = &fs[c * Q];
                    T* gfsc = &gfs[c * Q];
                    T acc = 0;
                    #pragma omp simd reduction(+ : acc)
                    for (i64 s = 0; s < Q; ++s) {
                        acc += gq[s] * fsc[s];
                        gfsc[s] += gq[s] * fc;
                    }
                    gf[c] += acc;
                }
                T* gk = &gfs[(DD + D) * Q];
                #pragma omp simd
                for (i64 s = 0; s < Q; ++s) gk[s] += gq[s];
                gvirt[i] = gv;
            }
            // Features -> parameters: f = (Sigma_i + m m^T, m), m = mu_i - centre (detached).
            T* gt = gtg + i * K;
            T m[D];
            for (int a = 0; a < D; ++a) m[a] = f[DD + a];
            for (int c = 0; c < DD; ++c) gt[1 + D + c] += gf[c];
            for (int a = 0; a < D; ++a) {
                T acc = gf[DD + a];
                for (int b = 0; b < D; ++b) acc += (gf[a * D + b] + gf[b * D + a]) * m[b];
                gt[1 + a] += acc;
            }
            gt[0] += gw;
        }
        // virtual_i = V |w_i| valid_i / divisor, divisor = total if total > 0.
        T gtotal = 0;
        for (i64 i = 0; i < S; ++i) gtotal -= gvirt[i] * virt[i] / divisor;
        if (!(total > T(0))) gtotal = 0;
        for (i64 i = 0; i < S; ++i) {
            const T gabs = T(st.virtual_points) * gvirt[i] / divisor + gtotal;
            gtg[i * K] += gabs * T(tv[i] ? 1 : 0) * sign(tg[i * K]);
        }
        // Fitting features -> parameters.
        for (i64 s = 0; s < Q; ++s) {
            const T* g = fit + s * K;
            T* gg = gfit + s * K;
            const T* A = &adj[s * DD];
            const T* m = &ms[s * D];
            const T* pm = &pmu[s * D];
            T P[DD], gP[DD], gPm[D];
            for (int c = 0; c < DD; ++c) { P[c] = fs[c * Q + s]; gP[c] = gfs[c * Q + s]; }
            for (int a = 0; a < D; ++a) gPm[a] = gfs[(DD + a) * Q + s];
            fitting_features_backward<T, D>(g, A, m, pm, P, gP, gPm, gfs[(DD + D) * Q + s], detc[s], det[s], glds[s],
                                            glprior[s], gg);
        }
    }
};

// Initial Gaussians of a node fit (node_fit.py's initial_gaussians): single
// linkage of the centroids into n_out clusters, the heaviest of each cluster,
// ordered by |w|.  order[Q] indexes the target rows, init_valid[Q].
template <typename T, int D>
void initial_gaussians(i64 S, i64 Q, const T* tg, const uint8_t* tv, i64 n_out, int* labels, T* magnitude,
                       int* order, uint8_t* init_valid, T* score) {
    constexpr int K = 1 + D + D * D;
    i64 remaining = 0;
    for (i64 i = 0; i < S; ++i) { labels[i] = (int)i; remaining += tv[i] ? 1 : 0; }
    const T inf = std::numeric_limits<T>::infinity();
    for (i64 step = 0; step + 1 < S && remaining > n_out; ++step) {
        T best = inf;
        i64 bi = -1, bj = -1;
        bool nan = false;
        for (i64 i = 0; i < S && !nan; ++i) {
            if (!tv[i]) continue;
            const bool si = tg[i * K] >= T(0);
            for (i64 j = 0; j < S; ++j) {
                if (j == i || !tv[j] || (tg[j * K] >= T(0)) != si || labels[i] == labels[j]) continue;
                T d = 0;
                for (int a = 0; a < D; ++a) {
                    const T diff = tg[i * K + 1 + a] - tg[j * K + 1 + a];
                    d += diff * diff;
                }
                if (std::isnan(d)) { nan = true; break; }  // torch's min returns NaN: no merge
                if (d < best) { best = d; bi = i; bj = j; }
            }
        }
        if (nan || bi < 0 || !(best < inf)) break;  // nothing may merge: the same in every later step
        const int li = labels[bi], lj = labels[bj];
        for (i64 k = 0; k < S; ++k)
            if (labels[k] == lj) labels[k] = li;
        --remaining;
    }
    for (i64 i = 0; i < S; ++i) magnitude[i] = tv[i] ? std::fabs(tg[i * K]) : T(-1);
    for (i64 i = 0; i < S; ++i) {
        bool beaten = false;
        if (tv[i])
            for (i64 j = 0; j < S && !beaten; ++j)
                beaten = tv[j] && labels[j] == labels[i] &&
                         (magnitude[j] > magnitude[i] || (magnitude[j] == magnitude[i] && j < i));
        score[i] = tv[i] && !beaten ? magnitude[i] : T(-1);
    }
    // Stable sort by descending score (torch.argsort(-score, stable=True)).
    for (i64 i = 0; i < S; ++i) order[i] = (int)i;
    // Insertion sort: stable, and no temporary buffer (std::stable_sort allocates one per call).
    for (i64 i = 1; i < S; ++i) {
        const int key = order[i];
        i64 j = i - 1;
        while (j >= 0 && -score[key] < -score[order[j]]) { order[j + 1] = order[j]; --j; }
        order[j + 1] = key;
    }
    for (i64 q = 0; q < Q; ++q) init_valid[q] = score[order[q]] >= T(0) && q < n_out;
}

// TreeHEM's node fit: fit_nodes, optionally passing a node with at most n_out
// valid Gaussians through unchanged (valid first, stable), as _build_tree does.
template <typename T, int D, int QC = 0>
struct NodeFit {
    static constexpr int K = 1 + D + D * D;
    EMStep<T, D, QC> em;
    std::vector<int> labels, order;
    std::vector<T> magnitude, score, init, ginit;
    std::vector<uint8_t> init_valid;

    void resize(i64 S, i64 Q, bool backward) {
        if (em.S != S || em.Q != Q || (backward && em.r.size() < size_t(S * Q))) em.resize(S, Q, backward);
        labels.resize(S); order.resize(S); magnitude.resize(S); score.resize(S);
        init.resize(Q * K); ginit.resize(Q * K); init_valid.resize(Q);
    }

    // A node fit's saved state: passed (0 or 1), order [Q], init_valid [Q], then the E step's.
    static i64 state_size(i64 S, i64 Q) { return 1 + 2 * Q + EMStep<T, D>::state_size(S, Q); }

    void save_selection(bool passed, i64 Q, T* state) const {
        state[0] = passed ? T(1) : T(0);
        for (i64 q = 0; q < Q; ++q) {
            state[1 + q] = T(order[q]);
            state[1 + Q + q] = T(init_valid[q]);
        }
    }

    // select() from a saved state: the same order (its first Q rows), init_valid and init.
    bool load_selection(i64 Q, const T* tg, const T* state) {
        for (i64 q = 0; q < Q; ++q) {
            order[q] = (int)state[1 + q];
            init_valid[q] = state[1 + Q + q] != T(0);
        }
        if (state[0] != T(0)) return true;
        for (i64 q = 0; q < Q; ++q) std::memcpy(&init[q * K], tg + order[q] * K, sizeof(T) * K);
        return false;
    }

    // Returns true when the node is passed through (order holds the rows).
    bool select(i64 S, i64 Q, const T* tg, const uint8_t* tv, i64 n_out, bool pass_through) {
        i64 count = 0;
        for (i64 i = 0; i < S; ++i) count += tv[i] ? 1 : 0;
        if (pass_through && count <= n_out) {
            i64 k = 0;
            for (i64 i = 0; i < S; ++i) if (tv[i]) order[k++] = (int)i;
            for (i64 i = 0; i < S; ++i) if (!tv[i]) order[k++] = (int)i;
            return true;
        }
        initial_gaussians<T, D>(S, Q, tg, tv, n_out, labels.data(), magnitude.data(), order.data(),
                                init_valid.data(), score.data());
        for (i64 q = 0; q < Q; ++q) std::memcpy(&init[q * K], tg + order[q] * K, sizeof(T) * K);
        return false;
    }
};

#include "mem_kernel.h"  // SparseEM, SparseEMWork, MEMWork: pasted in here by native.py

template <typename T, int D>
struct NodeWork {
    struct Scratch { NodeFit<T, D> node; };
    i64 S, Q;
    const T* tg; const uint8_t* tv; const i64* n_out;
    Settings st;
    int pass_through;
    T* out; uint8_t* out_valid;
    const T* gout; T* gtg;
    void operator()(i64 p, Scratch& sc) const {
        constexpr int K = 1 + D + D * D;
        NodeFit<T, D>& nf = sc.node;
        nf.resize(S, Q, gout != nullptr);
        const T* t = tg + p * S * K;
        const uint8_t* v = tv + p * S;
        const bool passed = nf.select(S, Q, t, v, n_out[p], pass_through != 0);
        if (!gout) {
            T* o = out + p * Q * K;
            uint8_t* ov = out_valid + p * Q;
            if (passed) {
                for (i64 q = 0; q < Q; ++q) {
                    std::memcpy(o + q * K, t + nf.order[q] * K, sizeof(T) * K);
                    ov[q] = v[nf.order[q]];
                }
            } else {
                nf.em.forward(t, v, nf.init.data(), nf.init_valid.data(), st, o, ov, false, nf.order.data());
            }
            return;
        }
        const T* go = gout + p * Q * K;
        T* gt = gtg + p * S * K;
        if (passed) {
            for (i64 q = 0; q < Q; ++q)
                for (int c = 0; c < K; ++c) gt[nf.order[q] * K + c] += go[q * K + c];
            return;
        }
        std::fill(nf.ginit.begin(), nf.ginit.end(), T(0));
        nf.em.backward(t, v, nf.init.data(), nf.init_valid.data(), st, go, gt, nf.ginit.data(), nf.order.data());
        for (i64 q = 0; q < Q; ++q)
            for (int c = 0; c < K; ++c) gt[nf.order[q] * K + c] += nf.ginit[q * K + c];
    }
};

// TreeHEM (treehem.py's _sorted_leaves after the Morton argsort, _build_tree
// and _reduce_flat), one mixture per loop iteration.
//
// Bottom-up: a complete binary tree in heap order (root 0, children 2j+1 and
// 2j+2; the last L nodes are the sorted leaves, T Gaussians each).  Every
// internal node of the active prefix of its level fits its children's 2T
// Gaussians to T (or passes at most T through); the nodes right of that
// prefix hold nothing (weight 0, position 0, identity covariance), as the
// PyTorch reference pads them.
//
// Top-down: the greedy cut in closed form (keys made monotone, the internal
// nodes expanded in the order of decreasing key while the Gaussian count
// stays <= n_out), the node that would overshoot partially expanded by one
// more node fit, and the first n_out candidates (valid ones first, in heap
// order, then the partial fit's) gathered into the output.  chosen[g, r] is
// the candidate index of output row r (node row j*T+t, or (2L-1)*T + p for
// row p of the partial fit); partial[g] = (node, Gaussian count) or (-1, 0).
// QN, QP: the node fits' and the partial fit's Q (T and 2T) as compile-time constants, or 0.
template <typename T, int D, int QN = 0, int QP = 0>
struct TreeHEMWork {
    static constexpr int K = 1 + D + D * D;
    struct Scratch {
        NodeFit<T, D, QN> node;
        NodeFit<T, D, QP> partial_fit;
        std::vector<T> grad, key, partial_out, gpartial;
        std::vector<i64> counts, order, rank, totals;
        std::vector<uint8_t> expanded, partial_valid, selected;
    };
    i64 L, Tn, n_valid, n_out;
    Settings st;
    i64 N;                       // Gaussians per input mixture
    const T* m; const uint8_t* m_valid; const i64* m_order;  // [G, N, K], [G, N], Morton order [G, N]
    T* nodes; uint8_t* valid;    // [G, 2L-1, T, K], [G, 2L-1, T]
    int32_t* chosen; i64* partial;
    T* out; uint8_t* out_valid;  // [G, n_out, K], [G, n_out]
    const T* gout; T* gm;        // backward: [G, n_out, K] -> [G, N, K]
    T* state;                    // [G, state_size()] written by forward, read by backward; or null

    // Per mixture: the L-1 internal nodes' fits, then the partial fit's.
    i64 node_state() const { return NodeFit<T, D>::state_size(2 * Tn, Tn); }
    i64 state_size() const { return (L - 1) * node_state() + NodeFit<T, D>::state_size(2 * Tn, 2 * Tn); }

    // The leaves: the mixture's Gaussians in Morton order, then padding up to
    // L*T slots (weight 0 at the mean position, identity covariance, invalid), as
    // the reference's take() and gm.pad() build them.
    void fill_leaves(i64 g, T* nd, uint8_t* vd) const {
        const T* mg = m + g * N * K;
        const i64* order = m_order + g * N;
        T* leaves = nd + (L - 1) * Tn * K;
        uint8_t* leaves_valid = vd + (L - 1) * Tn;
        T mean[D];
        for (int a = 0; a < D; ++a) mean[a] = 0;
        for (i64 i = 0; i < N; ++i)
            for (int a = 0; a < D; ++a) mean[a] += mg[i * K + 1 + a];
        for (int a = 0; a < D; ++a) mean[a] /= T(N);
        for (i64 r = 0; r < L * Tn; ++r) {
            T* row = leaves + r * K;
            if (r < N) {
                std::memcpy(row, mg + order[r] * K, sizeof(T) * K);
                leaves_valid[r] = m_valid[g * N + order[r]];
                continue;
            }
            std::memset(row, 0, sizeof(T) * K);
            for (int a = 0; a < D; ++a) row[1 + a] = mean[a];
            for (int a = 0; a < D; ++a) row[1 + D + a * D + a] = T(1);
            leaves_valid[r] = 0;
        }
    }

    // Levels top-down: first heap index and active count of each.
    void levels(std::vector<i64>& first, std::vector<i64>& active) const {
        first.clear(); active.clear();
        i64 count = 1, start = 0, span = Tn * L;
        while (count < L) {
            first.push_back(start);
            const i64 need = (n_valid + span - 1) / span;
            active.push_back(std::min(count, std::max<i64>(1, need)));
            start += count; count *= 2; span /= 2;
        }
    }

    void build(T* nd, uint8_t* vd, NodeFit<T, D, QN>& nf, T* sg) const {
        const i64 S = 2 * Tn, Q = Tn;
        std::vector<i64> first, active;
        levels(first, active);
        for (i64 level = (i64)first.size() - 1; level >= 0; --level) {
            const i64 count = i64(1) << level;
            for (i64 t = 0; t < count; ++t) {
                const i64 j = first[level] + t;
                T* o = nd + j * Tn * K;
                uint8_t* ov = vd + j * Tn;
                if (t >= active[level]) {
                    for (i64 q = 0; q < Q; ++q) {
                        std::memset(o + q * K, 0, sizeof(T) * K);
                        for (int a = 0; a < D; ++a) o[q * K + 1 + D + a * D + a] = T(1);
                        ov[q] = 0;
                    }
                    continue;
                }
                const T* children = nd + (2 * j + 1) * Tn * K;
                const uint8_t* cv = vd + (2 * j + 1) * Tn;
                T* sj = sg ? sg + j * node_state() : nullptr;
                const bool passed = nf.select(S, Q, children, cv, Tn, true);
                if (sj) nf.save_selection(passed, Q, sj);
                if (passed) {
                    for (i64 q = 0; q < Q; ++q) {
                        std::memcpy(o + q * K, children + nf.order[q] * K, sizeof(T) * K);
                        ov[q] = cv[nf.order[q]];
                    }
                } else {
                    T* se = sj ? sj + 1 + 2 * Q : nullptr;
                    nf.em.forward(children, cv, nf.init.data(), nf.init_valid.data(), st, o, ov, false, nf.order.data(),
                                  se, se ? se + EMStep<T, D>::r_state_size(S, Q) : nullptr);
                }
            }
        }
    }

    // gr [2L-1, T, K] holds the gradient of the node caches; propagated down to the leaves in place.
    void build_backward(const T* nd, const uint8_t* vd, T* gr, NodeFit<T, D, QN>& nf, const T* sg) const {
        const i64 S = 2 * Tn, Q = Tn;
        std::vector<i64> first, active;
        levels(first, active);
        for (i64 level = 0; level < (i64)first.size(); ++level) {
            for (i64 t = 0; t < active[level]; ++t) {
                const i64 j = first[level] + t;
                const T* children = nd + (2 * j + 1) * Tn * K;
                const uint8_t* cv = vd + (2 * j + 1) * Tn;
                fit_backward(nf, S, Q, children, cv, Tn, true, gr + j * Tn * K, gr + (2 * j + 1) * Tn * K,
                             sg ? sg + j * node_state() : nullptr);
            }
        }
    }

    // saved: the fit's state from forward (then nothing of its forward is redone but the cheap part), or null.
    template <int QF>
    void fit_backward(NodeFit<T, D, QF>& nf, i64 S, i64 Q, const T* tg, const uint8_t* tv, i64 count,
                      bool pass_through, const T* go, T* gt, const T* saved) const {
        const bool passed = saved ? nf.load_selection(Q, tg, saved) : nf.select(S, Q, tg, tv, count, pass_through);
        if (passed) {
            for (i64 q = 0; q < Q; ++q)
                for (int c = 0; c < K; ++c) gt[nf.order[q] * K + c] += go[q * K + c];
            return;
        }
        std::fill(nf.ginit.begin(), nf.ginit.end(), T(0));
        const T* se = saved ? saved + 1 + 2 * Q : nullptr;
        nf.em.backward(tg, tv, nf.init.data(), nf.init_valid.data(), st, go, gt, nf.ginit.data(), nf.order.data(),
                       se, se ? se + EMStep<T, D>::r_state_size(S, Q) : nullptr);
        for (i64 q = 0; q < Q; ++q)
            for (int c = 0; c < K; ++c) gt[nf.order[q] * K + c] += nf.ginit[q * K + c];
    }

    // The cut: fills chosen[n_out] and partial[2] of one mixture.
    void cut(const T* nd, const uint8_t* vd, Scratch& sc, int32_t* ch, i64* part) const {
        const i64 n_nodes = 2 * L - 1, n_internal = L - 1;
        sc.counts.resize(n_nodes); sc.key.resize(n_nodes);
        for (i64 j = 0; j < n_nodes; ++j) {
            i64 c = 0;
            T k = 0;
            for (i64 t = 0; t < Tn; ++t) {
                c += vd[j * Tn + t] ? 1 : 0;
                k += std::fabs(nd[(j * Tn + t) * K]) * T(vd[j * Tn + t] ? 1 : 0);
            }
            sc.counts[j] = c; sc.key[j] = k;
        }
        for (i64 j = 1; j < n_nodes; ++j) {  // monotone keys (parents come first in heap order)
            const T parent = sc.key[(j - 1) / 2];
            if (std::isnan(parent) || parent < sc.key[j]) sc.key[j] = parent;
        }
        sc.order.resize(n_internal);
        for (i64 j = 0; j < n_internal; ++j) sc.order[j] = j;
        // torch.argsort(-key, stable=True): ascending -key, NaN last.
        std::stable_sort(sc.order.begin(), sc.order.end(), [&](i64 x, i64 y) {
            const T a = -sc.key[x], b = -sc.key[y];
            if (std::isnan(b)) return !std::isnan(a);
            return a < b;
        });
        sc.totals.resize(n_internal + 1);
        sc.totals[0] = sc.counts[0];
        for (i64 k = 0; k < n_internal; ++k) {
            const i64 j = sc.order[k];
            sc.totals[k + 1] = sc.totals[k] + sc.counts[2 * j + 1] + sc.counts[2 * j + 2] - sc.counts[j];
        }
        i64 fit = 0;
        for (i64 k = 0; k <= n_internal; ++k) fit += sc.totals[k] <= n_out ? 1 : 0;
        const i64 n_expanded = std::max<i64>(fit - 1, 0);
        const i64 current = sc.totals[n_expanded];
        const bool has_partial = current != n_out && n_expanded < n_internal;
        const i64 partial_node = sc.order[std::min(n_expanded, n_internal - 1)];
        sc.rank.resize(n_internal);
        for (i64 k = 0; k < n_internal; ++k) sc.rank[sc.order[k]] = k;
        sc.expanded.assign(n_nodes, 0);
        for (i64 j = 0; j < n_internal; ++j) sc.expanded[j] = sc.rank[j] < n_expanded;
        part[0] = has_partial ? partial_node : -1;
        part[1] = has_partial ? n_out - current + sc.counts[partial_node] : 0;
        // Candidates: selected node rows (frontier, not the partial node), then the partial fit's rows.
        i64 r = 0;
        const i64 node_rows = n_nodes * Tn;
        sc.selected.resize(node_rows);
        for (i64 j = 0; j < n_nodes; ++j) {
            const bool parent_expanded = j == 0 || sc.expanded[(j - 1) / 2];
            const bool frontier = !sc.expanded[j] && parent_expanded && !(has_partial && j == partial_node);
            for (i64 t = 0; t < Tn; ++t) {
                const bool sel = frontier && vd[j * Tn + t];
                sc.selected[j * Tn + t] = sel;
                if (sel && r < n_out) ch[r++] = (int32_t)(j * Tn + t);
            }
        }
        const i64 partial_rows = 2 * Tn;
        if (has_partial)
            for (i64 p = 0; p < partial_rows && r < n_out; ++p)
                if (sc.partial_valid[p]) ch[r++] = (int32_t)(node_rows + p);
        for (i64 x = 0; x < node_rows && r < n_out; ++x)  // fillers (weight 0), as compact() takes them
            if (!sc.selected[x]) ch[r++] = (int32_t)x;
    }

    void operator()(i64 g, Scratch& sc) const {
        const i64 n_nodes = 2 * L - 1, S = 2 * Tn;
        sc.node.resize(S, Tn, gout != nullptr);
        sc.partial_fit.resize(S, S, gout != nullptr);
        T* nd = nodes + g * n_nodes * Tn * K;
        uint8_t* vd = valid + g * n_nodes * Tn;
        int32_t* ch = chosen + g * n_out;
        i64* part = partial + 2 * g;
        sc.partial_out.resize(S * K);
        sc.partial_valid.assign(S, 0);
        T* sg = state ? state + g * state_size() : nullptr;
        T* sp = sg ? sg + (L - 1) * node_state() : nullptr;  // the partial fit's
        if (!gout) {
            fill_leaves(g, nd, vd);
            build(nd, vd, sc.node, sg);
            // The partial node is known only after the cut, whose candidate list needs the
            // partial fit's validity: cut once for the node, fit, then list the candidates.
            cut(nd, vd, sc, ch, part);
            if (part[0] >= 0) {
                const T* children = nd + (2 * part[0] + 1) * Tn * K;
                const uint8_t* cv = vd + (2 * part[0] + 1) * Tn;
                NodeFit<T, D, QP>& pf = sc.partial_fit;
                pf.select(S, S, children, cv, part[1], false);
                if (sp) pf.save_selection(false, S, sp);
                T* se = sp ? sp + 1 + 2 * S : nullptr;
                pf.em.forward(children, cv, pf.init.data(), pf.init_valid.data(), st, sc.partial_out.data(),
                              sc.partial_valid.data(), false, pf.order.data(), se,
                              se ? se + EMStep<T, D>::r_state_size(S, S) : nullptr);
                cut(nd, vd, sc, ch, part);
            }
            T* o = out + g * n_out * K;
            uint8_t* ov = out_valid + g * n_out;
            for (i64 r = 0; r < n_out; ++r) {
                const i64 x = ch[r];
                const bool from_partial = x >= n_nodes * Tn;
                const T* src = from_partial ? &sc.partial_out[(x - n_nodes * Tn) * K] : nd + x * K;
                ov[r] = from_partial ? sc.partial_valid[x - n_nodes * Tn] : sc.selected[x];
                std::memcpy(o + r * K, src, sizeof(T) * K);
                if (!ov[r]) o[r * K] = T(0);
            }
            return;
        }
        sc.grad.assign(n_nodes * Tn * K, T(0));
        sc.gpartial.assign(S * K, T(0));
        const T* go = gout + g * n_out * K;
        const uint8_t* ov = out_valid + g * n_out;
        for (i64 r = 0; r < n_out; ++r) {
            const i64 x = ch[r];
            T* dst = x >= n_nodes * Tn ? &sc.gpartial[(x - n_nodes * Tn) * K] : &sc.grad[x * K];
            if (ov[r]) dst[0] += go[r * K];  // a filler's weight is the constant 0
            for (int c = 1; c < K; ++c) dst[c] += go[r * K + c];
        }
        if (part[0] >= 0) {
            const T* children = nd + (2 * part[0] + 1) * Tn * K;
            const uint8_t* cv = vd + (2 * part[0] + 1) * Tn;
            fit_backward(sc.partial_fit, S, S, children, cv, part[1], false, sc.gpartial.data(),
                         sc.grad.data() + (2 * part[0] + 1) * Tn * K, sp);
        }
        build_backward(nd, vd, sc.grad.data(), sc.node, sg);
        // Leaves -> input rows (a permutation; the padding is constant).
        const T* gl = sc.grad.data() + (L - 1) * Tn * K;
        const i64* order = m_order + g * N;
        T* gmg = gm + g * N * K;
        for (i64 r = 0; r < N; ++r) std::memcpy(gmg + order[r] * K, gl + r * K, sizeof(T) * K);
    }
};

// TreeHEM with its fits' Q fixed at compile time for the common T = 2 and T = 4.
template <typename T, int D, typename... Fields>
void run_treehem(i64 G, i64 Tn, int threads, Fields... fields) {
    if (Tn == 2)
        for_each_problem(G, 1, threads, TreeHEMWork<T, D, 2, 4>{fields...});
    else if (Tn == 4)
        for_each_problem(G, 1, threads, TreeHEMWork<T, D, 4, 8>{fields...});
    else
        for_each_problem(G, 1, threads, TreeHEMWork<T, D>{fields...});
}

#include "morton_kernel.h"  // morton_order: TreeHEM's sort; pasted in here by native.py

}  // namespace

INSTANTIATE_MORTON(float, 2, f32_2)
INSTANTIATE_MORTON(float, 3, f32_3)
INSTANTIATE_MORTON(double, 2, f64_2)
INSTANTIATE_MORTON(double, 3, f64_3)

#define INSTANTIATE(T, D, SUFFIX)                                                                       \
extern "C" void em_step_forward_##SUFFIX(i64 M, i64 S, i64 Q, const T* tg, const uint8_t* tv,           \
        const T* fit, const uint8_t* fv, double vp, int use_kl, double kl, T* out, uint8_t* ov,        \
        int save, void** pairs, i64* pair_count, int threads) {                                         \
    PairLists<T>* lists = save ? new PairLists<T>(M) : nullptr;                                         \
    SparseEMWork<T, D> w{S, Q, tg, tv, fit, fv, {vp, use_kl, kl}, out, ov, lists, nullptr, nullptr,     \
                         nullptr, nullptr, nullptr, nullptr};                                           \
    for_each_problem(M, S * Q >= 4096 ? 1 : 64, threads, w);                                             \
    *pairs = lists;                                                                                     \
    *pair_count = lists ? lists->count() : 0;                                                           \
}                                                                                                       \
extern "C" void em_step_backward_##SUFFIX(i64 M, i64 S, i64 Q, const T* tg, const uint8_t* tv,          \
        const T* fit, const uint8_t* fv, double vp, int use_kl, double kl, const T* gout, T* gtg,      \
        T* gfit, const int32_t* idx, const T* val, const i64* offsets, int threads) {                   \
    advise_huge_pages(gtg, sizeof(T) * M * S * (1 + D + D * D));                                        \
    std::memset(gtg, 0, sizeof(T) * M * S * (1 + D + D * D));                                           \
    std::memset(gfit, 0, sizeof(T) * M * Q * (1 + D + D * D));                                          \
    SparseEMWork<T, D> w{S, Q, tg, tv, fit, fv, {vp, use_kl, kl}, nullptr, nullptr, nullptr, gout, gtg,  \
                         gfit, idx, val, offsets};                                                      \
    for_each_problem(M, S * Q >= 4096 ? 1 : 64, threads, w);                                             \
}                                                                                                       \
extern "C" void pairs_take_##SUFFIX(void* pairs, int32_t* idx, T* val, i64* offsets) {                 \
    PairLists<T>* lists = static_cast<PairLists<T>*>(pairs);                                            \
    lists->take(idx, val, offsets);                                                                     \
    delete lists;                                                                                       \
}                                                                                                       \
extern "C" void pairs_free_##SUFFIX(void* pairs) { delete static_cast<PairLists<T>*>(pairs); }         \
extern "C" void mem_forward_##SUFFIX(i64 G, i64 N, i64 n_out, const T* m, double vp, int use_kl,       \
        double kl, double weight_threshold, int normalize, T* out, uint8_t* ov, T* factor,              \
        int32_t* chosen, int save, void** pairs, i64* pair_count, int threads) {                       \
    PairLists<T>* lists = save ? new PairLists<T>(G) : nullptr;                                         \
    MEMWork<T, D> w{N, n_out, m, {vp, use_kl, kl}, T(weight_threshold), normalize, out, ov, factor,     \
                    chosen, lists, nullptr, nullptr, nullptr, nullptr, nullptr};                        \
    for_each_problem(G, 1, threads, w);                                                                 \
    *pairs = lists;                                                                                     \
    *pair_count = lists ? lists->count() : 0;                                                           \
}                                                                                                       \
extern "C" void mem_backward_##SUFFIX(i64 G, i64 N, i64 n_out, const T* m, double vp, int use_kl,      \
        double kl, double weight_threshold, int normalize, const uint8_t* ov, const T* factor,          \
        const int32_t* chosen, const T* gout, T* gm, const int32_t* idx, const T* val,                  \
        const i64* offsets, int threads) {                                                              \
    advise_huge_pages(gm, sizeof(T) * G * N * (1 + D + D * D));                                         \
    MEMWork<T, D> w{N, n_out, m, {vp, use_kl, kl}, T(weight_threshold), normalize, nullptr,              \
                    const_cast<uint8_t*>(ov), const_cast<T*>(factor), const_cast<int32_t*>(chosen),     \
                    nullptr, gout, gm, idx, val, offsets};                                              \
    for_each_problem(G, 1, threads, w);                                                                 \
}                                                                                                       \
extern "C" void fit_nodes_forward_##SUFFIX(i64 M, i64 S, i64 Q, const T* tg, const uint8_t* tv,         \
        const i64* n_out, double vp, int use_kl, double kl, int pass_through, T* out, uint8_t* ov,     \
        int threads) {                                                                                  \
    NodeWork<T, D> w{S, Q, tg, tv, n_out, {vp, use_kl, kl}, pass_through, out, ov, nullptr, nullptr};   \
    for_each_problem(M, 64, threads, w);                                                                \
}                                                                                                       \
extern "C" void fit_nodes_backward_##SUFFIX(i64 M, i64 S, i64 Q, const T* tg, const uint8_t* tv,        \
        const i64* n_out, double vp, int use_kl, double kl, int pass_through, const T* gout, T* gtg,   \
        int threads) {                                                                                  \
    std::memset(gtg, 0, sizeof(T) * M * S * (1 + D + D * D));                                           \
    NodeWork<T, D> w{S, Q, tg, tv, n_out, {vp, use_kl, kl}, pass_through, nullptr, nullptr, gout, gtg}; \
    for_each_problem(M, 64, threads, w);                                                                \
}                                                                                                       \
extern "C" void treehem_forward_##SUFFIX(i64 G, i64 N, i64 L, i64 Tn, i64 n_valid, i64 n_out,        \
        double vp, int use_kl, double kl, const T* m, const uint8_t* m_valid, const i64* m_order,       \
        T* nodes, uint8_t* valid, int32_t* chosen, i64* partial, T* out, uint8_t* out_valid,            \
        T* state, int threads) {                                                                         \
    advise_huge_pages(nodes, sizeof(T) * G * (2 * L - 1) * Tn * (1 + D + D * D));                        \
    if (state) advise_huge_pages(state, sizeof(T) * G * TreeHEMWork<T, D>{L, Tn}.state_size());          \
    run_treehem<T, D>(G, Tn, threads, L, Tn, n_valid, n_out, Settings{vp, use_kl, kl}, N, m, m_valid,    \
                      m_order, nodes, valid, chosen, partial, out, out_valid, (const T*)nullptr, (T*)nullptr, \
                      state);                                                                            \
}                                                                                                        \
extern "C" void treehem_backward_##SUFFIX(i64 G, i64 N, i64 L, i64 Tn, i64 n_valid, i64 n_out,       \
        double vp, int use_kl, double kl, const i64* m_order, const T* nodes, const uint8_t* valid,     \
        const int32_t* chosen, const i64* partial, const uint8_t* out_valid, const T* gout, T* gm,      \
        const T* state, int threads) {                                                                   \
    advise_huge_pages(gm, sizeof(T) * G * N * (1 + D + D * D));                                          \
    std::memset(gm, 0, sizeof(T) * G * N * (1 + D + D * D));                                             \
    run_treehem<T, D>(G, Tn, threads, L, Tn, n_valid, n_out, Settings{vp, use_kl, kl}, N, (const T*)nullptr, \
                      (const uint8_t*)nullptr, m_order, const_cast<T*>(nodes), const_cast<uint8_t*>(valid),  \
                      const_cast<int32_t*>(chosen), const_cast<i64*>(partial), (T*)nullptr,              \
                      const_cast<uint8_t*>(out_valid), gout, gm, const_cast<T*>(state));                 \
}

INSTANTIATE(float, 2, f32_2)
INSTANTIATE(float, 3, f32_3)
INSTANTIATE(double, 2, f64_2)
INSTANTIATE(double, 3, f64_3)
