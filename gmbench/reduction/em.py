r"""The E and M steps shared by the reduction methods (paper Appendix D, Eq. 15-16).

Both work on flat batches of small fitting problems: a *target* mixture
``[M, S, K]`` (``S`` Gaussians per problem, with a validity mask ``[M, S]``)
and an *initial* fitting mixture ``[M, Q, K]`` (mask ``[M, Q]``).

E step (Eq. 15, Preiner et al. 2014, Eq. 9): the likelihood of target
Gaussian ``i`` under fitting Gaussian ``s`` is

.. math:: \mathcal{L}_{is} = \left[ g(\mu_i | \mu_s, \Sigma_s)\,
          e^{-\frac12 \operatorname{tr}(\Sigma_s^{-1}\Sigma_i)} \right]^{\hat w_i},
          \qquad r_{is} = \frac{\mathcal{L}_{is} |w_s|}{\sum_{s'} \mathcal{L}_{is'} |w_{s'}|},

computed in the log domain (no ``pow(0, 0)``, no underflow).  ``\hat w_i`` is
the number of virtual samples Gaussian ``i`` stands for: ``V`` virtual samples
spread over the valid target Gaussians of one problem in proportion to
``|w_i|``, i.e. ``\hat w_i = V |w_i| / \sum_j |w_j|``.

Geometric gate (Preiner's regularisation): ``r_{is} = 0`` where the
Kullback-Leibler divergence ``KL(i || s)`` exceeds a threshold, and where the
signs of ``w_i`` and ``w_s`` differ; the pair with the smallest KL is always
allowed, so every valid target Gaussian gives its whole weight to the fitting
and the total integral is preserved exactly.

M step (Eq. 16): ``w_s = \sum_i r_{is} w_i``, ``\mu_s`` and ``\Sigma_s`` the
moment-matched mean and covariance of the Gaussians weighted by
``r_{is} w_i / w_s``.  The first and second moments of the mixture are
therefore preserved whenever the responsibilities sum to one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmbench import mixture as gm


def _contract(w: Tensor, x: Tensor) -> Tensor:
    """``sum_s w[m, s, q] x[m, s, f]`` -> ``[M, Q, F]`` (one batched matrix product)."""
    return torch.bmm(w.transpose(-1, -2), x)


def _quadratic_terms(target: Tensor, fitting: Tensor, precision_s: Tensor) -> Tensor:
    r"""``(mu_i - mu_s)^T P_s (mu_i - mu_s) + tr(P_s Sigma_i)`` for all pairs: ``[M, S, Q]``.

    Written as one batched matrix product of per-Gaussian features,
    ``<P_s, Sigma_i + mu_i mu_i^T> - 2 mu_i . P_s mu_s + mu_s^T P_s mu_s``,
    with positions centred on the problem's mean first so the expansion loses
    no precision.
    """
    centre = gm.positions(target).mean(-2, keepdim=True).detach()
    mu_i = gm.positions(target) - centre
    mu_s = gm.positions(fitting) - centre
    # Full D x D blocks (no index gathers: cheaper forward and backward than the unique entries).
    second_i = (gm.covariances(target) + mu_i.unsqueeze(-1) * mu_i.unsqueeze(-2)).flatten(-2)
    features_i = torch.cat([second_i, mu_i, torch.ones_like(mu_i[..., :1])], -1)
    p_mu_s = (precision_s @ mu_s.unsqueeze(-1)).squeeze(-1)
    features_s = torch.cat([precision_s.flatten(-2), -2.0 * p_mu_s, (mu_s * p_mu_s).sum(-1, keepdim=True)], -1)
    return torch.bmm(features_i, features_s.transpose(-1, -2))


def responsibilities(
    target: Tensor,
    target_valid: Tensor,
    fitting: Tensor,
    fitting_valid: Tensor,
    virtual_points: float,
    kl_threshold: float | None,
) -> Tensor:
    """E step (Eq. 15) with the sign and KL gates: ``[M, S, Q]``, rows sum to 1 for valid targets."""
    d = gm.n_dims(target)
    w_i = gm.weights(target)
    w_s = gm.weights(fitting)
    precision_s, logdet_s = gm.symmetric_inverse_and_logdet(gm.covariances(fitting))
    quadratic = _quadratic_terms(target, fitting, precision_s)  # Mahalanobis + trace term

    abs_w_i = w_i.abs() * target_valid
    total = abs_w_i.sum(-1, keepdim=True)
    virtual = virtual_points * abs_w_i / torch.where(total > 0, total, torch.ones_like(total))
    # log[g(mu_i | s) exp(-tr/2)] = -(maha + tr + log det Sigma_s + D log 2 pi) / 2
    log_likelihood = -0.5 * quadratic + gm.log_normaliser(logdet_s.unsqueeze(-2), d)
    log_prior = torch.log(w_s.abs().clamp_min(torch.finfo(w_s.dtype).tiny)).unsqueeze(-2)
    logits = virtual.unsqueeze(-1) * log_likelihood + log_prior

    with torch.no_grad():
        _, logdet_i = gm.symmetric_inverse_and_logdet(gm.covariances(target))
        pair_valid = target_valid.unsqueeze(-1) & fitting_valid.unsqueeze(-2)
        same_sign = (w_i.unsqueeze(-1) >= 0) == (w_s.unsqueeze(-2) >= 0)
        kl = 0.5 * (quadratic - d - logdet_i.unsqueeze(-1) + logdet_s.unsqueeze(-2))
        candidates = pair_valid & same_sign
        # Fall back to any valid fitting Gaussian where none has the same sign.
        candidates = torch.where(candidates.any(-1, keepdim=True), candidates, pair_valid)
        inf = torch.tensor(float("inf"), dtype=kl.dtype, device=kl.device)
        best = torch.where(candidates, kl, inf).argmin(-1, keepdim=True)
        allowed = candidates & (kl < kl_threshold) if kl_threshold is not None else candidates.clone()
        allowed.scatter_(-1, best, True)
        allowed &= pair_valid
        has_any = allowed.any(-1, keepdim=True)
        # Rows without any allowed pair (invalid targets) get harmless finite logits.
        allowed_or_row = torch.where(has_any, allowed, torch.ones_like(allowed))
    logits = logits.masked_fill(~allowed_or_row, float("-inf"))
    # Softmax over s written out: torch.softmax is several times slower over a
    # last axis of size T; the shift is detached (softmax is shift-invariant).
    e = torch.exp(logits - logits.detach().amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True) * has_any


def m_step(target: Tensor, r: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """M step (Eq. 16): ``[M, S, K]`` targets, ``r [M, S, Q]`` -> ``([M, Q, K], nonzero [M, Q])``.

    Where a fitting Gaussian receives no weight at all, its parameters are taken
    from ``fallback`` (``[M, Q, K]``) with weight 0, so the output stays valid.
    """
    w_i = gm.weights(target)
    rw = r * w_i.unsqueeze(-1)  # [M, S, Q]
    w_s = rw.sum(-2)  # [M, Q]
    nonzero = w_s.abs() > torch.finfo(w_s.dtype).tiny * 1e6
    safe_w_s = torch.where(nonzero, w_s, torch.ones_like(w_s))
    w_is = rw / safe_w_s.unsqueeze(-2)  # Eq. 16: r_is w_i / w_s
    # Centring on the (detached) target mean keeps E[x x^T] - mu mu^T free of cancellation.
    mu_i = gm.positions(target)
    centre = mu_i.mean(-2, keepdim=True).detach()
    mu_i = mu_i - centre
    second = gm.covariances(target).flatten(-2) + (mu_i.unsqueeze(-1) * mu_i.unsqueeze(-2)).flatten(-2)
    moments = _contract(w_is, torch.cat([mu_i, second], -1))
    d = mu_i.shape[-1]
    mu_s = moments[..., :d]
    cov_s = moments[..., d:].unflatten(-1, (d, d))
    cov_s = cov_s - mu_s.unsqueeze(-1) * mu_s.unsqueeze(-2)
    cov_s = 0.5 * (cov_s + cov_s.transpose(-1, -2))
    keep = nonzero.unsqueeze(-1)
    # The fallback only fills slots of weight 0, whose parameters influence nothing
    # downstream; detached, backward skips a gradient branch per output tensor.
    positions = torch.where(keep, mu_s + centre, gm.positions(fallback).detach())
    covariances = torch.where(keep.unsqueeze(-1), cov_s, gm.covariances(fallback).detach())
    return gm.pack(torch.where(nonzero, w_s, torch.zeros_like(w_s)), positions, covariances), nonzero


def em_step(
    target: Tensor,
    target_valid: Tensor,
    fitting: Tensor,
    fitting_valid: Tensor,
    virtual_points: float,
    kl_threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """One E step (Eq. 15) and one M step (Eq. 16): ``-> ([M, Q, K], valid [M, Q])``."""
    r = responsibilities(target, target_valid, fitting, fitting_valid, virtual_points, kl_threshold)
    fitted, nonzero = m_step(target, r, fitting)
    return fitted, nonzero & fitting_valid
