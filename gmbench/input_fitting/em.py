r"""Batched expectation-maximisation for Gaussian mixtures on weighted point sets.

Everything here works on a whole batch of point sets at once; there is no
Python loop over samples, only over EM iterations.

Shapes: points ``x [B, P, D]``, point weights ``w [B, P]`` (non-negative,
padding = 0, each row sums to 1), mixing weights ``pi [B, N]``, means
``mu [B, N, D]``, covariances ``cov [B, N, D, D]``.

E step (Dempster et al. 1977):

.. math:: r_{pk} = \frac{\pi_k g(x_p; \mu_k, C_k)}{\sum_j \pi_j g(x_p; \mu_j, C_j)}

M step with point weights :math:`w_p` and covariance regularisation
:math:`\epsilon` (scikit-learn's ``reg_covar``):

.. math:: N_k = \sum_p w_p r_{pk},\quad \pi_k = N_k,\quad
          \mu_k = \frac{1}{N_k}\sum_p w_p r_{pk} x_p,\quad
          C_k = \frac{1}{N_k}\sum_p w_p r_{pk} x_p x_p^T - \mu_k\mu_k^T + \epsilon I

Both steps are GEMMs: the Mahalanobis distances are ``X @ A^T`` with quadratic
point features ``X = [x_a x_b (a <= b), x, 1]``, and the M step's sums are
``(w r)^T @ [x, x x^T]``.  To keep float32 accurate, callers fit in
*standardised* coordinates (:func:`standardize`: weighted mean 0, RMS radius 1);
EM is affine-equivariant, so the result mapped back is the fit of the original
points with ``reg_covar`` in original units (:func:`unstandardize`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gmbench import mixture as gm


@dataclasses.dataclass
class MixtureParameters:
    """A batch of probability mixtures: ``pi [B, N]`` (rows sum to 1), ``mu [B, N, D]``, ``cov [B, N, D, D]``."""

    pi: Tensor
    mu: Tensor
    cov: Tensor

    def where(self, keep: Tensor, other: "MixtureParameters") -> "MixtureParameters":
        """Per batch row: ``self`` where ``keep [B]`` is true, else ``other``."""
        return MixtureParameters(
            torch.where(keep[:, None], self.pi, other.pi),
            torch.where(keep[:, None, None], self.mu, other.mu),
            torch.where(keep[:, None, None, None], self.cov, other.cov),
        )


def normalize_point_weights(points: Tensor, weights: Tensor | None) -> Tensor:
    """``[B, P]`` non-negative point weights summing to 1 per set (``None``: uniform)."""
    if weights is None:
        weights = torch.ones(points.shape[:2], dtype=points.dtype, device=points.device)
    weights = weights.to(points.dtype).clamp_min(0)
    total = weights.sum(-1, keepdim=True)
    return weights / total.clamp_min(torch.finfo(points.dtype).tiny)


def standardize(points: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift each set to weighted mean 0 and scale it to weighted RMS radius 1.

    Returns ``(x, centre [B, 1, D], scale [B])`` with ``x = (points - centre) / scale``.
    """
    centre = (w.unsqueeze(-1) * points).sum(1, keepdim=True)
    x = points - centre
    radius2 = (w * (x * x).sum(-1)).sum(-1)
    scale = torch.sqrt(radius2).clamp_min(1e-12)
    return x / scale[:, None, None], centre, scale


def unstandardize(params: MixtureParameters, centre: Tensor, scale: Tensor) -> MixtureParameters:
    """Inverse of :func:`standardize` applied to a fitted mixture."""
    s = scale[:, None, None]
    return MixtureParameters(params.pi, params.mu * s + centre, params.cov * (s * s)[..., None])


def _log_density_coefficients(mu: Tensor, cov: Tensor, log_pi: Tensor | None = None) -> Tensor:
    """``[B, N, F]`` so that ``quadratic_features(x) @ A^T = log pi_k + log g(x; mu_k, C_k)``."""
    precision, logdet = gm.symmetric_inverse_and_logdet(cov)
    coefficients = gm.quadratic_coefficients(precision, mu, logdet)
    if log_pi is not None:
        coefficients[..., -1] += log_pi
    return coefficients


def log_gaussians(x: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """``[B, P, N]``: :math:`\\log g(x_p; \\mu_k, C_k)` (normalised Gaussians, paper Eq. 1)."""
    return torch.bmm(gm.quadratic_features(x), _log_density_coefficients(mu, cov).transpose(1, 2))


def moment_features(x: Tensor) -> Tensor:
    """``[..., D] -> [..., D + D*D]``: ``[x, x x^T]`` (the M step's sufficient statistics)."""
    return torch.cat([x, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)], -1)


def e_step(x: Tensor, params: MixtureParameters, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Responsibilities ``r [B, P, N]`` and per-point log-likelihoods ``[B, P]``.

    One GEMM gives :math:`\\log \\pi_k g(x_p)` (log weights and normalisation folded into
    the constant feature); the softmax is done in place to touch the ``[B, P, N]`` tensor
    as few times as possible (it dominates the cost).
    """
    tiny = torch.finfo(x.dtype).tiny
    coefficients = _log_density_coefficients(params.mu, params.cov, torch.log(params.pi.clamp_min(tiny)))
    features = gm.quadratic_features(x) if features is None else features
    joint = torch.bmm(features, coefficients.transpose(1, 2))
    peak = joint.amax(-1, keepdim=True)
    # exp of very negative arguments takes a slow path (about 10x); below this bound
    # the responsibility is under 1e-30 of the largest anyway.
    floor = math.log(tiny) + 10
    responsibilities = joint.sub_(peak).clamp_min_(floor).exp_()
    total = responsibilities.sum(-1, keepdim=True)
    responsibilities.div_(total)
    return responsibilities, (torch.log(total) + peak).squeeze(-1)


def empty_safe(mass: Tensor) -> Tensor:
    """Component masses safe to divide by.

    scikit-learn adds ``10 * eps``; with masses normalised to sum 1 that biases
    float32 means by ~1e-5 relative and covariances (``E[xx^T] - mu mu^T``) by
    far more, so only masses below ``sqrt(tiny)`` (empty components) are raised.
    """
    return mass.clamp_min(torch.finfo(mass.dtype).tiny ** 0.5)


def m_step(x: Tensor, w: Tensor, responsibilities: Tensor, reg_covar: Tensor | float) -> MixtureParameters:
    """Weighted M step (module docstring); ``reg_covar`` is a float or ``[B]``.

    An empty component (``N_k = 0``) keeps a finite mean and the covariance
    ``reg_covar * I``, as in scikit-learn (it gets a weight of about 0).
    ``responsibilities`` is overwritten (with ``w r``).
    """
    wr = responsibilities.mul_(w.unsqueeze(-1))  # in place: [B, P, N] is the big tensor
    statistics = torch.cat([torch.ones_like(x[..., :1]), moment_features(x)], -1)
    return _moments_to_parameters(torch.bmm(wr.transpose(1, 2), statistics), x.shape[-1], reg_covar)


def mean_log_likelihood(x: Tensor, w: Tensor, params: MixtureParameters) -> Tensor:
    """``[B]``: :math:`\\sum_p w_p \\log p(x_p)` (the mean log-likelihood for uniform weights)."""
    _, log_point = e_step(x, params)
    return (w * log_point).sum(-1)


def _moments_to_parameters(acc: Tensor, d: int, reg_covar: Tensor | float) -> MixtureParameters:
    """M step from accumulated ``[B, N, 1 + D + D*D]`` sums of ``w r [1, x, x x^T]``."""
    nk = empty_safe(acc[..., 0])
    mu = acc[..., 1 : 1 + d] / nk.unsqueeze(-1)
    second = (acc[..., 1 + d :] / nk.unsqueeze(-1)).unflatten(-1, (d, d))
    cov = second - mu.unsqueeze(-1) * mu.unsqueeze(-2)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    reg = torch.as_tensor(reg_covar, dtype=acc.dtype, device=acc.device).reshape(-1, 1, 1, 1)
    cov = cov + reg * torch.eye(d, dtype=acc.dtype, device=acc.device)
    return MixtureParameters(nk / nk.sum(-1, keepdim=True), mu, cov)


def em_iteration(features: Tensor, statistics: Tensor, w: Tensor, params: MixtureParameters,
                 reg_covar: Tensor | float, block: int) -> tuple[MixtureParameters, Tensor]:
    """One fused E + M step, in blocks of ``block`` points -> ``(new params, mean log-likelihood [B])``.

    Same result as :func:`e_step` then :func:`m_step`, but the ``[B, block, N]``
    responsibility tile is consumed while it is still in cache (the unblocked
    version streams the whole ``[B, P, N]`` tensor through memory about ten
    times per iteration).  ``features = quadratic_features(x)``,
    ``statistics = [1, moment_features(x)]``.
    """
    d = params.mu.shape[-1]
    tiny = torch.finfo(features.dtype).tiny
    floor = math.log(tiny) + 10
    coefficients = _log_density_coefficients(params.mu, params.cov, torch.log(params.pi.clamp_min(tiny)))
    coefficients = coefficients.transpose(1, 2).contiguous()
    b, p, _ = features.shape
    acc = features.new_zeros(b, params.mu.shape[1], statistics.shape[-1])
    log_likelihood = features.new_zeros(b)
    for start in range(0, p, block):
        stop = start + block
        joint = torch.bmm(features[:, start:stop], coefficients)
        peak = joint.amax(-1, keepdim=True)
        joint.sub_(peak).clamp_min_(floor).exp_()
        total = joint.sum(-1, keepdim=True)
        wb = w[:, start:stop].unsqueeze(-1)
        log_likelihood += (wb * (torch.log(total) + peak)).sum((1, 2))
        joint.mul_(wb / total)
        acc.baddbmm_(joint.transpose(1, 2), statistics[:, start:stop])
    return _moments_to_parameters(acc, d, reg_covar), log_likelihood


EM_TILE_ELEMENTS = 1 << 19


def run_em(
    x: Tensor,
    w: Tensor,
    params: MixtureParameters,
    reg_covar: Tensor | float,
    iterations: int,
    tolerance: float = 0.0,
) -> tuple[MixtureParameters, Tensor, Tensor]:
    """Up to ``iterations`` EM steps (E then M) from ``params``, batched.

    A set stops (its parameters freeze) once its mean log-likelihood changes by
    less than ``tolerance`` between iterations, which is scikit-learn's
    convergence rule; ``tolerance=0`` runs exactly ``iterations`` steps.  Log-
    likelihood differences do not change under the standardisation, so the
    tolerance means the same as scikit-learn's ``tol``.

    Returns ``(params, mean_log_likelihood [B], iterations_run [B])``; the
    log-likelihood is that of the returned parameters.
    """
    b, p, _ = x.shape
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    steps = torch.zeros(b, dtype=torch.long, device=x.device)
    previous = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
    # Fixed across iterations.
    features = gm.quadratic_features(x)
    statistics = torch.cat([torch.ones_like(x[..., :1]), moment_features(x)], -1)
    n = params.mu.shape[1]
    # With few Gaussians (Eckart's nodes) many tiny GEMMs cost more than cache misses: longer blocks.
    block = max(8192 // n, EM_TILE_ELEMENTS // max(1, b * n))
    for _ in range(iterations):
        updated, current = em_iteration(features, statistics, w, params, reg_covar, block)
        params = updated.where(active, params)
        steps = steps + active.long()
        if tolerance > 0:
            # scikit-learn's rule: the E steps' log-likelihoods of two
            # consecutive iterations differ by less than the tolerance.
            active = active & ~((current - previous).abs() < tolerance)
            previous = current
            if not bool(active.any()):
                break
    return params, mean_log_likelihood(x, w, params), steps
