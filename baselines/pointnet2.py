r"""PointNet++ SSG classification network (Qi et al., NeurIPS 2017), plugin ``pointnet2``.

The standard single-scale-grouping configuration of the authors'
``pointnet2_cls_ssg``, built on torch-geometric's :class:`PointNetConv` and
:func:`global_max_pool`:

==========  ===========  ======  ==========  ================
layer       sampling     radius  neighbours  shared MLP
==========  ===========  ======  ==========  ================
SA 1        FPS, 1/2     0.2     32          64-64-128
SA 2        FPS, 1/4     0.4     64          128-128-256
SA global   all points   -       all         256-512-1024
head        -            -       -           FC 512-256-k
==========  ===========  ======  ==========  ================

(The authors sample 512 of 1024 points and then 128; here the same ratios.)
A set abstraction computes, for each sampled centre :math:`c`,

.. math:: f'_c = \max_{j:\, |p_j - c| \le r} h([f_j, p_j - c]),

with ``h`` the shared MLP (linear + batch norm + ReLU per layer).  The head
uses batch norm, ReLU and dropout 0.5 as the authors'.  Coordinates are
normalised into the unit ball first (``normalize``) because the radii assume
it.  Farthest point sampling and the radius search come from
:mod:`gmbench.baselines.sampling` (pyg-lib / torch-cluster when installed,
otherwise vectorised PyTorch).  In training the FPS start point is random; in
evaluation it is the point farthest from the centroid, so predictions do not
depend on the order of the input points.  About 1.47 M parameters for 3D and
k = 10.

Shapes: ``x [B, P, D + in_features]`` -> log-probabilities ``[B, num_classes]``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from gmbench.baselines import sampling
from gmbench.baselines.batchnorm import BatchNormMomentumSchedule
from gmbench.baselines.inputs import check_classifier_arguments
from gmbench.baselines.pointnet import fully_connected, prepare_input
from gmbench.parameters import Dims, NumClasses
from gmbench.plugins import hookimpl


def point_mlp(channels: list[int]) -> nn.Sequential:
    """Shared MLP on flat per-point (or per-edge) rows ``[E, C]``: linear + batch norm + ReLU."""
    return fully_connected(channels)


class SetAbstraction(nn.Module):
    """Sample centres by FPS, group neighbours within ``radius``, PointNet per group.

    Shapes: ``features [N, C] | None``, ``pos [N, D]``, ``batch [N]`` ->
    ``([M, C_out], [M, D], [M])`` with ``M = sum_b ceil(ratio * n_b)``.
    """

    def __init__(self, ratio: float, radius: float, max_neighbors: int, channels: list[int]):
        super().__init__()
        self.ratio = ratio
        self.radius = radius
        self.max_neighbors = max_neighbors
        # Imported here, not at module level: torch_geometric pulls in torch._dynamo
        # (~2 s), and every `gmbench` command registers this plugin module.
        from torch_geometric.nn import PointNetConv

        self.conv = PointNetConv(point_mlp(channels), add_self_loops=False)

    def forward(self, features: Tensor | None, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        index = sampling.farthest_point_sampling(pos, batch, self.ratio, random_start=self.training)
        # Row 0: centre (query), row 1: neighbour.  Each centre is its own
        # neighbour (distance 0), so no group is empty.
        centre, neighbour = sampling.radius(
            pos, pos[index], self.radius, batch, batch[index], max_num_neighbors=self.max_neighbors
        )
        edge_index = torch.stack([neighbour, centre])
        target = None if features is None else features[index]
        out = self.conv((features, target), (pos, pos[index]), edge_index)
        return out, pos[index], batch[index]


class GlobalSetAbstraction(nn.Module):
    """One group holding every point: shared MLP on ``[f_j, p_j]`` then max pool -> ``[B, C_out]``."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.mlp = point_mlp(channels)

    def forward(self, features: Tensor, pos: Tensor, batch: Tensor, batch_size: int) -> Tensor:
        from torch_geometric.nn import global_max_pool

        return global_max_pool(self.mlp(torch.cat([features, pos], dim=1)), batch, size=batch_size)


class PointNet2(nn.Module):
    """PointNet++ SSG classifier (Qi et al. 2017) on points or Gaussians-as-points.

    Parameters: ``in_features`` per-point features after the ``dims``
    coordinates (0: plain points; ``1 + D(D+1)/2``: the ``gm`` input);
    ``ratios``, ``radii`` and ``max_neighbors`` of the two set abstractions
    (standard SSG); ``dropout`` in the head; ``normalize`` centres each input
    set and scales it into the unit ball; ``bn_momentum`` /
    ``bn_decay_samples``: the authors' batch-norm momentum schedule (halved
    every ``bn_decay_samples`` training samples, at least 0.01; see
    :mod:`gmbench.baselines.batchnorm`).
    """

    name = "pointnet2"

    def __init__(
        self,
        num_classes: NumClasses,
        dims: Dims,
        in_features: Annotated[int, "per-point features after the coordinates (set by the runner from 'input')"] = 0,
        ratios: Annotated[tuple[float, float], "fraction of points kept by each set abstraction"] = (0.5, 0.25),
        radii: Annotated[tuple[float, float], "ball-query radius of each set abstraction"] = (0.2, 0.4),
        max_neighbors: Annotated[tuple[int, int], "neighbours per ball query of each set abstraction"] = (32, 64),
        dropout: Annotated[float, "dropout in the classification head"] = 0.5,
        normalize: Annotated[bool, "centre each input set and scale it into the unit ball"] = True,
        bn_momentum: Annotated[float, "initial batch-norm momentum of the authors' schedule"] = 0.5,
        bn_decay_samples: Annotated[int, "the momentum halves every this many training samples (at least 0.01)"] = 200_000,
    ):
        super().__init__()
        check_classifier_arguments(num_classes, dims, in_features)
        ratios, radii, max_neighbors = tuple(ratios), tuple(radii), tuple(max_neighbors)
        if len(ratios) != 2 or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"ratios must be two numbers in (0, 1], got {ratios}")
        if len(radii) != 2 or not all(r > 0 for r in radii):
            raise ValueError(f"radii must be two positive numbers, got {radii}")
        if len(max_neighbors) != 2 or not all(int(k) >= 1 for k in max_neighbors):
            raise ValueError(f"max_neighbors must be two positive integers, got {max_neighbors}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dims = dims
        self.in_features = in_features
        self.normalize = normalize
        self.bn_schedule = BatchNormMomentumSchedule(bn_momentum, bn_decay_samples, minimum=min(0.01, bn_momentum))
        self.sa1 = SetAbstraction(ratios[0], radii[0], int(max_neighbors[0]), [in_features + dims, 64, 64, 128])
        self.sa2 = SetAbstraction(ratios[1], radii[1], int(max_neighbors[1]), [128 + dims, 128, 128, 256])
        self.sa3 = GlobalSetAbstraction([256 + dims, 256, 512, 1024])
        self.classifier = nn.Sequential(fully_connected([1024, 512, 256], dropout), nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = prepare_input(self, x)
        b, p, _ = x.shape
        flat = x.reshape(b * p, -1)
        pos = flat[:, : self.dims].contiguous()
        features = flat[:, self.dims :] if self.in_features else None
        batch = torch.arange(b, device=x.device).repeat_interleave(p)
        features, pos, batch = self.sa1(features, pos, batch)
        features, pos, batch = self.sa2(features, pos, batch)
        pooled = self.sa3(features, pos, batch, b)
        return torch.log_softmax(self.classifier(pooled), dim=-1)


@hookimpl
def gmbench_model():
    return PointNet2
