r"""Area-weighted uniform sampling of triangle-mesh surfaces, seeded and vectorised.

torch-geometric's ``SamplePoints`` draws from the global RNG; this sampler
takes an explicit :class:`torch.Generator`, so a sample's points depend only
on its seed.  A point is drawn by picking a triangle with probability
proportional to its area, then uniform barycentric coordinates
(:math:`u = 1 - \sqrt{r_1}`, :math:`v = \sqrt{r_1}(1 - r_2)`, Osada et al. 2002).
"""

from __future__ import annotations

import torch
from torch import Tensor


def triangle_areas(vertices: Tensor, faces: Tensor) -> Tensor:
    """``vertices [..., V, 3]``, ``faces [F, 3]`` -> areas ``[..., F]``."""
    a, b, c = (vertices[..., faces[:, i], :] for i in range(3))
    return 0.5 * torch.linalg.norm(torch.cross(b - a, c - a, dim=-1), dim=-1)


def sample_surface(vertices: Tensor, faces: Tensor, n_points: int, generator: torch.Generator) -> Tensor:
    """``n_points`` points on the surface of meshes with a shared topology.

    Shapes: ``vertices [S, V, 3]`` (or ``[V, 3]``), ``faces [F, 3]`` int64 ->
    ``[S, n_points, 3]`` (or ``[n_points, 3]``).  Raises :class:`ValueError` for a mesh
    with NaN/inf coordinates or zero surface area (callers name the file).
    """
    single = vertices.dim() == 2
    if single:
        vertices = vertices.unsqueeze(0)
    areas = triangle_areas(vertices.double(), faces)  # double: tiny and huge triangles in one mesh
    # torch.multinomial would only say "invalid multinomial distribution".
    if not bool(torch.isfinite(areas).all()):
        raise ValueError("mesh has NaN or infinite vertex coordinates")
    if bool((areas.sum(-1) <= 0).any()):
        raise ValueError("mesh has zero surface area")
    chosen = torch.multinomial(areas, n_points, replacement=True, generator=generator)  # [S, n]
    corners = faces[chosen]  # [S, n, 3]
    s = vertices.shape[0]
    rows = torch.arange(s).unsqueeze(-1)
    a, b, c = (vertices[rows, corners[..., i]] for i in range(3))
    r1 = torch.rand(s, n_points, 1, generator=generator, dtype=vertices.dtype)
    r2 = torch.rand(s, n_points, 1, generator=generator, dtype=vertices.dtype)
    root = torch.sqrt(r1)
    points = (1 - root) * a + root * (1 - r2) * b + root * r2 * c
    return points[0] if single else points


def normalize_to_unit_sphere(points: Tensor) -> Tensor:
    """Centre each cloud ``[S, P, 3]`` at its centroid and scale it so the farthest point is at
    distance 1 (PointNet++'s ``pc_normalize``)."""
    centre = points.mean(1, keepdim=True)
    shifted = points - centre
    radius = torch.linalg.norm(shifted, dim=-1).amax(-1).clamp_min(1e-12)
    return shifted / radius[:, None, None]
