r"""The Gaussian-mixture tensor layout and the operations on it.

This module is the one place that defines the layout.  A batch of mixtures is
a tensor of shape ``[B, C, N, 1 + D + D*D]`` (batch, channels, Gaussians,
features) whose last axis holds, per Gaussian,

* ``[..., 0]``                the weight :math:`a_i` (may be negative),
* ``[..., 1:1+D]``            the position (centre) :math:`b_i`,
* ``[..., 1+D:1+D+D*D]``      the covariance :math:`C_i`, row-major.

Gaussians are normalised densities (paper Eq. 1)

.. math:: g(x; b, C) = \frac{1}{\sqrt{(2\pi)^D \det C}} e^{-\frac12 (x-b)^T C^{-1} (x-b)},

so a mixture :math:`\sum_i a_i g(x; b_i, C_i)` integrates to :math:`\sum_i a_i`.
Padding Gaussians have weight 0 and a valid (e.g. identity) covariance.

The quadratic-cost evaluations (:func:`evaluate`, :func:`evaluate_at_centroids`,
:func:`evaluate_weight_sets_at_centroids`) and :func:`convolve` run through the active compute backend
(:func:`gmbench.backends.active`); everything else here is plain PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DIMS = (2, 3)


def n_features(dims: int) -> int:
    """Length of the last axis for ``dims``-dimensional Gaussians."""
    return 1 + dims + dims * dims


def n_dims(m: Tensor) -> int:
    """Spatial dimension D of a mixture tensor ``[..., 1 + D + D*D]``."""
    k = m.shape[-1]
    for d in DIMS:
        if k == n_features(d):
            return d
    raise ValueError(f"last axis of a mixture must be 7 (2D) or 13 (3D), got {k}")


def weights(m: Tensor) -> Tensor:
    """``[..., N]`` weights."""
    return m[..., 0]


def positions(m: Tensor) -> Tensor:
    """``[..., N, D]`` positions."""
    d = n_dims(m)
    return m[..., 1 : 1 + d]


def covariances(m: Tensor) -> Tensor:
    """``[..., N, D, D]`` covariance matrices."""
    d = n_dims(m)
    return m[..., 1 + d :].unflatten(-1, (d, d))


def scalar_columns(m: Tensor) -> tuple[Tensor, list[Tensor], list[list[Tensor]]]:
    """``m``'s columns as separate ``[...]`` tensors, from one ``unbind``: the weight, the D
    position coordinates and the covariance as a D x D nested list (``[row][column]``).

    For formulas written per scalar (closed-form 2D / 3D algebra): one autograd node for
    the split instead of a slice, and its full-size gradient, per use.
    """
    d = n_dims(m)
    columns = m.unbind(-1)
    covariance = columns[1 + d :]
    return columns[0], list(columns[1 : 1 + d]), [list(covariance[r * d : (r + 1) * d]) for r in range(d)]


def pack(weights: Tensor, positions: Tensor, covariances: Tensor) -> Tensor:
    """Build a mixture tensor from ``[..., N]``, ``[..., N, D]`` and ``[..., N, D, D]``."""
    d = positions.shape[-1]
    if d not in DIMS:
        raise ValueError(f"positions must have 2 or 3 coordinates, got {d}")
    if covariances.shape[-2:] != (d, d):
        raise ValueError(f"covariances must be [..., {d}, {d}], got {tuple(covariances.shape)}")
    return torch.cat([weights.unsqueeze(-1), positions, covariances.flatten(-2)], dim=-1)


def with_weights(m: Tensor, new_weights: Tensor) -> Tensor:
    """``m`` with its weights replaced (positions and covariances kept)."""
    # A copy and one column write: concatenating a 1-wide and a (K-1)-wide slice along
    # the last axis is a strided gather, about 1.7x slower forward and backward together.
    out = m.clone()
    out[..., 0] = new_weights
    return out


def covariance_from_factor(factor: Tensor, eps: float = 1e-4) -> Tensor:
    """Paper Eq. 9: ``C = C'^T C' + eps I``, symmetric positive definite for any ``C'``."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return factor.transpose(-1, -2) @ factor + eps * eye


def symmetric_cofactors_3d(a: Tensor, b: Tensor, c: Tensor, e: Tensor, f: Tensor, i: Tensor) -> tuple[Tensor, ...]:
    """The six distinct cofactors ``(A, B, C, E, F, I)`` of the symmetric matrix
    ``[[a, b, c], [b, e, f], [c, f, i]]``: its adjugate is ``[[A, B, C], [B, E, F], [C, F, I]]``
    and its determinant ``a A + b B + c C``."""
    return e * i - f * f, c * f - b * i, b * f - c * e, a * i - c * c, b * c - a * f, a * e - b * b


def symmetric_inverse_and_logdet(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse and log-determinant of ``[..., D, D]`` SPD matrices (D = 2, 3).

    Closed form (adjugate / determinant) rather than LAPACK: vectorises over any
    batch shape, is differentiable, and never raises on a badly conditioned
    matrix in the middle of training.
    """
    d = cov.shape[-1]
    if d == 2:
        a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
        det = a * c - b * b
        adj = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2)
    elif d == 3:
        a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 0, 2]
        e, f, i = cov[..., 1, 1], cov[..., 1, 2], cov[..., 2, 2]
        A, B, Cc, E, F, I = symmetric_cofactors_3d(a, b, c, e, f, i)
        det = a * A + b * B + c * Cc
        adj = torch.stack(
            [torch.stack([A, B, Cc], -1), torch.stack([B, E, F], -1), torch.stack([Cc, F, I], -1)], -2
        )
    else:
        raise ValueError(f"only 2D and 3D covariances are supported, got {d}D")
    tiny = torch.finfo(cov.dtype).tiny
    det = det.clamp_min(tiny)
    return adj / det[..., None, None], torch.log(det)


LOG_2PI = math.log(2 * math.pi)


def log_normaliser(logdet: Tensor, d: int) -> Tensor:
    """``log(1 / sqrt((2 pi)^D det C))`` from ``log det C``: the log peak of a normalised Gaussian."""
    return -0.5 * (logdet + d * LOG_2PI)


def normalisation_factors(m: Tensor) -> Tensor:
    """``[..., N]``: ``a_i / sqrt((2 pi)^D det C_i)``, the Gaussians' peak values."""
    d = n_dims(m)
    _, logdet = symmetric_inverse_and_logdet(covariances(m))
    return weights(m) * torch.exp(log_normaliser(logdet, d))


def quadratic_features(x: Tensor) -> Tensor:
    """``[..., D] -> [..., F]`` with ``F = D(D+1)/2 + D + 1``: ``[x_a x_b (a <= b), x, 1]``.

    With :func:`quadratic_coefficients` a Gaussian's exponent at ``x`` is one dot product
    (a matrix product for many points and Gaussians).
    """
    d = x.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=x.device)
    return torch.cat([x[..., rows] * x[..., cols], x, torch.ones_like(x[..., :1])], dim=-1)


def quadratic_coefficients(precision: Tensor, mean: Tensor, logdet: Tensor | None = None) -> Tensor:
    """``[..., F]`` so that ``quadratic_features(x) . A = -(x - mean)^T P (x - mean) / 2``
    for precision matrices ``P`` ``[..., D, D]`` and means ``[..., D]``; with ``logdet``
    (``log det C``, ``[...]``) the constant takes :func:`log_normaliser` too, so the dot
    product is ``log g(x; mean, C)`` of the normalised Gaussian."""
    d = mean.shape[-1]
    pmu = (precision @ mean.unsqueeze(-1)).squeeze(-1)
    rows, cols = torch.triu_indices(d, d, device=mean.device)
    # Off-diagonal entries appear twice in x^T P x.
    off_diagonal = torch.where(rows == cols, 1.0, 2.0).to(mean.dtype)
    constant = (mean * pmu).sum(-1, keepdim=True)
    if logdet is not None:  # -2 log_normaliser(logdet, d), added before the common factor -1/2
        constant = constant + logdet.unsqueeze(-1) + d * LOG_2PI
    return -0.5 * torch.cat([precision[..., rows, cols] * off_diagonal, -2.0 * pmu, constant], dim=-1)


def evaluate(m: Tensor, points: Tensor) -> Tensor:
    """Evaluate mixtures ``[B, C, N, K]`` at ``points`` ``[B, C, M, D]`` or ``[M, D]`` -> ``[B, C, M]``."""
    from gmbench import backends

    return backends.active().evaluate(m, points)


def evaluate_at_centroids(m: Tensor) -> Tensor:
    """Each mixture at its own Gaussians' centres: ``[B, C, N, K] -> [B, C, N]``.

    The O(N^2) hot spot of ReLU fitting (paper Eq. 7, Appendix C).
    """
    from gmbench import backends

    return backends.active().evaluate_at_centroids(m)


def evaluate_weight_sets_at_centroids(m: Tensor, weight_sets: Tensor) -> Tensor:
    """The Gaussians of ``m`` with ``W`` weight vectors, each at the centres: ``[B, C, N, W]``.

    ``weight_sets`` is ``[B, C, N, W]`` (it replaces ``weights(m)``).  Backends
    that implement it share every exponential between the ``W`` mixtures (one
    O(N^2) pass instead of ``W``); others evaluate them one by one.
    """
    from gmbench import backends

    backend = backends.active()
    if hasattr(backend, "evaluate_weight_sets_at_centroids"):
        return backend.evaluate_weight_sets_at_centroids(m, weight_sets)
    return torch.stack(
        [backend.evaluate_at_centroids(with_weights(m, w)) for w in weight_sets.unbind(-1)], dim=-1
    )


def integrate(m: Tensor) -> Tensor:
    """``[B, C]`` integrals over R^D: the sum of the weights (Gaussians are normalised)."""
    return weights(m).sum(-1)


def convolve(data: Tensor, kernels: Tensor) -> Tensor:
    """Analytic convolution summed over input channels (paper Eq. 3-4, Figure 1).

    Shapes: ``data [B, F_i, N_i, K]``, ``kernels [F_o, F_i, N_k, K]`` ->
    ``[B, F_o, F_i * N_i * N_k, K]``.
    """
    from gmbench import backends

    return backends.active().convolve(data, kernels)


def convolve_dense(data: Tensor, kernels: Tensor) -> Tensor:
    """Reference implementation of :func:`convolve` (Eq. 3: a*b, b+beta, C+Gamma)."""
    if data.shape[1] != kernels.shape[1]:
        raise ValueError(
            f"data has {data.shape[1]} channels but kernels expect {kernels.shape[1]} input channels"
        )
    if data.shape[-1] != kernels.shape[-1]:
        raise ValueError("data and kernels must have the same dimension")
    b, f_i, n_i, k = data.shape
    f_o, _, n_k, _ = kernels.shape
    # [B, 1, F_i, N_i, 1, K] and [1, F_o, F_i, 1, N_k, K]
    x = data[:, None, :, :, None, :]
    y = kernels[None, :, :, None, :, :]
    w = x[..., :1] * y[..., :1]
    rest = x[..., 1:] + y[..., 1:]  # positions and covariances both add
    out = torch.cat([w, rest], dim=-1)
    return out.reshape(b, f_o, f_i * n_i * n_k, k)


def mean_covariance_trace(m: Tensor, weighted: bool = False) -> Tensor:
    """``[B, C]`` mean trace of the covariances (padding with weight 0 excluded if ``weighted``)."""
    traces = torch.diagonal(covariances(m), dim1=-2, dim2=-1).sum(-1)
    if not weighted:
        return traces.mean(-1)
    mask = (weights(m) != 0).to(traces.dtype)
    return (traces * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def scale(m: Tensor, factor: Tensor) -> Tensor:
    """Scale the domain by ``factor`` (broadcast to ``[B, C]``): positions * s, covariances * s^2.

    Weights are kept, so every Gaussian keeps its integral.
    """
    factor = factor.to(m.dtype)
    while factor.dim() < m.dim() - 2:
        factor = factor.unsqueeze(-1)
    d = n_dims(m)
    s = factor[..., None, None]
    # One multiply by a [..., 1, K] row (1, s, .., s^2, ..): slicing, three products and a
    # concatenation made four passes over a reduction's full input, and as many in backward.
    row = torch.cat([torch.ones_like(s), s.expand(*s.shape[:-1], d), (s * s).expand(*s.shape[:-1], d * d)], -1)
    return m * row


def normalize_scale(m: Tensor, factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pooling rescale (paper Section 4.3): mean covariance trace becomes D.

    Returns ``(scaled, factor)``; ``factor`` (``[B, C]``) is
    ``sqrt(D / mean_trace)`` unless given, so callers can reuse it (for example
    a running average, or the same factor for a mixture and its fitting).
    """
    if factor is None:
        d = n_dims(m)
        trace = mean_covariance_trace(m).clamp_min(torch.finfo(m.dtype).tiny)
        factor = torch.sqrt(d / trace)
    return scale(m, factor), factor


def identity_covariances(shape: tuple[int, ...], dims: int, dtype=None, device=None) -> Tensor:
    eye = torch.eye(dims, dtype=dtype, device=device)
    return eye.expand(*shape, dims, dims).clone()


def pad(m: Tensor, n: int) -> Tensor:
    """Pad with zero-weight identity-covariance Gaussians to ``n`` components."""
    missing = n - m.shape[-2]
    if missing <= 0:
        return m
    d = n_dims(m)
    shape = (*m.shape[:-2], missing)
    filler = pack(
        torch.zeros(shape, dtype=m.dtype, device=m.device),
        positions(m).mean(-2, keepdim=True).detach().expand(*shape, d) if m.shape[-2] else
        torch.zeros(*shape, d, dtype=m.dtype, device=m.device),
        identity_covariances(shape, d, m.dtype, m.device),
    )
    return torch.cat([m, filler], dim=-2)


def check_finite(m: Tensor, what: str = "mixture") -> Tensor:
    """Raise a clear ``ValueError`` if ``m`` holds NaN or infinity."""
    if not torch.isfinite(m).all():
        bad = (~torch.isfinite(m)).sum().item()
        raise ValueError(f"{what} contains {bad} non-finite values (NaN or inf)")
    return m
