r"""The two baseline input variants of the paper's Table 1.

* ``input: points`` - a point cloud with the memory footprint of the mixture:
  :func:`matching_point_count` points per sample, drawn by
  :func:`sample_points` from the same source cloud the mixtures were fitted to.
* ``input: gm`` - the fitted mixture itself as a point set:
  :func:`mixture_point_features` turns each Gaussian into a point (its centre)
  with its weight and the unique entries of its covariance as features.

Both produce ``[S, P, D + F]`` tensors, the input of the baseline models
(``in_features = F``: 0 for points, ``1 + D(D+1)/2`` for mixtures).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.data.records import PointSetSplit
from gmbench.errors import DataError


def floats_per_gaussian(dims: int) -> int:
    """Floats that describe one Gaussian: weight, centre, unique covariance entries."""
    return 1 + dims + dims * (dims + 1) // 2


def gm_point_features(dims: int) -> int:
    """Per-point features (after the ``dims`` coordinates) of the ``gm`` input: ``1 + D(D+1)/2``."""
    return floats_per_gaussian(dims) - dims


def matching_point_count(n_gaussians: int, dims: int) -> int:
    """Points whose coordinates take as many floats as ``n_gaussians`` Gaussians.

    ``P = floor(N * (1 + D + D(D+1)/2) / D)``: 3D 32 -> 106, 64 -> 213,
    128 -> 426 (the paper's Table 1); 2D ``P = 3 N``.  Rounded down, as the
    paper's numbers are (rounding to nearest would give 107 and 427).
    """
    if dims not in gm.DIMS:
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if n_gaussians < 1:
        raise ValueError(f"n_gaussians must be at least 1, got {n_gaussians}")
    return (n_gaussians * floats_per_gaussian(dims)) // dims


def sample_points(split: PointSetSplit, n_points: int, seed: int) -> Tensor:
    """Draw ``n_points`` points per sample from the split's source clouds: ``[S, P, D]``.

    Unweighted clouds (3D): uniformly without replacement (with replacement
    only for a cloud with fewer than ``n_points`` points).  Weighted sets
    (2D images: pixel centres weighted by intensity, padding weight 0): with
    probability proportional to the weight, without replacement while the
    sample has at least ``n_points`` points of positive weight, else with
    replacement (a 28x28 digit has ~150 inked pixels; 64 Gaussians match 192
    points).  The same ``seed`` gives the same points.
    """
    if n_points < 1:
        raise ValueError(f"n_points must be at least 1, got {n_points}")
    points = split.points
    where = f"data set '{split.dataset or '?'}' split '{split.split or '?'}'"
    if not torch.isfinite(points).all():
        raise DataError(f"{where} has non-finite point coordinates; re-create or re-download the data files")
    s, p, _ = points.shape
    if split.weights is None:
        probabilities = torch.ones(s, p, dtype=torch.float64)
    else:
        probabilities = split.weights.detach().to(torch.float64).cpu()
        if not torch.isfinite(probabilities).all() or bool((probabilities < 0).any()):
            raise DataError(f"{where} has negative or non-finite point weights; check the data files")
    support = (probabilities > 0).sum(1)
    if bool((support == 0).any()):
        empty = int((support == 0).nonzero()[0])
        name = split.names[empty] if split.names else f"#{empty}"
        raise DataError(f"{where}: sample {name} has no point with positive weight; remove it from the data")
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.empty(s, n_points, dtype=torch.long)
    enough = support >= n_points
    if bool(enough.any()):
        index[enough] = torch.multinomial(probabilities[enough], n_points, replacement=False, generator=generator)
    if bool((~enough).any()):
        index[~enough] = torch.multinomial(probabilities[~enough], n_points, replacement=True, generator=generator)
    index = index.to(points.device)
    return torch.gather(points, 1, index[..., None].expand(-1, -1, points.shape[-1]))


def mixture_point_features(m: Tensor) -> Tensor:
    """Gaussians as feature points: ``[S, 1, N, 1+D+D*D] -> [S, N, D + 1 + D(D+1)/2]``.

    Per Gaussian: centre (D), weight (1), covariance upper triangle row by row
    (``c_00, c_01, .., c_0D, c_11, ..``; D(D+1)/2).
    """
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"expected input mixtures [S, 1, N, K], got {tuple(m.shape)}")
    d = gm.n_dims(m)
    rows, cols = torch.triu_indices(d, d, device=m.device)
    unique_covariance = gm.covariances(m)[..., rows, cols]
    features = torch.cat([gm.positions(m), gm.weights(m).unsqueeze(-1), unique_covariance], dim=-1)
    return features[:, 0]


def check_classifier_arguments(num_classes: int, dims: int, in_features: int) -> None:
    """The framework-supplied arguments every baseline validates (``ValueError`` -> one-line PluginError)."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_features < 0:
        raise ValueError(f"in_features must be >= 0, got {in_features}")


def normalize_to_unit_ball(x: Tensor, dims: int) -> Tensor:
    """Centre each set's coordinates on their mean and scale them into the unit ball.

    ``x [B, P, dims + F] -> [B, P, dims + F]``; only the first ``dims`` columns
    change (features pass through).  PointNet's ModelNet pipeline normalises so,
    and PointNet++'s ball radii (0.2, 0.4) assume it, whatever units the data
    set or the input fitting used.
    """
    coordinates = x[..., :dims]
    centred = coordinates - coordinates.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.cat([centred / radius[..., None], x[..., dims:]], dim=-1)
