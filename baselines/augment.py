r"""Optional training augmentation for the baselines (off by default: the paper trains without it).

The usual PointNet recipe, for users who want the usual PointNet numbers:
random rotation about the up axis (3D) or in the plane (2D), per-sample
uniform scaling, and Gaussian jitter of the coordinates.  For the ``gm`` input
(centre, weight, unique covariance entries per point, see
:func:`gmbench.baselines.inputs.mixture_point_features`) the covariances are
transformed consistently: :math:`C' = s^2 R C R^T`; weights stay; jitter moves
centres only.

An instance is the trainer's ``augment(x, generator) -> x`` callable
(``x [B, P, D + F]``), applied to training batches only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class PointCloudAugmentation:
    """Random rotation about the up axis, scaling and jitter of ``[B, P, D + F]`` point sets.

    Parameters: ``dims``; ``input`` ("points" or "gm": whether the features
    are a Gaussian's weight and covariance, which must rotate and scale with
    the centre); ``rotate`` (uniform angle in [0, 2 pi)); ``up_axis`` (3D
    rotation axis: 0, 1 or 2); ``scale`` (``(low, high)`` of a uniform
    per-sample factor, or ``None``); ``jitter`` (standard deviation of
    per-point Gaussian noise, 0 = off) and ``jitter_clip`` (noise is clipped to
    +- this, as in PointNet).
    """

    def __init__(
        self,
        dims: int,
        input: str = "points",
        rotate: bool = False,
        up_axis: int = 2,
        scale: tuple[float, float] | None = None,
        jitter: float = 0.0,
        jitter_clip: float = 0.05,
    ):
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if input not in ("points", "gm"):
            raise ValueError(f"input must be 'points' or 'gm', got {input!r}")
        if up_axis not in (0, 1, 2):
            raise ValueError(f"up_axis must be 0, 1 or 2, got {up_axis}")
        if scale is not None:
            scale = tuple(float(s) for s in scale)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
                raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if jitter < 0 or jitter_clip <= 0:
            raise ValueError(f"jitter must be >= 0 and jitter_clip > 0, got {jitter}, {jitter_clip}")
        self.dims = dims
        self.input = input
        self.rotate = rotate
        self.up_axis = up_axis
        self.scale = scale
        self.jitter = jitter
        self.jitter_clip = jitter_clip

    @property
    def enabled(self) -> bool:
        return self.rotate or self.scale is not None or self.jitter > 0

    def rotation_matrices(self, batch: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
        """``[B, D, D]`` rotations by uniform random angles (about ``up_axis`` in 3D)."""
        angle = torch.rand(batch, generator=generator, dtype=torch.float64) * (2 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        plane = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        if self.dims == 2:
            return plane.to(dtype)
        axes = [a for a in range(3) if a != self.up_axis]
        rotation = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        for i, row in enumerate(axes):
            for j, col in enumerate(axes):
                rotation[:, row, col] = plane[:, i, j]
        return rotation.to(dtype)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if not self.enabled:
            return x
        d = self.dims
        b, p, _ = x.shape
        # Draw on the CPU generator, then move: the same seed gives the same
        # augmentation on any device.
        transform = torch.eye(d, dtype=torch.float64).repeat(b, 1, 1)
        if self.rotate:
            transform = self.rotation_matrices(b, generator, torch.float64)
        if self.scale is not None:
            low, high = self.scale
            factor = low + (high - low) * torch.rand(b, generator=generator, dtype=torch.float64)
            transform = transform * factor[:, None, None]
        transform = transform.to(dtype=x.dtype, device=x.device)
        coordinates = x[..., :d] @ transform.transpose(1, 2)
        if self.jitter > 0:
            noise = torch.randn(b, p, d, generator=generator, dtype=torch.float64) * self.jitter
            coordinates = coordinates + noise.clamp(-self.jitter_clip, self.jitter_clip).to(x.dtype).to(x.device)
        features = x[..., d:]
        if self.input == "gm":
            features = self._transform_gaussian_features(features, transform)
        return torch.cat([coordinates, features], dim=-1)

    def _transform_gaussian_features(self, features: Tensor, transform: Tensor) -> Tensor:
        """Weight stays; the unique covariance entries become those of ``T C T^T``."""
        d = self.dims
        expected = 1 + d * (d + 1) // 2
        if features.shape[-1] != expected:
            raise ValueError(f"input 'gm' needs {expected} features per point (weight, covariance), got {features.shape[-1]}")
        rows, cols = torch.triu_indices(d, d, device=features.device)
        covariance = features.new_zeros(*features.shape[:-1], d, d)
        covariance[..., rows, cols] = features[..., 1:]
        covariance[..., cols, rows] = features[..., 1:]
        t = transform[:, None]  # [B, 1, D, D]
        covariance = t @ covariance @ t.transpose(-1, -2)
        return torch.cat([features[..., :1], covariance[..., rows, cols]], dim=-1)
