// MEM's E and M step (em.py's em_step) and the whole MEM reduction (mem.py:
// pre-scaling, initial-Gaussian choice, E+M step, masks, scaling back), one
// problem per loop iteration.  Pasted by native.py into node_fit_kernel.cpp,
// inside its anonymous namespace (it uses Inverse, Settings, tiny() from there).
//
// Unlike TreeHEM's node fits (EMStep, Q <= 2T), a MEM problem compares every
// one of S target Gaussians with Q fitting ones (2560 x 32 in the benchmark).
// Two things make it cheap:
// * the pair terms of one target row are computed in blocks of W fitting
//   Gaussians (one vector register), every feature accumulated in registers;
// * the KL gate allows few pairs per row (about one on random layer outputs,
//   where half of the rows also have weight 0), so the responsibilities are
//   kept sparse: only the pairs with r != 0 enter the M-step sums, the saved
//   state (row, s, r, log-likelihood per pair) and the chain rule.  A pair
//   with r = 0 contributes exactly nothing to any sum or gradient (every term
//   carries a factor r), so this is the dense computation, not an approximation.

// The loops over the W lanes of a block: vectorised (GCC otherwise unrolls them into W scalar registers).
#define LANES _Pragma("omp simd")

template <typename T, int D>
struct SparseEM {
    static constexpr int K = 1 + D + D * D, DD = D * D;
    static constexpr int FT = DD + D;      // target features: Sigma_i + m_i m_i^T (row-major), m_i
    static constexpr int FS = DD + D + 1;  // fitting features: P_s, -2 P_s m_s, m_s^T P_s m_s
    static constexpr int W = 64 / int(sizeof(T));  // fitting Gaussians per block: one 512-bit register

    i64 S = 0, Q = 0, Qp = 0;  // Qp: Q rounded up to W; the padding is invalid and never allowed
    T centre[D];
    T divisor = 1;
    bool has_total = false;
    // fitting features by block [FS][Qp] (forward) and by Gaussian [Q][FS] (backward)
    std::vector<T> fs, fsq, adj, detc, det, lds, lprior, ms, pmu;
    std::vector<T> fval, fsign;  // validity and sign >= 0 of the fitting Gaussians (0 or 1; padding 0)
    std::vector<T> U, ws;  // M-step sums [Q][FT], [Q]
    std::vector<T> lg, kd, ll, ex, cand, al;  // one row's logits, KL, log-likelihoods, exponentials, masks [Qp]
    std::vector<int32_t> pairs_s;  // one row's pairs with r != 0: s and r [Q], n_pairs of them
    std::vector<T> pairs_r;
    i64 n_pairs = 0;
    std::vector<T> gU, gwt, gfs, glds, glprior, gvirt, grow;  // backward: [Q][FT], [Q], [Q][FS], [Q], [Q], [S], [Q]

    void resize(i64 s, i64 q) {
        S = s; Q = q; Qp = (q + W - 1) / W * W;
        fs.assign(FS * Qp, T(0)); fsq.resize(Q * FS); adj.resize(Q * DD); detc.resize(Q); det.resize(Q);
        lds.assign(Qp, T(0)); lprior.assign(Qp, T(0)); ms.resize(Q * D); pmu.resize(Q * D);
        fval.assign(Qp, T(0)); fsign.assign(Qp, T(0));
        U.resize(Q * FT); ws.resize(Q);
        lg.resize(Qp); kd.resize(Qp); ll.resize(Qp); ex.resize(Qp); cand.resize(Qp); al.resize(Qp);
        pairs_s.resize(Q); pairs_r.resize(Q);
        gU.resize(Q * FT); gwt.resize(Q); gfs.resize(Q * FS); glds.resize(Q); glprior.resize(Q); gvirt.resize(S);
        grow.resize(Q);
    }

    // The problem's centre (mean of all target positions, detached in the reference), the
    // virtual-sample divisor and the fitting features; with logs false the log determinants
    // and log priors (read by the E step only) are left out.
    void prepare(const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, bool logs) {
        for (int a = 0; a < D; ++a) centre[a] = 0;
        for (i64 i = 0; i < S; ++i)
            for (int a = 0; a < D; ++a) centre[a] += tg[i * K + 1 + a];
        for (int a = 0; a < D; ++a) centre[a] /= T(S);
        T total = 0;
        for (i64 i = 0; i < S; ++i) total += std::fabs(tg[i * K]) * T(tv[i] ? 1 : 0);
        has_total = total > T(0);
        divisor = has_total ? total : T(1);
        for (i64 s = 0; s < Q; ++s) {
            const T* g = fit + s * K;
            T* A = &adj[s * DD];
            det[s] = Inverse<T, D>::adjugate(g + 1 + D, A);
            detc[s] = clamp_tiny(det[s]);
            if (logs) {
                lds[s] = std::log(detc[s]);
                lprior[s] = std::log(clamp_tiny(std::fabs(g[0])));
            }
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
            T* fq = &fsq[s * FS];
            for (int f = 0; f < DD; ++f) fq[f] = P[f];
            for (int a = 0; a < D; ++a) fq[DD + a] = T(-2) * pm[a];
            fq[DD + D] = k;
            for (int c = 0; c < FS; ++c) fs[c * Qp + s] = fq[c];
            fval[s] = fv[s] ? T(1) : T(0);
            fsign[s] = g[0] >= T(0) ? T(1) : T(0);
        }
    }

    // Target row features f[FT] from its K values (m = mu - centre).
    void features(const T* g, T* f) const {
        T m[D];
        for (int a = 0; a < D; ++a) m[a] = g[1 + a] - centre[a];
        for (int a = 0; a < D; ++a)
            for (int b = 0; b < D; ++b) f[a * D + b] = g[1 + D + a * D + b] + m[a] * m[b];
        for (int a = 0; a < D; ++a) f[DD + a] = m[a];
    }

    T virtual_count(const T* g, const Settings& st) const { return T(st.virtual_points) * std::fabs(g[0]) / divisor; }

    // The E step of one valid target row: its pairs with r != 0 into pair_s, pair_r
    // (n_pairs of them, s ascending), log-likelihoods of all pairs into ll; returns whether
    // any pair is allowed (else r is 0 for the whole row).  Every array is read
    // through a local restrict pointer and the masks are values of type T (0 or 1): uint8
    // stores may alias anything, and GCC then reloads the vectors' data pointers in every
    // iteration instead of vectorising.
    bool row(const T* g, const T* f, const Settings& st) {
        const T log2pi_d = T(D * 1.8378770664093454835606594728112);  // D log(2 pi)
        const T inf = std::numeric_limits<T>::infinity();
        const T vi = virtual_count(g, st);
        const T ldi = log_det_clamped<T, D>(g + 1 + D);
        const T sign_i = g[0] >= T(0) ? T(1) : T(0);
        const T* __restrict fsp = fs.data();
        const T* __restrict ldp = lds.data();
        const T* __restrict lpp = lprior.data();
        const T* __restrict fvp = fval.data();
        const T* __restrict fsg = fsign.data();
        T* __restrict lgp = lg.data();
        T* __restrict kdp = kd.data();
        T* __restrict llp = ll.data();
        T* __restrict cdp = cand.data();
        T* __restrict alp = al.data();
        T* __restrict exp_ = ex.data();
        int32_t* __restrict pair_s = pairs_s.data();
        T* __restrict pair_r = pairs_r.data();
        const i64 Qp_ = Qp;
        T fl[FT];
        for (int c = 0; c < FT; ++c) fl[c] = f[c];
        T any_c[W];
        LANES for (int l = 0; l < W; ++l) any_c[l] = 0;
        for (i64 b = 0; b < Qp_; b += W) {
            T q[W];
            LANES for (int l = 0; l < W; ++l) q[l] = fsp[FT * Qp_ + b + l];
            for (int c = 0; c < FT; ++c)
                LANES for (int l = 0; l < W; ++l) q[l] += fl[c] * fsp[c * Qp_ + b + l];
            LANES for (int l = 0; l < W; ++l) {
                const T ld = ldp[b + l];
                const T lv = T(-0.5) * ((q[l] + ld) + log2pi_d);
                lgp[b + l] = vi * lv + lpp[b + l];
                kdp[b + l] = T(0.5) * (((q[l] - T(D)) - ldi) + ld);
                llp[b + l] = lv;
                const T c = fsg[b + l] == sign_i ? fvp[b + l] : T(0);
                cdp[b + l] = c;
                any_c[l] = any_c[l] > c ? any_c[l] : c;
            }
        }
        T any_candidate = 0;
        for (int l = 0; l < W; ++l) any_candidate = any_candidate > any_c[l] ? any_candidate : any_c[l];
        // Gates (no gradient), as EMStep::row: the first minimum of KL among the candidates
        // (a NaN wins, as torch.argmin) is always allowed, the others below the threshold.
        // Per lane: its smallest value and where it first occurs, where its first NaN is.
        const T* __restrict cd = any_candidate > T(0) ? cdp : fvp;
        const T nowhere = T(Qp_);
        T low[W], low_at[W], nan_at[W];
        LANES for (int l = 0; l < W; ++l) { low[l] = inf; low_at[l] = T(l); nan_at[l] = nowhere; }
        for (i64 b = 0; b < Qp_; b += W)
            LANES for (int l = 0; l < W; ++l) {
                const T v = cd[b + l] > T(0) ? kdp[b + l] : inf;
                const T at = T(b + l);
                nan_at[l] = (v != v && nan_at[l] == nowhere) ? at : nan_at[l];
                low_at[l] = v < low[l] ? at : low_at[l];
                low[l] = v < low[l] ? v : low[l];
            }
        T lowest = inf, first_nan = nowhere;
        for (int l = 0; l < W; ++l) {
            lowest = low[l] < lowest ? low[l] : lowest;
            first_nan = nan_at[l] < first_nan ? nan_at[l] : first_nan;
        }
        T best_at = nowhere;
        for (int l = 0; l < W; ++l) best_at = low[l] == lowest && low_at[l] < best_at ? low_at[l] : best_at;
        const i64 best = first_nan < nowhere ? i64(first_nan) : i64(best_at);
        const bool use_kl = st.use_kl != 0;
        const T threshold = T(st.kl_threshold);
        T count_a[W], last_a[W];
        LANES for (int l = 0; l < W; ++l) { count_a[l] = 0; last_a[l] = 0; }
        for (i64 b = 0; b < Qp_; b += W)
            LANES for (int l = 0; l < W; ++l) {
                const i64 s = b + l;
                const T gate = use_kl ? (kdp[s] < threshold ? T(1) : T(0)) : T(1);  // NaN: closed
                const T a = (s == best ? T(1) : cd[s] * gate) * fvp[s];
                alp[s] = a;
                count_a[l] += a;
                last_a[l] = a > T(0) ? T(s) : last_a[l];
            }
        T count = 0, last = 0;
        for (int l = 0; l < W; ++l) {
            count += count_a[l];
            last = last_a[l] > last ? last_a[l] : last;
        }
        n_pairs = 0;
        if (count == T(0)) return false;  // no allowed pair: responsibilities 0
        if (count == T(1) && std::isfinite(lgp[i64(last)])) {
            // One allowed pair: exp(0) / 1, exactly what the general softmax below gives.
            pair_s[0] = int32_t(last);
            pair_r[0] = T(1);
            n_pairs = 1;
            return true;
        }
        T top_a[W], top_nan[W];
        LANES for (int l = 0; l < W; ++l) { top_a[l] = -inf; top_nan[l] = 0; }
        for (i64 b = 0; b < Qp_; b += W)
            LANES for (int l = 0; l < W; ++l) {
                const T v = alp[b + l] > T(0) ? lgp[b + l] : -inf;
                top_nan[l] = v != v ? T(1) : top_nan[l];
                top_a[l] = v > top_a[l] ? v : top_a[l];
            }
        T top = -inf, is_nan = 0;
        for (int l = 0; l < W; ++l) {
            top = top_a[l] > top ? top_a[l] : top;
            is_nan = top_nan[l] > is_nan ? top_nan[l] : is_nan;
        }
        if (is_nan > T(0)) top = std::numeric_limits<T>::quiet_NaN();
        T zl[W];
        LANES for (int l = 0; l < W; ++l) zl[l] = 0;
        for (i64 b = 0; b < Qp_; b += W)
            LANES for (int l = 0; l < W; ++l) {
                const T v = exp_nonpositive_flushed(lgp[b + l] - top);
                const T e = alp[b + l] > T(0) ? v : T(0);
                exp_[b + l] = e;
                zl[l] += e;
            }
        T z = 0;
        for (int l = 0; l < W; ++l) z += zl[l];
        for (i64 s = 0; s < Q; ++s) {
            const T r = exp_[s] / z;
            if (r != T(0)) {  // r = 0 contributes nothing anywhere (NaN is kept)
                pair_s[n_pairs] = int32_t(s);
                pair_r[n_pairs] = r;
                ++n_pairs;
            }
        }
        return true;
    }

    // M-step sums of one pair (row features f, weight w_i, responsibility r).
    void accumulate(i64 s, const T* f, T w_i, T r) {
        T* u = &U[s * FT];
        for (int c = 0; c < FT; ++c) u[c] += r * (f[c] * w_i);
        ws[s] += r * w_i;
    }

    // Forward of one problem; the pairs with r != 0 are appended to idx (row, s) and
    // val (r, log-likelihood) when given.  out/out_valid may be null (backward's recompute).
    void forward(const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, const Settings& st,
                 T* out, uint8_t* out_valid, std::vector<int32_t>* idx, std::vector<T>* val) {
        prepare(tg, tv, fit, fv, true);
        std::fill(U.begin(), U.end(), T(0));
        std::fill(ws.begin(), ws.end(), T(0));
        for (i64 i = 0; i < S; ++i) {
            if (!tv[i]) continue;  // no allowed pair: responsibilities 0, no gradient
            const T* g = tg + i * K;
            T f[FT];
            features(g, f);
            if (!row(g, f, st)) continue;
            for (i64 x = 0; x < n_pairs; ++x) {
                const i64 s = pairs_s[x];
                accumulate(s, f, g[0], pairs_r[x]);
                if (idx) {
                    idx->push_back(int32_t(i)); idx->push_back(int32_t(s));
                    val->push_back(pairs_r[x]); val->push_back(ll[s]);
                }
            }
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
            const T* u = &U[s * FT];
            gaussian_from_moments<T, D>(ws[s], u + DD, u, centre, o);
        }
    }

    // Accumulates (+=) the gradients of the target rows into gtg [S][K] and of the fitting
    // rows into gfit [Q][K] for the output gradient gout [Q][K], from the problem's pairs
    // (count of them: idx (row, s), val (r, log-likelihood), rows ascending).
    void backward(const T* tg, const uint8_t* tv, const T* fit, const uint8_t* fv, const Settings& st,
                  const T* gout, T* gtg, T* gfit, const int32_t* idx, const T* val, i64 count) {
        prepare(tg, tv, fit, fv, false);
        std::fill(U.begin(), U.end(), T(0));
        std::fill(ws.begin(), ws.end(), T(0));
        for (i64 e = 0; e < count;) {  // the forward's M-step sums, in its order
            const i64 i = idx[2 * e];
            const T* g = tg + i * K;
            T f[FT];
            features(g, f);
            for (; e < count && idx[2 * e] == i; ++e) accumulate(idx[2 * e + 1], f, g[0], val[2 * e]);
        }
        const T threshold = tiny<T>() * T(1e6);
        // M step, per fitting Gaussian: out = (w_s, U_mu / w_s + c, sym(U_2 / w_s - mu mu^T)).
        for (i64 s = 0; s < Q; ++s) {
            T* gu = &gU[s * FT];
            if (!(std::fabs(ws[s]) > threshold)) {
                for (int c = 0; c < FT; ++c) gu[c] = 0;
                gwt[s] = 0;
                continue;
            }
            const T* u = &U[s * FT];
            const T* go = gout + s * K;
            T mean[D], gmom[FT], Gc[DD];
            for (int a = 0; a < D; ++a) mean[a] = u[DD + a] / ws[s];
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
                gu[c] = gmom[c] / ws[s];
                gsafe -= gmom[c] * (u[c] / ws[s]);
            }
            gwt[s] = go[0] + gsafe / ws[s];
        }
        std::fill(gfs.begin(), gfs.end(), T(0));
        std::fill(glds.begin(), glds.end(), T(0));
        std::fill(glprior.begin(), glprior.end(), T(0));
        std::fill(gvirt.begin(), gvirt.end(), T(0));
        for (i64 e = 0; e < count;) {
            const i64 i = idx[2 * e];
            i64 end = e;
            while (end < count && idx[2 * end] == i) ++end;
            const T* g = tg + i * K;
            const T w_i = g[0];
            const T vi = virtual_count(g, st);
            T f[FT], gf[FT];
            features(g, f);
            for (int c = 0; c < FT; ++c) gf[c] = 0;
            T gw = 0;
            T* gr = &grow[0];  // per pair of the row: d loss / d (r w_i), before the softmax
            for (i64 x = e; x < end; ++x) {
                const i64 s = idx[2 * x + 1];
                const T r = val[2 * x];
                const T* gu = &gU[s * FT];
                T acc = gwt[s];
                for (int c = 0; c < FT; ++c) {
                    acc += gu[c] * f[c];
                    gf[c] += r * gu[c];
                }
                gw += acc * r;
                gr[x - e] = acc;
            }
            for (int c = 0; c < FT; ++c) gf[c] *= w_i;
            // Softmax backward relative to the most responsible pair (EMStep::backward's form:
            // no cancellation of terms of size |g| when the responsibilities are nearly one-hot).
            i64 top = e;
            for (i64 x = e + 1; x < end; ++x) if (val[2 * x] > val[2 * top]) top = x;
            const T g_top = gr[top - e] * w_i, l_top = val[2 * top + 1];
            T dot = 0;
            for (i64 x = e; x < end; ++x)
                if (x != top) dot += val[2 * x] * (gr[x - e] * w_i - g_top);
            T gv = 0;
            for (i64 x = e; x < end; ++x) {
                const i64 s = idx[2 * x + 1];
                const T r = val[2 * x], l = val[2 * x + 1];
                const T gx = x == top ? -r * dot : r * ((gr[x - e] * w_i - g_top) - dot);
                if (x != top) gv += gx * (l - l_top);
                const T gll = gx * vi;
                glds[s] += T(-0.5) * gll;
                glprior[s] += gx;
                const T gq = T(-0.5) * gll;  // of the pair's quadratic term
                const T* fq = &fsq[s * FS];
                T* gfq = &gfs[s * FS];
                for (int c = 0; c < FT; ++c) {
                    gf[c] += gq * fq[c];
                    gfq[c] += gq * f[c];
                }
                gfq[FT] += gq;
            }
            gvirt[i] = gv;
            // Features -> parameters: f = (Sigma_i + m m^T, m), m = mu_i - centre (detached).
            T* gt = gtg + i * K;
            for (int c = 0; c < DD; ++c) gt[1 + D + c] += gf[c];
            for (int a = 0; a < D; ++a) {
                T acc = gf[DD + a];
                for (int b = 0; b < D; ++b) acc += (gf[a * D + b] + gf[b * D + a]) * f[DD + b];
                gt[1 + a] += acc;
            }
            gt[0] += gw;
            e = end;
        }
        // virtual_i = V |w_i| valid_i / divisor, divisor = total if total > 0.
        T gtotal = 0;
        for (i64 i = 0; i < S; ++i)
            if (gvirt[i] != T(0)) gtotal -= gvirt[i] * virtual_count(tg + i * K, st) * T(tv[i] ? 1 : 0) / divisor;
        if (!has_total) gtotal = 0;
        for (i64 i = 0; i < S; ++i) {
            if (!tv[i]) continue;
            const T gabs = T(st.virtual_points) * gvirt[i] / divisor + gtotal;
            gtg[i * K] += gabs * sign(tg[i * K]);
        }
        // Fitting features -> parameters.
        for (i64 s = 0; s < Q; ++s) {
            const T* g = fit + s * K;
            T* gg = gfit + s * K;
            const T* A = &adj[s * DD];
            const T* m = &ms[s * D];
            const T* pm = &pmu[s * D];
            const T* fq = &fsq[s * FS];
            const T* gq = &gfs[s * FS];
            T gP[DD];
            for (int c = 0; c < DD; ++c) gP[c] = gq[c];
            fitting_features_backward<T, D>(g, A, m, pm, fq, gP, gq + DD, gq[DD + D], detc[s], det[s], glds[s], glprior[s], gg);
        }
    }
};

// The sparse E steps a forward keeps for backward, one list of pairs per problem,
// owned here until take_pairs() copies them into the caller's tensors and frees them.
template <typename T>
struct PairLists {
    std::vector<std::vector<int32_t>> idx;  // per problem: (row, s) per pair
    std::vector<std::vector<T>> val;        // per problem: (r, log-likelihood) per pair
    explicit PairLists(i64 problems) : idx(problems), val(problems) {}
    i64 count() const {
        i64 n = 0;
        for (const auto& v : idx) n += i64(v.size() / 2);
        return n;
    }
    // Concatenates the lists in problem order: idx [n, 2], val [n, 2], offsets [problems + 1].
    void take(int32_t* idx_out, T* val_out, i64* offsets) {
        i64 n = 0;
        for (size_t p = 0; p < idx.size(); ++p) {
            offsets[p] = n;
            std::copy(idx[p].begin(), idx[p].end(), idx_out + 2 * n);
            std::copy(val[p].begin(), val[p].end(), val_out + 2 * n);
            n += i64(idx[p].size() / 2);
        }
        offsets[idx.size()] = n;
    }
};

// em_step on M independent problems (targets [M, S, K], fitting [M, Q, K]).
template <typename T, int D>
struct SparseEMWork {
    struct Scratch {
        SparseEM<T, D> em;
        std::vector<int32_t> idx;
        std::vector<T> val;
    };
    i64 S, Q;
    const T* tg; const uint8_t* tv; const T* fit; const uint8_t* fv;
    Settings st;
    T* out; uint8_t* out_valid;
    PairLists<T>* lists;                                  // forward: where to keep the pairs, or null
    const T* gout; T* gtg; T* gfit;                       // backward
    const int32_t* idx; const T* val; const i64* offsets;  // backward from kept pairs, or null: recompute
    void operator()(i64 p, Scratch& sc) const {
        constexpr int K = 1 + D + D * D;
        if (sc.em.S != S || sc.em.Q != Q) sc.em.resize(S, Q);
        const T* t = tg + p * S * K;
        const T* f = fit + p * Q * K;
        if (!gout) {
            std::vector<int32_t>* pi = lists ? &lists->idx[p] : nullptr;
            std::vector<T>* pv = lists ? &lists->val[p] : nullptr;
            sc.em.forward(t, tv + p * S, f, fv + p * Q, st, out + p * Q * K, out_valid + p * Q, pi, pv);
            return;
        }
        const int32_t* pi = idx ? idx + 2 * offsets[p] : nullptr;
        const T* pv = idx ? val + 2 * offsets[p] : nullptr;
        i64 count = idx ? offsets[p + 1] - offsets[p] : 0;
        if (!idx) {
            sc.idx.clear(); sc.val.clear();
            sc.em.forward(t, tv + p * S, f, fv + p * Q, st, nullptr, nullptr, &sc.idx, &sc.val);
            pi = sc.idx.data(); pv = sc.val.data(); count = i64(sc.idx.size() / 2);
        }
        sc.em.backward(t, tv + p * S, f, fv + p * Q, st, gout + p * Q * K, gtg + p * S * K, gfit + p * Q * K,
                       pi, pv, count);
    }
};

// The whole MEM reduction of G mixtures [G, N, K] to n_out Gaussians (mem.py's
// _reduce_flat inside scaling.py's reduce_batched, after its checks and padding):
// validity |w| >= weight_threshold, the pre-scaling factor (mean covariance trace of
// the Gaussians with w != 0 made D; 1 where that is not finite or not positive),
// the n_out valid Gaussians of largest |w| (stable: ties by index) as the initial
// mixture, the E and M step, output weights 0 where invalid, scaled back.
// forward writes out, out_valid, factor [G] and chosen [G, n_out]; backward reads them.
template <typename T, int D>
struct MEMWork {
    static constexpr int K = 1 + D + D * D;
    struct Scratch {
        SparseEM<T, D> em;
        std::vector<T> scaled, fit, grad, gfit, gout, magnitude;
        std::vector<uint8_t> valid, fit_valid;
        std::vector<int32_t> order, idx;
        std::vector<T> val;
    };
    i64 N, n_out;
    const T* m;
    Settings st;
    T weight_threshold;
    int normalize;
    T* out; uint8_t* out_valid; T* factor; int32_t* chosen;  // forward writes; backward reads factor, chosen
    PairLists<T>* lists;
    const T* gout; T* gm;
    const int32_t* idx; const T* val; const i64* offsets;

    static T scale_factor(const T* mg, i64 n) {
        T sum = 0, count = 0;  // in T, as the reference's sums of traces * mask and of mask
        for (i64 i = 0; i < n; ++i) {
            const T* g = mg + i * K;
            const T mask = g[0] != T(0) ? T(1) : T(0);
            T trace = 0;
            for (int a = 0; a < D; ++a) trace += g[1 + D + a * D + a];
            sum += trace * mask;
            count += mask;
        }
        const T trace = sum / (count < T(1) ? T(1) : count);
        const T f = std::sqrt(T(D) / clamp_tiny(trace));
        return std::isfinite(f) && trace > T(0) ? f : T(1);
    }

    // The scaled mixture, its validity, and the initial Gaussians (from chosen when given).
    void load(i64 g, Scratch& sc, T s, bool choose) const {
        const T* mg = m + g * N * K;
        sc.scaled.resize(N * K); sc.valid.resize(N);
        for (i64 i = 0; i < N; ++i) {
            const T* src = mg + i * K;
            T* dst = &sc.scaled[i * K];
            dst[0] = src[0];
            for (int a = 0; a < D; ++a) dst[1 + a] = src[1 + a] * s;
            for (int c = 0; c < D * D; ++c) dst[1 + D + c] = src[1 + D + c] * s * s;
            sc.valid[i] = std::fabs(src[0]) >= weight_threshold;  // NaN: invalid
        }
        int32_t* ch = chosen + g * n_out;
        if (choose) {
            // torch.argsort(-magnitude, stable=True)[:n_out], magnitude |w| (valid) or -1.
            sc.magnitude.resize(N); sc.order.resize(N);
            for (i64 i = 0; i < N; ++i) {
                sc.magnitude[i] = sc.valid[i] ? std::fabs(mg[i * K]) : T(-1);
                sc.order[i] = int32_t(i);
            }
            const T* mag = sc.magnitude.data();
            std::partial_sort(sc.order.begin(), sc.order.begin() + n_out, sc.order.end(), [mag](int32_t a, int32_t b) {
                return mag[a] > mag[b] || (mag[a] == mag[b] && a < b);
            });
            std::copy(sc.order.begin(), sc.order.begin() + n_out, ch);
        }
        sc.fit.resize(n_out * K); sc.fit_valid.resize(n_out);
        for (i64 q = 0; q < n_out; ++q) {
            std::memcpy(&sc.fit[q * K], &sc.scaled[ch[q] * K], sizeof(T) * K);
            sc.fit_valid[q] = sc.valid[ch[q]];
        }
    }

    void operator()(i64 g, Scratch& sc) const {
        if (sc.em.S != N || sc.em.Q != n_out) sc.em.resize(N, n_out);
        if (!gout) {
            const T s = normalize ? scale_factor(m + g * N * K, N) : T(1);
            factor[g] = s;
            load(g, sc, s, true);
            T* o = out + g * n_out * K;
            uint8_t* ov = out_valid + g * n_out;
            sc.em.forward(sc.scaled.data(), sc.valid.data(), sc.fit.data(), sc.fit_valid.data(), st, o, ov,
                          lists ? &lists->idx[g] : nullptr, lists ? &lists->val[g] : nullptr);
            const T inv = T(1) / s;  // scaling.py's unscale: gm.scale(m, 1 / factor)
            for (i64 q = 0; q < n_out; ++q) {
                T* row = o + q * K;
                if (!ov[q]) row[0] = T(0);
                for (int a = 0; a < D; ++a) row[1 + a] = row[1 + a] * inv;
                for (int c = 0; c < D * D; ++c) row[1 + D + c] = row[1 + D + c] * inv * inv;
            }
            return;
        }
        const T s = factor[g], inv = T(1) / s;
        load(g, sc, s, false);
        const int32_t* pi = idx ? idx + 2 * offsets[g] : nullptr;
        const T* pv = idx ? val + 2 * offsets[g] : nullptr;
        i64 count = idx ? offsets[g + 1] - offsets[g] : 0;
        if (!idx) {
            sc.idx.clear(); sc.val.clear();
            sc.em.forward(sc.scaled.data(), sc.valid.data(), sc.fit.data(), sc.fit_valid.data(), st, nullptr, nullptr,
                          &sc.idx, &sc.val);
            pi = sc.idx.data(); pv = sc.val.data(); count = i64(sc.idx.size() / 2);
        }
        // The output gradient through the scaling back and the weight mask.
        const T* go = gout + g * n_out * K;
        const uint8_t* ov = out_valid + g * n_out;
        sc.gfit.resize(n_out * K);
        std::vector<T>& gs = sc.grad;
        gs.assign(N * K, T(0));
        std::vector<T>& gos = sc.gout;
        gos.resize(n_out * K);
        for (i64 q = 0; q < n_out; ++q) {
            const T* src = go + q * K;
            T* dst = &gos[q * K];
            dst[0] = ov[q] ? src[0] : T(0);
            for (int a = 0; a < D; ++a) dst[1 + a] = src[1 + a] * inv;
            for (int c = 0; c < D * D; ++c) dst[1 + D + c] = src[1 + D + c] * inv * inv;
        }
        std::fill(sc.gfit.begin(), sc.gfit.end(), T(0));
        sc.em.backward(sc.scaled.data(), sc.valid.data(), sc.fit.data(), sc.fit_valid.data(), st, gos.data(),
                       gs.data(), sc.gfit.data(), pi, pv, count);
        const int32_t* ch = chosen + g * n_out;
        for (i64 q = 0; q < n_out; ++q)
            for (int c = 0; c < K; ++c) gs[ch[q] * K + c] += sc.gfit[q * K + c];
        // Through the pre-scaling (a constant factor: computed without gradient, as the reference).
        T* dst = gm + g * N * K;
        for (i64 i = 0; i < N; ++i) {
            const T* src = &gs[i * K];
            T* d = dst + i * K;
            d[0] = src[0];
            for (int a = 0; a < D; ++a) d[1 + a] = src[1 + a] * s;
            for (int c = 0; c < D * D; ++c) d[1 + D + c] = src[1 + D + c] * s * s;
        }
    }
};
