"""A procedural 10-class 3D shape data set (plugin ``shapes3d``), generated, deterministic from ``seed``.

Classes: box, sphere, ellipsoid, cylinder, cone, torus, capsule, pyramid,
prism (triangular), l_shape.  Every sample has random proportions (ranges
chosen so that classes overlap: near-round ellipsoids vs spheres, short
cylinders vs prisms vs capsules, cones vs pyramids, flat boxes vs L-shapes),
a random rotation (``rotation="so3"``: uniform over all rotations; ``"z"``:
about the up axis only, as ModelNet is aligned), area-weighted surface
samples (:mod:`gmbench.data.sampling`), normalisation into the unit sphere and
Gaussian jitter of standard deviation ``noise``.

Shapes are built as meshes of a fixed topology per class (surfaces of
revolution with 3, 4 or 32 segments, or an extruded L polygon), so each class
is generated as one batch.  The train and test splits use independent random
streams derived from ``seed``.
"""

from __future__ import annotations

import math
import zlib
from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench.data.records import PointSetSplit
from gmbench.data.sampling import normalize_to_unit_sphere, sample_surface
from gmbench.errors import DataError
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl

CLASSES = ["box", "sphere", "ellipsoid", "cylinder", "cone", "torus", "capsule", "pyramid", "prism", "l_shape"]
ShapeName = Literal[tuple(CLASSES)]


def lathe(profile: Tensor, segments: int, closed_profile: bool = False, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Surface of revolution about z: ``profile [S, K, 2]`` rows ``(radius, z)`` -> vertices ``[S, K*U, 3]``, faces.

    ``segments`` corners per ring starting at angle ``offset`` (``4`` and ``pi/4``: axis-aligned square)."""
    if closed_profile:
        profile = torch.cat([profile, profile[:, :1]], 1)
    s, k, _ = profile.shape
    theta = torch.arange(segments) * (2 * math.pi / segments) + offset
    r, z = profile[..., 0:1], profile[..., 1:2]
    vertices = torch.stack([r * torch.cos(theta), r * torch.sin(theta), z.expand(-1, -1, segments)], -1)
    ring = torch.arange(k - 1)[:, None] * segments
    u = torch.arange(segments)[None]
    a, b = ring + u, ring + (u + 1) % segments
    c, d = a + segments, b + segments
    faces = torch.cat([torch.stack([a, b, d], -1).reshape(-1, 3), torch.stack([a, d, c], -1).reshape(-1, 3)])
    return vertices.reshape(s, k * segments, 3), faces


def arc(s: int, steps: int, start: float, stop: float) -> tuple[Tensor, Tensor]:
    angle = torch.linspace(start, stop, steps).expand(s, steps)
    return torch.cos(angle), torch.sin(angle)


def uniform(generator: torch.Generator, s: int, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(s, *shape, generator=generator)


def closed_cylinder_profile(radius: Tensor, half_height: Tensor) -> Tensor:
    zero = torch.zeros_like(radius)
    return torch.stack([torch.stack([zero, -half_height], -1), torch.stack([radius, -half_height], -1),
                        torch.stack([radius, half_height], -1), torch.stack([zero, half_height], -1)], 1)


def l_shape_mesh(width: Tensor, height: Tensor, thickness: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
    """An L polygon (corner at the origin, arms ``width`` and ``height`` of ``thickness``) extruded by ``depth``."""
    zero = torch.zeros_like(width)
    polygon = torch.stack([torch.stack(p, -1) for p in [
        (zero, zero), (width, zero), (width, thickness), (thickness, thickness), (thickness, height), (zero, height)]], 1)
    s = width.shape[0]
    bottom = torch.cat([polygon, (-depth / 2)[:, None, None].expand(s, 6, 1)], -1)
    top = torch.cat([polygon, (depth / 2)[:, None, None].expand(s, 6, 1)], -1)
    vertices = torch.cat([bottom, top], 1)  # [S, 12, 3]
    cap = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]])
    sides = [[i, (i + 1) % 6, 6 + (i + 1) % 6] for i in range(6)] + [[i, 6 + (i + 1) % 6, 6 + i] for i in range(6)]
    faces = torch.cat([cap, cap + 6, torch.tensor(sides)])
    return vertices, faces


def shape_meshes(name: str, s: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``s`` random meshes of class ``name``: vertices ``[s, V, 3]``, faces ``[F, 3]`` (shared topology)."""
    g = generator
    if name in ("box", "prism", "cylinder"):
        segments = {"box": 4, "prism": 3, "cylinder": 32}[name]
        vertices, faces = lathe(closed_cylinder_profile(torch.ones(s), torch.full((s,), 1.0)), segments,
                                offset=math.pi / 4 if name == "box" else 0.0)
        if name == "box":
            axes = uniform(g, s, 0.25, 1.0, 3)
        else:
            radius = uniform(g, s, 0.4, 1.0)
            axes = torch.stack([radius, radius * uniform(g, s, 0.8, 1.0), uniform(g, s, 0.2, 1.2)], -1)
        return vertices * axes[:, None], faces
    if name in ("sphere", "ellipsoid"):
        cos, sin = arc(s, 17, -math.pi / 2, math.pi / 2)
        vertices, faces = lathe(torch.stack([cos, sin], -1), 32)
        if name == "sphere":
            axes = uniform(g, s, 0.93, 1.0, 3)
        else:
            axes = torch.sort(uniform(g, s, 0.3, 1.0, 3), -1).values
            axes[:, 2] = 1.0
            axes[:, 0] = torch.minimum(axes[:, 0], torch.full((s,), 0.8))  # at least one clearly short axis
        return vertices * axes[:, None], faces
    if name in ("cone", "pyramid"):
        radius, half = uniform(g, s, 0.35, 1.0), uniform(g, s, 0.25, 0.8)
        zero = torch.zeros(s)
        profile = torch.stack([torch.stack([zero, -half], -1), torch.stack([radius, -half], -1),
                               torch.stack([zero, half], -1)], 1)
        vertices, faces = lathe(profile, 32 if name == "cone" else 4, offset=math.pi / 4)
        if name == "pyramid":
            vertices = vertices * torch.stack([torch.ones(s), uniform(g, s, 0.6, 1.0), torch.ones(s)], -1)[:, None]
        return vertices, faces
    if name == "torus":
        tube = uniform(g, s, 0.12, 0.5)
        cos, sin = arc(s, 16, 0, 2 * math.pi * 15 / 16)
        profile = torch.stack([1 + tube[:, None] * cos, tube[:, None] * sin], -1)
        vertices, faces = lathe(profile, 32, closed_profile=True)
        return vertices * torch.stack([torch.ones(s), torch.ones(s), uniform(g, s, 0.7, 1.0)], -1)[:, None], faces
    if name == "capsule":
        radius, half = uniform(g, s, 0.25, 0.6), uniform(g, s, 0.1, 0.9)
        cos, sin = arc(s, 9, -math.pi / 2, 0)
        low = torch.stack([radius[:, None] * cos, radius[:, None] * sin - half[:, None]], -1)
        high = torch.stack([radius[:, None] * cos.flip(-1), -radius[:, None] * sin.flip(-1) + half[:, None]], -1)
        return lathe(torch.cat([low, high], 1), 32)
    if name == "l_shape":
        width, height = uniform(g, s, 0.5, 1.0), uniform(g, s, 0.5, 1.0)
        thickness = torch.minimum(width, height) * uniform(g, s, 0.25, 0.6)
        return l_shape_mesh(width, height, thickness, uniform(g, s, 0.15, 0.8))
    raise ValueError(f"unknown shape {name!r}")


def random_rotations(s: int, generator: torch.Generator, mode: str) -> Tensor:
    """``[s, 3, 3]`` rotations: uniform over SO(3) (``"so3"``), about z (``"z"``) or identity (``"none"``)."""
    if mode == "none":
        return torch.eye(3).expand(s, 3, 3)
    if mode == "z":
        angle = uniform(generator, s, 0, 2 * math.pi)
        c, si, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(s), torch.ones(s)
        return torch.stack([torch.stack([c, -si, zero], -1), torch.stack([si, c, zero], -1),
                            torch.stack([zero, zero, one], -1)], -2)
    q, r = torch.linalg.qr(torch.randn(s, 3, 3, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar measure (Mezzadri 2007)
    return q * torch.sign(torch.linalg.det(q))[:, None, None]  # proper rotations only


class Shapes3D:
    """Procedural 10-class 3D shapes (box, sphere, ..., L-shape) sampled from surfaces; embedded, seeded."""

    name = "shapes3d"

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int, "points sampled per shape"] = 1024,
        samples_per_class: Annotated[int, "training shapes per class"] = 64,
        test_samples_per_class: Annotated[int, "test shapes per class"] = 32,
        noise: Annotated[float, "standard deviation of the Gaussian jitter of every point"] = 0.01,
        rotation: Annotated[Literal["so3", "z", "none"], "random rotation of each shape: any, about z, or none"] = "so3",
        classes: Annotated[list[ShapeName] | None, "the shapes to generate, in label order (null: all ten)"] = None,
    ):
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ValueError(f"classes must name distinct shapes among {', '.join(CLASSES)}, got {classes!r}")
        if n_points < 1 or samples_per_class < 1 or test_samples_per_class < 1:
            raise ValueError("n_points, samples_per_class and test_samples_per_class must be positive")
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        if rotation not in ("so3", "z", "none"):
            raise ValueError(f"rotation must be 'so3', 'z' or 'none', got {rotation!r}")
        self.data_root = data_root  # accepted for a uniform interface; the data are generated
        self.seed = int(seed)
        self.n_points = int(n_points)
        self.samples_per_class = int(samples_per_class)
        self.test_samples_per_class = int(test_samples_per_class)
        self.noise = float(noise)
        self.rotation = rotation
        self.classes = list(CLASSES if classes is None else classes)

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` with points ``[10 * per_class, n_points, 3]`` in the unit sphere, no weights."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split '{split}' for shapes3d; use train or test")
        count = self.samples_per_class if split == "train" else self.test_samples_per_class
        clouds, labels, names = [], [], []
        for label, shape in enumerate(self.classes):
            stream = zlib.crc32(f"{split}/{shape}".encode())
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
            vertices, faces = shape_meshes(shape, count, generator)
            rotation = random_rotations(count, generator, self.rotation)
            points = sample_surface(vertices @ rotation.transpose(-1, -2), faces, self.n_points, generator)
            points = normalize_to_unit_sphere(points)
            points = points + self.noise * torch.randn(points.shape, generator=generator)
            clouds.append(points)
            labels += [label] * count
            names += [f"shapes3d/{split}/{shape}_{i:04d}" for i in range(count)]
        return PointSetSplit(points=torch.cat(clouds).float(), labels=torch.tensor(labels), class_names=list(self.classes),
                             names=names, dataset="shapes3d", split=split)


@hookimpl
def gmbench_dataset():
    return Shapes3D
