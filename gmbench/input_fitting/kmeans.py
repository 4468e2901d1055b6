r"""Batched k-means (farthest-point / k-means++ seeding, Lloyd iterations) and the ``kmeans`` plugin.

Shapes: points ``x [B, P, D]``, point weights ``w [B, P]`` (padding = 0),
centres ``[B, N, D]``, labels ``[B, P]``.  Loops run over the N seeds or the
Lloyd iterations, never over the B samples.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench.input_fitting.base import FitDevice, FitDtype, FitSeed, InputFitting, Normalize, RegCovar
from gmbench.input_fitting.em import MixtureParameters, empty_safe, run_em
from gmbench.plugins import hookimpl

SEEDINGS = ("fps", "kmeans++")
ASSIGN_TILE_ELEMENTS = 1 << 19


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``[B, P, N]`` squared Euclidean distances (one GEMM)."""
    d2 = (x * x).sum(-1, keepdim=True) - 2 * torch.bmm(x, centres.transpose(1, 2))
    return (d2 + (centres * centres).sum(-1).unsqueeze(1)).clamp_min_(0)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, P, D]`` rows ``index [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def farthest_point_sampling(x: Tensor, w: Tensor, n: int) -> Tensor:
    """``[B, n, D]`` centres: start at the point farthest from the weighted mean, then
    repeatedly add the point farthest from all chosen ones (points of weight 0 never chosen)."""
    valid = w > 0
    mean = (w.unsqueeze(-1) * x).sum(1, keepdim=True) / w.sum(-1)[:, None, None]
    index = ((x - mean) ** 2).sum(-1).masked_fill(~valid, -1.0).argmax(-1, keepdim=True)  # [B, 1]
    chosen = [index]
    distance = ((x - _gather(x, index)) ** 2).sum(-1).masked_fill(~valid, -1.0)
    for _ in range(n - 1):
        index = distance.argmax(-1, keepdim=True)
        chosen.append(index)
        distance = torch.minimum(distance, ((x - _gather(x, index)) ** 2).sum(-1))
    return _gather(x, torch.cat(chosen, 1))


def kmeans_plus_plus(x: Tensor, w: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``[B, n, D]`` greedy k-means++ seeds (Arthur & Vassilvitskii 2007; scikit-learn's variant).

    The first centre is drawn proportional to the point weights ``w``; each next
    one is the best (lowest weighted potential) of ``2 + log(n)`` candidates
    drawn proportional to ``w * D^2``.
    """
    trials = 2 + int(math.log(n))
    b, p, _ = x.shape
    norms = (x * x).sum(-1)  # [B, P]
    index = torch.multinomial(w, 1, generator=generator)
    distance = ((x - _gather(x, index)) ** 2).sum(-1)  # [B, P]
    chosen = [index]
    for _ in range(n - 1):
        potential = w * distance
        # A set whose points all coincide with chosen centres: fall back to w.
        potential = torch.where(potential.sum(-1, keepdim=True) > 0, potential, w)
        candidates = torch.multinomial(potential, trials, replacement=True, generator=generator)  # [B, T]
        centres = _gather(x, candidates)
        # |x - c|^2 = |x|^2 + |c|^2 - 2 c.x as one [B, T, P] GEMM, then the new nearest distances.
        candidate_distance = torch.baddbmm(norms.unsqueeze(1) + (centres * centres).sum(-1, keepdim=True),
                                           centres, x.transpose(1, 2), alpha=-2).clamp_min_(0)
        candidate_distance = torch.minimum(candidate_distance, distance.unsqueeze(1))
        best = torch.bmm(candidate_distance, w.unsqueeze(-1)).squeeze(-1).argmin(-1, keepdim=True)  # [B, 1]
        chosen.append(torch.gather(candidates, 1, best))
        distance = torch.gather(candidate_distance, 1, best.unsqueeze(-1).expand(b, 1, p)).squeeze(1)
    return _gather(x, torch.cat(chosen, 1))


def random_points(x: Tensor, w: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``[B, n, D]`` distinct points drawn proportional to ``w`` (with replacement only
    for sets with fewer than ``n`` points of positive weight)."""
    enough = bool(((w > 0).sum(-1) >= n).all())
    index = torch.multinomial(w, n, replacement=not enough, generator=generator)
    return _gather(x, index)


def assign(x: Tensor, centres: Tensor) -> Tensor:
    """``[B, P]`` index of the nearest centre.

    ``argmin_k |c_k|^2 - 2 x.c_k`` (``|x|^2`` does not change the argmin) as a GEMM of
    ``[x, 1]`` with ``[-2 c, |c|^2]``, in blocks of points so that each ``[B, block, N]``
    distance tile stays in cache for the argmin (about 2x faster than one big tile).
    """
    b, p, _ = x.shape
    augmented_x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    augmented_c = torch.cat([-2 * centres, (centres * centres).sum(-1, keepdim=True)], -1).transpose(1, 2)
    block = max(16, ASSIGN_TILE_ELEMENTS // max(1, b * centres.shape[1]))
    if block >= p:
        return torch.bmm(augmented_x, augmented_c).argmin(-1)
    return torch.cat([torch.bmm(augmented_x[:, start : start + block], augmented_c).argmin(-1)
                      for start in range(0, p, block)], 1)


def cluster_sums(x: Tensor, w: Tensor, labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Weighted cluster masses ``[B, n]`` and coordinate sums ``[B, n, D]`` (scatter-add, no one-hot)."""
    mass = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device).scatter_add_(1, labels, w)
    sums = torch.zeros(x.shape[0], n, x.shape[-1], dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, labels.unsqueeze(-1).expand_as(x), w.unsqueeze(-1) * x)
    return mass, sums


def lloyd(x: Tensor, w: Tensor, centres: Tensor, iterations: int, tolerance: float = 1e-4) -> Tensor:
    """Up to ``iterations`` weighted Lloyd iterations; an empty cluster keeps its centre.

    A set stops (its centres freeze) after the iteration in which its summed
    squared centre shift is at most ``tolerance`` times the mean per-coordinate
    variance of its points (scikit-learn's ``KMeans(tol=...)`` rule;
    ``tolerance=0``: all iterations).
    """
    n = centres.shape[1]
    mean = (w.unsqueeze(-1) * x).sum(1, keepdim=True) / w.sum(-1)[:, None, None]
    variance = (w.unsqueeze(-1) * (x - mean) ** 2).sum(1).mean(-1) / w.sum(-1)  # [B]
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        mass, sums = cluster_sums(x, w, assign(x, centres), n)
        updated = torch.where(mass.unsqueeze(-1) > 0, sums / mass.clamp_min(1e-30).unsqueeze(-1), centres)
        shift = ((updated - centres) ** 2).sum((-1, -2))
        # Converged sets freeze, so a set's result does not depend on the batch it is in.
        centres = torch.where(active[:, None, None], updated, centres)
        if tolerance > 0:
            active = active & ~(shift <= tolerance * variance)
            if not bool(active.any()):
                break
    return centres


def hard_m_step(x: Tensor, w: Tensor, centres: Tensor, reg_covar: Tensor | float) -> MixtureParameters:
    """One M step with hard nearest-centre assignments (the covariances of the k-means clusters).

    Same result as :func:`gmbench.input_fitting.em.m_step` with one-hot
    responsibilities, computed with scatter-adds.  A cluster without points
    keeps its centre and gets covariance ``reg_covar * I`` and weight ~0.
    """
    d = x.shape[-1]
    n = centres.shape[1]
    labels = assign(x, centres)
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    mass, sums = cluster_sums(torch.cat([x, outer], -1), w, labels, n)
    nk = empty_safe(mass)
    mu = sums[..., :d] / nk.unsqueeze(-1)
    cov = (sums[..., d:] / nk.unsqueeze(-1)).unflatten(-1, (d, d)) - mu.unsqueeze(-1) * mu.unsqueeze(-2)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    reg = torch.as_tensor(reg_covar, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    cov = cov + reg * torch.eye(d, dtype=x.dtype, device=x.device)
    mu = torch.where((mass <= 0).unsqueeze(-1), centres, mu)
    return MixtureParameters(nk / nk.sum(-1, keepdim=True), mu, cov)


def seed_centres(x: Tensor, w: Tensor, n: int, init: str, generator: torch.Generator) -> Tensor:
    if init == "fps":
        return farthest_point_sampling(x, w, n)
    if init == "kmeans++":
        return kmeans_plus_plus(x, w, n, generator)
    raise ValueError(f"init must be one of {', '.join(SEEDINGS)}, got {init!r}")


class KMeansFitting(InputFitting):
    """k-means centres, then one hard-assignment M step for the covariances (paper Section 5; Table 4 "k-means").

    Steps: seed ``N`` centres (``init``: ``kmeans++`` or ``fps`` = farthest
    point sampling), run up to ``iterations`` weighted Lloyd iterations (stop
    when centres move less than ``tolerance``, scikit-learn's rule), then one M
    step with the hard k-means assignments (each Gaussian = mean and
    covariance of its cluster, plus ``reg_covar``).  ``em_steps`` further soft
    EM steps may follow.  ``covariance="isotropic"`` replaces every covariance
    by ``tr(C)/D * I``.

    Default: ``init="kmeans++", iterations=20, tolerance=1e-4, covariance="full", em_steps=0``.
    The GMCN authors' inputs were farthest-point-sampled centres with isotropic
    covariances from one hard-assignment M step: ``init="fps", iterations=0,
    covariance="isotropic"``.
    """

    name = "kmeans"

    def __init__(
        self,
        init: Annotated[Literal["kmeans++", "fps"], "centre seeding: k-means++ or farthest point sampling"] = "kmeans++",
        iterations: Annotated[int, "at most this many weighted Lloyd iterations (0: seeding only)"] = 20,
        tolerance: Annotated[float, "stop when the centres move less than this (scikit-learn's rule)"] = 1e-4,
        covariance: Annotated[Literal["full", "isotropic"], "isotropic: every covariance becomes tr(C)/D * I"] = "full",
        em_steps: Annotated[int, "soft EM steps after the hard-assignment M step"] = 0,
        reg_covar: RegCovar = "auto",
        normalize: Normalize = True,
        seed: FitSeed = 0,
        dtype: FitDtype = "float32",
        device: FitDevice = None,
    ):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        if init not in SEEDINGS:
            raise ValueError(f"init must be one of {', '.join(SEEDINGS)}, got {init!r}")
        if covariance not in ("full", "isotropic"):
            raise ValueError(f"covariance must be 'full' or 'isotropic', got {covariance!r}")
        if iterations < 0 or em_steps < 0:
            raise ValueError("iterations and em_steps must be non-negative")
        self.init = init
        if tolerance < 0:
            raise ValueError(f"tolerance must be non-negative, got {tolerance}")
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)
        self.covariance = covariance
        self.em_steps = int(em_steps)

    def min_memory_elements(self, n_points, n_components, dims):
        # k-means++ candidate distances [T, P] (twice), one [16, N] assignment tile, and the
        # full [P, N] responsibilities of the E steps when em_steps > 0.
        extra = min(n_points, 16) * n_components
        if self.init == "kmeans++":
            extra += 2 * (2 + int(math.log(n_components))) * n_points
        if self.em_steps:
            extra += n_points * n_components
        return super().min_memory_elements(n_points, n_components, dims) + extra

    def fit_standardized(self, x, w, n_components, reg_covar, generator):
        centres = seed_centres(x, w, n_components, self.init, generator)
        centres = lloyd(x, w, centres, self.iterations, self.tolerance)
        params = hard_m_step(x, w, centres, reg_covar)
        if self.em_steps:
            params, _, _ = run_em(x, w, params, reg_covar, self.em_steps)
        if self.covariance == "isotropic":
            d = x.shape[-1]
            trace = torch.diagonal(params.cov, dim1=-2, dim2=-1).sum(-1)
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            params = MixtureParameters(params.pi, params.mu, (trace / d)[..., None, None] * eye)
        return params


@hookimpl
def gmbench_input_fitting():
    return KMeansFitting
