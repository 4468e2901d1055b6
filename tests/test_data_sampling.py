"""Area-weighted surface sampling against closed forms."""

import math

import pytest
import torch

from gmbench.data.sampling import normalize_to_unit_sphere, sample_surface, triangle_areas
from gmbench.data.shapes3d import lathe


def test_triangle_areas_closed_form():
    vertices = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 4]])
    faces = torch.tensor([[0, 1, 2], [0, 1, 3]])
    torch.testing.assert_close(triangle_areas(vertices, faces), torch.tensor([3.0, 4.0]))


def test_samples_are_distributed_proportionally_to_area():
    # Two unit-height triangles in separate planes, areas 1 and 3.
    vertices = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 5], [6, 0, 5], [0, 1, 5]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    points = sample_surface(vertices, faces, 40000, torch.Generator().manual_seed(0))
    share = (points[:, 2] > 2.5).float().mean().item()
    assert abs(share - 0.75) < 0.01  # binomial sd = 0.0022
    lower = points[points[:, 2] < 2.5]
    assert bool((lower[:, 0] / 2 + lower[:, 1] <= 1 + 1e-5).all())  # inside the triangle
    # Uniform in a triangle: the mean is the centroid.
    torch.testing.assert_close(lower[:, :2].mean(0), torch.tensor([2 / 3, 1 / 3]), atol=0.01, rtol=0)


def test_sampling_is_deterministic_from_the_generator():
    vertices = torch.rand(3, 10, 3)
    faces = torch.randint(0, 10, (12, 3))
    a = sample_surface(vertices, faces, 100, torch.Generator().manual_seed(4))
    b = sample_surface(vertices, faces, 100, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape == (3, 100, 3)


def test_lathe_sphere_points_lie_on_the_sphere_and_cover_it_uniformly():
    angle = torch.linspace(-math.pi / 2, math.pi / 2, 33)
    vertices, faces = lathe(torch.stack([torch.cos(angle), torch.sin(angle)], -1)[None], 64)
    points = sample_surface(vertices, faces, 20000, torch.Generator().manual_seed(1))[0]
    radius = points.norm(dim=-1)
    assert bool((radius < 1.0 + 1e-5).all()) and bool((radius > 0.99).all())
    # Archimedes: z is uniform on [-1, 1] for uniform points on a sphere.
    assert abs(points[:, 2].mean().item()) < 0.02
    assert abs((points[:, 2] > 0.5).float().mean().item() - 0.25) < 0.015


def test_unit_sphere_normalisation():
    points = torch.randn(2, 100, 3) * 7 + 3
    normalised = normalize_to_unit_sphere(points)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.norm(dim=-1).amax(-1), torch.ones(2))


def test_non_finite_vertices_are_a_clear_value_error_not_a_multinomial_failure():
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, float("nan"), 0]])
    faces = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="NaN or infinite vertex coordinates"):
        sample_surface(vertices, faces, 10, torch.Generator().manual_seed(0))
