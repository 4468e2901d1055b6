r"""What every input-fitting plugin shares: argument checks, standardisation, output layout.

A plugin subclasses :class:`InputFitting` and implements
``fit_standardized(x, w, n_components, reg_covar, generator) -> MixtureParameters``
on standardised coordinates (:func:`gmbench.input_fitting.em.standardize`).
:meth:`InputFitting.fit` maps the result back and builds the network input
(:func:`to_input_mixture`).

Input normalisation (paper Section 5: "The mixture weights are then normalized
such that the mixtures have the same activation across all training samples on
average. Covariance matrices and positions are normalized using the same
procedure as for pooling"), precisely:

1. positions and covariances are scaled by ``s = sqrt(D / mean_k tr C_k)`` per
   sample (:func:`gmbench.mixture.normalize_scale`, the pooling rescale of
   Section 4.3): afterwards the mean covariance trace is ``D``;
2. the weights are ``a_k = pi_k / A`` with ``A`` the mean over the Gaussians of
   the (probability) mixture evaluated at their own centres,
   :math:`A = \frac1N \sum_k \sum_j \pi_j g(b_k; b_j, C_j)`.  So every sample's
   mean activation at its centres is exactly 1, the same across all samples,
   and relative weights are those of the fit.
"""

from __future__ import annotations

import abc
import math
import os
from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.errors import DataError, GmbenchError
from gmbench.input_fitting.em import (
    MixtureParameters,
    normalize_point_weights,
    standardize,
    unstandardize,
)


def to_input_mixture(params: MixtureParameters, normalize: bool = True) -> Tensor:
    """``[B, 1, N, 1+D+D*D]`` network input from a probability mixture (see module docstring).

    With ``normalize=False`` the mixture is returned as fitted (weights ``pi``, data units).
    """
    m = gm.pack(params.pi, params.mu, params.cov).unsqueeze(1)
    if not normalize:
        return m
    m, _ = gm.normalize_scale(m)
    activation = gm.evaluate_at_centroids(m).mean(-1)  # [B, 1]
    return gm.with_weights(m, gm.weights(m) / activation.clamp_min(torch.finfo(m.dtype).tiny).unsqueeze(-1))


AUTO_REG_QUERIES = 512


def sampling_cell_variance(x: Tensor, w: Tensor) -> Tensor:
    """``[B]``: ``d^2 / 12``, ``d`` the mean distance from a point to its nearest neighbour.

    Each sample point stands for a cell of the sampling resolution; a uniform
    cell of side ``d`` has variance ``d^2 / 12`` per axis.  This is ``reg_covar="auto"``:
    exactly the pixel variance ``1/12`` for images given as pixel centres, and
    about ``1e-3`` for 1024 points on the surface of a unit sphere.  Up to
    ``AUTO_REG_QUERIES`` evenly spaced points of positive weight are the queries.
    """
    b, p, _ = x.shape
    valid = w > 0
    # Evenly spaced queries among each set's points of positive weight.
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    count = valid.sum(-1)  # [B], >= 1
    q = min(p, AUTO_REG_QUERIES)
    rank = (torch.arange(q, device=x.device, dtype=x.dtype) / q * count.unsqueeze(-1)).long()
    queries = torch.gather(order, 1, rank)  # [B, q]
    distance = torch.cdist(torch.gather(x, 1, queries.unsqueeze(-1).expand(-1, -1, x.shape[-1])), x)
    distance = distance.masked_fill(~valid.unsqueeze(1), math.inf)
    distance.scatter_(2, queries.unsqueeze(-1), math.inf)  # not the point itself
    nearest = distance.amin(-1)
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    spacing = nearest.mean(-1)
    return (spacing**2 / 12).clamp_min(1e-8)


def check_points(points: Tensor, weights: Tensor | None, n_components: int) -> None:
    """Raise :class:`DataError` for inputs no fitting method can use."""
    if points.dim() != 3 or points.shape[-1] not in gm.DIMS:
        raise DataError(f"input fitting needs points [B, P, 2|3], got shape {tuple(points.shape)}")
    if weights is not None and weights.shape != points.shape[:2]:
        raise DataError(f"point weights must be [B, P] = {tuple(points.shape[:2])}, got {tuple(weights.shape)}")
    if not torch.isfinite(points).all() or (weights is not None and not torch.isfinite(weights).all()):
        raise DataError("points or point weights contain NaN or inf; check the data set files")
    if weights is not None and bool((weights < 0).any()):
        raise DataError("point weights must be non-negative")
    if n_components < 1:
        raise DataError(f"n_components must be at least 1, got {n_components}")
    support = (weights > 0).sum(-1) if weights is not None else torch.full(points.shape[:1], points.shape[1])
    if bool((support < 1).any()):
        raise DataError("a point set has no point with positive weight; remove empty samples from the data set")


class InfeasibleFit(GmbenchError):
    """More Gaussians than the points per sample or the memory can support (raised before fitting)."""


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (CPU: physical RAM; CUDA: the GPU's), ``None`` if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def _size(n_bytes: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= factor:
            return f"{n_bytes / factor:.1f} {unit}"
    return f"{n_bytes} bytes"


# The parameters shared by every input-fitting plugin, described once.
RegCovar = Annotated[
    float | Literal["auto"],
    "added to every covariance diagonal (data units), or auto: per sample d^2 / 12 for mean nearest-neighbour spacing d",
]
Normalize = Annotated[bool, "apply the paper's input normalisation (weights, positions and covariances)"]
FitSeed = Annotated[int, "seed of the random initialisation"]
FitDtype = Annotated[Literal["float32", "float64"], "compute precision of the fit"]
FitDevice = Annotated[str | None, "where the fit runs, e.g. cuda (null: the points' device)"]


class InputFitting(abc.ABC):
    """Base class of the input-fitting plugins (not itself a plugin).

    Parameters shared by all methods:
    ``reg_covar`` is added to every covariance diagonal (data units, like
    scikit-learn's), or ``"auto"``: per sample :func:`sampling_cell_variance`
    (``d^2 / 12`` for mean nearest-neighbour spacing ``d``); ``normalize`` applies the paper's input normalisation
    (module docstring); ``seed`` seeds random initialisation; ``dtype``
    (``"float32"`` / ``"float64"``) is the compute precision; ``device``
    (``None``: the points' device) is where the fit runs.
    """

    name = ""

    def __init__(self, reg_covar: RegCovar = "auto", normalize: Normalize = True, seed: FitSeed = 0,
                 dtype: FitDtype = "float32", device: FitDevice = None):
        if reg_covar != "auto" and not (isinstance(reg_covar, (int, float)) and reg_covar > 0):
            raise ValueError(f"reg_covar must be a positive number or 'auto', got {reg_covar!r}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.reg_covar = reg_covar if reg_covar == "auto" else float(reg_covar)
        self.normalize = bool(normalize)
        self.seed = int(seed)
        self.dtype = getattr(torch, dtype)
        self.device = device

    @abc.abstractmethod
    def fit_standardized(self, x: Tensor, w: Tensor, n_components: int, reg_covar: Tensor,
                         generator: torch.Generator) -> MixtureParameters:
        """The method itself: fit ``n_components`` Gaussians to standardised points ``x [B, P, D]``
        with normalised weights ``w [B, P]``; ``reg_covar [B]`` is in standardised units."""

    def min_memory_elements(self, n_points: int, n_components: int, dims: int) -> int:
        """A lower bound on the tensor elements one sample's fit holds at once: the points
        with their moment features and a few copies of the parameters.  Methods that hold
        a full ``[P, N]`` responsibility tensor add it (the feasibility check)."""
        return n_points * (dims * dims + dims + 2) + 2 * n_components * (1 + dims + dims * dims)

    def check_feasible(self, batch: int, n_points: int, n_components: int, dims: int, device: torch.device) -> None:
        """Raise :class:`InfeasibleFit` before any work when ``n_components`` Gaussians cannot be
        fitted: more of them than the ``n_points`` points per sample, or more memory than
        ``device`` has (k-means++ alone would otherwise run ``N`` seeding steps, minutes for
        ``N = 10**6``, before failing)."""
        if n_components > n_points:
            raise InfeasibleFit(
                f"n_gaussians (n_components) = {n_components} is more than the {n_points} points per sample; "
                f"a mixture cannot have more Gaussians than points: use n_gaussians <= {n_points} "
                "or more points per sample (the data set's n_points)"
            )
        have = device_memory_bytes(device)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        one = self.min_memory_elements(n_points, n_components, dims) * itemsize
        if have is None or batch * one <= have:
            return
        if one > have:
            raise InfeasibleFit(
                f"input fitting '{self.name}' of n_gaussians (n_components) = {n_components} to {n_points} points "
                f"per sample needs at least {_size(one)} for one sample, more than the {_size(have)} of {device.type} "
                "memory: use fewer Gaussians or fewer points per sample (the data set's n_points)"
            )
        raise InfeasibleFit(
            f"input fitting '{self.name}' of {batch} samples at once needs at least {_size(batch * one)}, more than "
            f"the {_size(have)} of {device.type} memory: fit at most {have // one} samples per call"
        )

    def fit_parameters(self, points: Tensor, n_components: int, weights: Tensor | None = None) -> MixtureParameters:
        """The fitted probability mixture in the points' units (no input normalisation)."""
        check_points(points, weights, n_components)
        device = torch.device(self.device) if self.device else points.device
        self.check_feasible(points.shape[0], points.shape[1], int(n_components), points.shape[-1], device)
        points = points.to(device=device, dtype=self.dtype)
        w = normalize_point_weights(points, None if weights is None else weights.to(device))
        x, centre, scale = standardize(points, w)
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        if self.reg_covar == "auto":
            reg = sampling_cell_variance(x, w)  # already in standardised units
        else:
            reg = self.reg_covar / scale**2
        params = self.fit_standardized(x, w, int(n_components), reg, generator)
        return unstandardize(params, centre, scale)

    def fit(self, points: Tensor, n_components: int, weights: Tensor | None = None) -> Tensor:
        """``points [B, P, D]``, ``weights [B, P]`` or ``None`` -> ``[B, 1, n_components, 1+D+D*D]``.

        The result has the points' dtype and device.
        """
        params = self.fit_parameters(points, n_components, weights)
        m = to_input_mixture(params, self.normalize)
        m = gm.pad(m, int(n_components))
        return m.to(device=points.device, dtype=points.dtype)
