r"""Triton kernels of the reduction node fits (imported only when they run; needs ``triton``).

* :func:`initial_order_kernel`  TreeHEM's initial Gaussians of one node per
  program (:func:`gmbench.reduction.node_fit.initial_gaussians`): Kruskal's
  single linkage on the ``S`` centroids (``S x S`` distance tile in registers,
  at most ``S - 1`` merges), the heaviest Gaussian of each cluster, and their
  stable order by ``|w|``; writes the order ``[M, S]`` and validity.
* :func:`em_step_kernel`  the E step (Eq. 15 with the sign and KL gates) and
  the M step's sums (Eq. 16) (:func:`gmbench.reduction.em.em_step`); grid
  ``(problems, chunks)``, a program takes ``rows_per_program`` target rows of
  one problem: the ``S x Q`` responsibilities are computed ``BLOCK_S`` target
  rows at a time and never stored; out come the chunk's partial sums
  ``w_s = sum_i r_is w_i`` and ``U_s = sum_i r_is w_i f_i`` for the features
  ``f_i = (Sigma_i + m_i m_i^T, m_i, 1)`` of the problem-centred targets
  (added over the chunks afterwards: deterministic, no atomics).
* :func:`em_step_backward_kernel`  the gradients of those sums w.r.t. the
  features, weights, virtual sample counts, log normalisers and log priors:
  same grid, the pair terms recomputed, per-target gradients written per row,
  per-fitting ones as partial sums per chunk.

All compute in the dtype of their inputs (float32 or float64, ``DTYPE``
follows the pointers).  The per-Gaussian features (precisions, log
determinants, virtual sample counts) are prepared by
:mod:`gmbench.backends.node_fit_triton` with the reference's formulas.

Whether the kernels compile for CUDA or run in Triton's CPU interpreter is
decided when this module is imported (``TRITON_INTERPRET=1`` must be set before).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def initial_order_kernel(TARGET, VALID, N_OUT, ORDER, ORDER_VALID, S: tl.constexpr, D: tl.constexpr):
    node = tl.program_id(0)
    K: tl.constexpr = 1 + D + D * D
    i = tl.arange(0, S)
    base = TARGET + (node * S + i) * K
    w = tl.load(base)
    v = tl.load(VALID + node * S + i) != 0
    dist = tl.zeros((S, S), dtype=w.dtype)
    for a in tl.static_range(D):
        p = tl.load(base + 1 + a)
        diff = p[:, None] - p[None, :]
        dist += diff * diff
    # Pairs that may merge: both valid, same sign, not the same Gaussian.
    positive = w >= 0
    mergeable = v[:, None] & v[None, :] & (positive[:, None] == positive[None, :]) & (i[:, None] != i[None, :])
    labels = i
    remaining = tl.sum(v.to(tl.int32), axis=0)
    n_clusters = tl.load(N_OUT + node).to(tl.int32)
    flat = i[:, None] * S + i[None, :]
    inf = float("inf")
    for _ in range(S - 1):  # at most S - 1 merges; a loop, not unrolled (S = 2T may be large)
        candidates = mergeable & (labels[:, None] != labels[None, :])
        value = tl.where(candidates, dist, inf)
        lowest = tl.min(tl.min(value, axis=1), axis=0)
        best = tl.min(tl.min(tl.where(value == lowest, flat, S * S), axis=1), axis=0)  # first minimum
        merge = (remaining > n_clusters) & (lowest < inf)
        label_i = tl.sum(tl.where(i == best // S, labels, 0), axis=0)
        label_j = tl.sum(tl.where(i == best % S, labels, 0), axis=0)
        labels = tl.where(merge & (labels == label_j), label_i, labels)
        remaining -= merge.to(tl.int32)
    # The heaviest of each cluster: j beats i with larger |w|, or equal |w| and lower index.
    magnitude = tl.where(v, tl.abs(w), -1.0)
    mag_i, mag_j = magnitude[:, None], magnitude[None, :]
    heavier = (mag_j > mag_i) | ((mag_j == mag_i) & (i[None, :] < i[:, None]))
    same = (labels[:, None] == labels[None, :]) & v[:, None] & v[None, :]
    beaten = tl.max((same & heavier).to(tl.int32), axis=1) > 0
    score = tl.where(v & ~beaten, magnitude, -1.0)
    # Stable argsort of -score: the rank of j counts the k that come before it.
    s_k, s_j = score[:, None], score[None, :]
    before = (s_k > s_j) | ((s_k == s_j) & (i[:, None] < i[None, :]))
    rank = tl.sum(before.to(tl.int32), axis=0)
    slot_of = rank[None, :] == i[:, None]  # [slot, j]
    order = tl.sum(tl.where(slot_of, i[None, :], 0), axis=1)
    sorted_score = tl.sum(tl.where(slot_of, score[None, :], 0.0), axis=1)
    ok = (sorted_score >= 0) & (i < n_clusters)
    tl.store(ORDER + node * S + i, order.to(tl.int32))
    tl.store(ORDER_VALID + node * S + i, ok.to(tl.uint8))


@triton.jit
def _fitting_gaussians(FF, FLN, FLD, FLP, FW, FV, p, q, q_ok, c, Q, FP: tl.constexpr):
    """The fitting Gaussians ``q`` of problem ``p``: features, log normalisers, log
    determinants, log priors, weights and validity."""
    fs = tl.load(FF + (p * Q + q)[:, None] * FP + c[None, :], mask=q_ok[:, None], other=0.0)
    lnorm = tl.load(FLN + p * Q + q, mask=q_ok, other=0.0)
    lds = tl.load(FLD + p * Q + q, mask=q_ok, other=0.0)
    lprior = tl.load(FLP + p * Q + q, mask=q_ok, other=0.0)
    w_s = tl.load(FW + p * Q + q, mask=q_ok, other=0.0)
    fv = (tl.load(FV + p * Q + q, mask=q_ok, other=0) != 0) & q_ok
    return fs, lnorm, lds, lprior, w_s, fv


@triton.jit
def _target_block(TF, TW, TV, TLD, TVIRT, p, i, i_ok, c, S, FP: tl.constexpr):
    """One block of target rows ``i`` of problem ``p``: features, weights, validity, log
    determinants and virtual sample counts."""
    ft = tl.load(TF + (p * S + i)[:, None] * FP + c[None, :], mask=i_ok[:, None], other=0.0)
    w_i = tl.load(TW + p * S + i, mask=i_ok, other=0.0)
    tv = (tl.load(TV + p * S + i, mask=i_ok, other=0) != 0) & i_ok
    ldi = tl.load(TLD + p * S + i, mask=i_ok, other=0.0)
    virtual = tl.load(TVIRT + p * S + i, mask=i_ok, other=0.0)
    return ft, w_i, tv, ldi, virtual


@triton.jit
def _block_responsibilities(
    ft, w_i, tv, ldi, virtual, fs, lnorm, lds, lprior, w_s, fv, q, q_ok, threshold,
    USE_KL: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """The E step of one block of target rows against all fitting Gaussians (Eq. 15 with the
    sign and KL gates): ``(log_likelihood, r)``, both ``[BLOCK_S, BLOCK_Q]``; shared by the
    forward and the backward kernel, so both see the same gates."""
    inf = float("inf")
    # Mahalanobis + trace term of every pair: one dot product of the features.
    quadratic = tl.sum(ft[:, None, :] * fs[None, :, :], axis=2)
    log_likelihood = -0.5 * quadratic + lnorm[None, :]
    logits = virtual[:, None] * log_likelihood + lprior[None, :]
    kl = 0.5 * (((quadratic - D) - ldi[:, None]) + lds[None, :])
    pair_valid = tv[:, None] & fv[None, :]
    same_sign = (w_i[:, None] >= 0) == (w_s[None, :] >= 0)
    candidates = pair_valid & same_sign
    any_candidate = tl.max(candidates.to(tl.int32), axis=1) > 0
    candidates = tl.where(any_candidate[:, None], candidates, pair_valid)
    value = tl.where(candidates & q_ok[None, :], kl, inf)
    lowest = tl.min(value, axis=1)
    best = tl.min(tl.where(value == lowest[:, None], q[None, :], BLOCK_Q), axis=1)  # first minimum
    if USE_KL:
        allowed = candidates & (kl < threshold)
    else:
        allowed = candidates
    allowed = (allowed | (q[None, :] == best[:, None])) & pair_valid
    has_any = tl.max(allowed.to(tl.int32), axis=1) > 0
    top = tl.max(tl.where(allowed, logits, -inf), axis=1)
    top = tl.where(has_any, top, 0.0)
    e = tl.exp(tl.where(allowed, logits - top[:, None], -inf))  # no overflow in the masked lanes
    z = tl.sum(e, axis=1)
    r = e / tl.where(has_any, z, 1.0)[:, None]
    return log_likelihood, r


@triton.jit
def em_step_kernel(
    TF, TW, TV, TLD, TVIRT, FF, FLN, FLD, FLP, FW, FV, KL, OUT_W, OUT_U, S, Q, rows_per_program,
    USE_KL: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    p = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    q = tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    c = tl.arange(0, FP)
    fs, lnorm, lds, lprior, w_s, fv = _fitting_gaussians(FF, FLN, FLD, FLP, FW, FV, p, q, q_ok, c, Q, FP)
    threshold = tl.load(KL)
    ws = tl.zeros((BLOCK_Q,), dtype=fs.dtype)
    u = tl.zeros((BLOCK_Q, FP), dtype=fs.dtype)
    first = chunk * rows_per_program
    for s0 in range(first, tl.minimum(first + rows_per_program, S), BLOCK_S):
        i = s0 + tl.arange(0, BLOCK_S)
        i_ok = i < S
        ft, w_i, tv, ldi, virtual = _target_block(TF, TW, TV, TLD, TVIRT, p, i, i_ok, c, S, FP)
        _, r = _block_responsibilities(
            ft, w_i, tv, ldi, virtual, fs, lnorm, lds, lprior, w_s, fv, q, q_ok, threshold, USE_KL, D, BLOCK_Q
        )
        rw = r * w_i[:, None]
        ws += tl.sum(rw, axis=0)
        u += tl.sum(rw[:, :, None] * ft[:, None, :], axis=0)
    out = (p * n_chunks + chunk) * Q + q
    tl.store(OUT_W + out, ws, mask=q_ok)
    tl.store(OUT_U + out[:, None] * FP + c[None, :], u, mask=q_ok[:, None])


@triton.jit
def em_step_backward_kernel(
    TF, TW, TV, TLD, TVIRT, FF, FLN, FLD, FLP, FW, FV, KL, GWS, GU,
    G_TF, G_TW, G_TVIRT, G_FF, G_FLN, G_FLP, S, Q, rows_per_program,
    USE_KL: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Gradients of :func:`em_step_kernel`'s sums w.r.t. its differentiable inputs (the gates are
    constants, as in the reference): the pair terms are recomputed, the per-target gradients of the
    program's rows written, the per-fitting ones as the chunk's partial sums."""
    p = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    q = tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    c = tl.arange(0, FP)
    fs, lnorm, lds, lprior, w_s, fv = _fitting_gaussians(FF, FLN, FLD, FLP, FW, FV, p, q, q_ok, c, Q, FP)
    gws = tl.load(GWS + p * Q + q, mask=q_ok, other=0.0)
    gu = tl.load(GU + (p * Q + q)[:, None] * FP + c[None, :], mask=q_ok[:, None], other=0.0)
    threshold = tl.load(KL)
    g_fs = tl.zeros((BLOCK_Q, FP), dtype=fs.dtype)
    g_lnorm = tl.zeros((BLOCK_Q,), dtype=fs.dtype)
    g_lprior = tl.zeros((BLOCK_Q,), dtype=fs.dtype)
    first = chunk * rows_per_program
    for s0 in range(first, tl.minimum(first + rows_per_program, S), BLOCK_S):
        i = s0 + tl.arange(0, BLOCK_S)
        i_ok = i < S
        ft, w_i, tv, ldi, virtual = _target_block(TF, TW, TV, TLD, TVIRT, p, i, i_ok, c, S, FP)
        # The block's forward, exactly as em_step_kernel computes it.
        log_likelihood, r = _block_responsibilities(
            ft, w_i, tv, ldi, virtual, fs, lnorm, lds, lprior, w_s, fv, q, q_ok, threshold, USE_KL, D, BLOCK_Q
        )
        # Chain rule: ws_s = sum_i r_is w_i, U_s = sum_i r_is w_i f_i, r = softmax over the allowed s.
        g_rw = gws[None, :] + tl.sum(ft[:, None, :] * gu[None, :, :], axis=2)
        g_ft = tl.sum((r * w_i[:, None])[:, :, None] * gu[None, :, :], axis=1)
        g_w = tl.sum(r * g_rw, axis=1)
        g_r = w_i[:, None] * g_rw
        g_logit = r * (g_r - tl.sum(r * g_r, axis=1)[:, None])
        g_lprior += tl.sum(g_logit, axis=0)
        g_virtual = tl.sum(g_logit * log_likelihood, axis=1)
        g_ll = virtual[:, None] * g_logit
        g_lnorm += tl.sum(g_ll, axis=0)
        g_quadratic = -0.5 * g_ll
        g_ft += tl.sum(g_quadratic[:, :, None] * fs[None, :, :], axis=1)
        g_fs += tl.sum(g_quadratic[:, :, None] * ft[:, None, :], axis=0)
        tl.store(G_TF + (p * S + i)[:, None] * FP + c[None, :], g_ft, mask=i_ok[:, None])
        tl.store(G_TW + p * S + i, g_w, mask=i_ok)
        tl.store(G_TVIRT + p * S + i, g_virtual, mask=i_ok)
    out = (p * n_chunks + chunk) * Q + q
    tl.store(G_FF + out[:, None] * FP + c[None, :], g_fs, mask=q_ok[:, None])
    tl.store(G_FLN + out, g_lnorm, mask=q_ok)
    tl.store(G_FLP + out, g_lprior, mask=q_ok)
