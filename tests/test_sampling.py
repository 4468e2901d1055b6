"""Farthest point sampling and radius search (gmbench.baselines.sampling) against brute force."""

import math

import numpy as np
import pytest
import torch

from gmbench.baselines import sampling
from gmbench.errors import GmbenchError


def random_batch(sizes, dims=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), dims, generator=generator) * 2 - 1
    batch = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(sizes)])
    return pos, batch


def brute_force_fps(points: np.ndarray, n_sample: int, start: int) -> list[int]:
    """Textbook FPS, one point at a time, in float64."""
    picked = [start]
    nearest = np.full(len(points), np.inf)
    for _ in range(n_sample - 1):
        nearest = np.minimum(nearest, ((points - points[picked[-1]]) ** 2).sum(1))
        picked.append(int(np.argmax(nearest)))
    return picked


def brute_force_radius(x, y, r, batch_x, batch_y):
    """Every (query, point) pair of the same example within distance r, in index order."""
    pairs = []
    for i in range(len(y)):
        for j in range(len(x)):
            if batch_x[j] == batch_y[i] and np.linalg.norm(x[j] - y[i]) <= r:
                pairs.append((i, j))
    return pairs


@pytest.mark.parametrize("dims", [2, 3])
def test_fps_fallback_matches_brute_force_on_uneven_batches(dims):
    sizes = [37, 5, 64]
    pos, batch = random_batch(sizes, dims)
    start = torch.tensor([0, 3, 17])
    index = sampling.farthest_point_sampling_torch(pos, batch, 0.3, start)
    expected, offset = [], 0
    for b, n in enumerate(sizes):
        local = brute_force_fps(pos[offset : offset + n].double().numpy(), math.ceil(0.3 * n), int(start[b]))
        expected += [offset + i for i in local]
        offset += n
    assert index.tolist() == expected


def test_fps_keeps_ceil_ratio_points_per_example_and_stays_in_its_example():
    sizes = [10, 7, 1]
    pos, batch = random_batch(sizes)
    index = sampling.farthest_point_sampling_torch(pos, batch, 0.25)
    assert torch.bincount(batch[index]).tolist() == [math.ceil(0.25 * n) for n in sizes]
    assert len(set(index.tolist())) == len(index)


def test_fps_with_ratio_one_returns_every_point_once():
    pos, batch = random_batch([12, 9])
    index = sampling.farthest_point_sampling_torch(pos, batch, 1.0)
    assert sorted(index.tolist()) == list(range(21))


def test_fps_rejects_ratio_outside_unit_interval():
    pos, batch = random_batch([4])
    with pytest.raises(ValueError, match="ratio"):
        sampling.farthest_point_sampling_torch(pos, batch, 0.0)


def test_fps_without_random_start_picks_the_same_points_whatever_their_order():
    pos, batch = random_batch([50, 40])
    picked = sampling.farthest_point_sampling(pos, batch, 0.5, random_start=False)
    permutation = torch.cat([torch.randperm(50), 50 + torch.randperm(40)])
    picked_permuted = sampling.farthest_point_sampling(pos[permutation], batch, 0.5, random_start=False)
    assert sorted(permutation[picked_permuted].tolist()) == sorted(picked.tolist())


def test_fps_deterministic_start_is_the_point_farthest_from_the_centroid():
    pos, batch = random_batch([30])
    first = int(sampling.farthest_point_sampling(pos, batch, 0.2, random_start=False)[0])
    assert first == int(((pos - pos.mean(0)) ** 2).sum(1).argmax())


@pytest.mark.parametrize("dims", [2, 3])
def test_radius_fallback_matches_brute_force_without_cap(dims):
    x, batch_x = random_batch([40, 25, 33], dims, seed=1)
    y, batch_y = random_batch([6, 9, 4], dims, seed=2)
    edges = sampling.radius_torch(x, y, 0.6, batch_x, batch_y, max_num_neighbors=1000)
    expected = brute_force_radius(x.double().numpy(), y.double().numpy(), 0.6, batch_x.numpy(), batch_y.numpy())
    assert sorted(map(tuple, edges.t().tolist())) == expected
    assert len(expected) > 50  # the radius really selects many pairs


def test_radius_cap_keeps_the_lowest_indices_of_each_ball():
    x, batch_x = random_batch([60, 45], seed=3)
    y, batch_y = random_batch([5, 7], seed=4)
    edges = sampling.radius_torch(x, y, 1.0, batch_x, batch_y, max_num_neighbors=8)
    expected = brute_force_radius(x.double().numpy(), y.double().numpy(), 1.0, batch_x.numpy(), batch_y.numpy())
    for query in range(len(y)):
        full = [j for i, j in expected if i == query]
        got = edges[1, edges[0] == query].tolist()
        assert got == full[:8]
    assert any(len([1 for i, _ in expected if i == q]) > 8 for q in range(len(y)))


def test_radius_never_links_points_of_different_examples():
    # Two examples at the same coordinates: every pair would be within r.
    x = torch.zeros(6, 3)
    batch_x = torch.tensor([0, 0, 0, 1, 1, 1])
    edges = sampling.radius_torch(x, x[[0, 3]], 0.1, batch_x, torch.tensor([0, 1]), max_num_neighbors=10)
    assert sorted(map(tuple, edges.t().tolist())) == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]


def test_radius_chunked_queries_give_the_same_edges(monkeypatch):
    x, batch_x = random_batch([30, 30], seed=5)
    whole = sampling.radius_torch(x, x, 0.5, batch_x, batch_x, max_num_neighbors=64)
    monkeypatch.setattr(sampling, "_RADIUS_QUERY_CHUNK", 7)
    chunked = sampling.radius_torch(x, x, 0.5, batch_x, batch_x, max_num_neighbors=64)
    assert torch.equal(whole, chunked)


def test_sampling_backend_names_a_known_implementation():
    assert sampling.sampling_backend() in sampling.BACKENDS


def test_sampling_backend_can_be_forced_and_rejects_unknown_names(monkeypatch):
    sampling.sampling_backend.cache_clear()
    try:
        monkeypatch.setenv("GMBENCH_SAMPLING_BACKEND", "torch")
        assert sampling.sampling_backend() == "torch"
        sampling.sampling_backend.cache_clear()
        monkeypatch.setenv("GMBENCH_SAMPLING_BACKEND", "cuda-magic")
        with pytest.raises(GmbenchError, match="GMBENCH_SAMPLING_BACKEND"):
            sampling.sampling_backend()
    finally:
        sampling.sampling_backend.cache_clear()


@pytest.mark.skipif(sampling.sampling_backend() == "torch", reason="no native FPS/radius kernels installed here")
def test_native_kernels_agree_with_the_fallback():
    pos, batch = random_batch([80, 50], seed=6)
    native = sampling.farthest_point_sampling(pos, batch, 0.4, random_start=False)
    counts = torch.bincount(batch)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    start = sampling._start_points(pos, counts, ptr, random_start=False)
    assert torch.equal(native, sampling.farthest_point_sampling_torch(pos, batch, 0.4, start))
    edges = sampling.radius(pos, pos[native], 0.5, batch, batch[native], max_num_neighbors=500)
    reference = sampling.radius_torch(pos, pos[native], 0.5, batch, batch[native], max_num_neighbors=500)
    assert sorted(map(tuple, edges.t().tolist())) == sorted(map(tuple, reference.t().tolist()))
