r"""Farthest point sampling and radius (ball-query) search for PointNet++.

Both operate on PyG-style flat point sets: ``pos [N, D]`` with a sorted batch
vector ``batch [N]`` (example ``b`` owns the contiguous rows with
``batch == b``).

torch-geometric's :func:`torch_geometric.nn.fps` / :func:`~torch_geometric.nn.radius`
need pyg-lib (or, in older releases, torch-cluster), which have no wheels for
every torch build.  :func:`sampling_backend` probes once which implementation
works here and every call uses it:

* ``"pyg-lib"`` - ``torch_geometric.nn.fps`` / ``radius`` (pyg-lib kernels);
* ``"torch-cluster"`` - ``torch_cluster.fps`` / ``radius``;
* ``"torch"`` - the vectorised PyTorch implementations in this module
  (:func:`farthest_point_sampling_torch`, :func:`radius_torch`), which run on
  any device and are tested against brute force.

Set ``GMBENCH_SAMPLING_BACKEND=torch`` to force the PyTorch fallback.

Semantics shared by all backends (those of PointNet++ and torch-cluster):

* FPS picks ``ceil(ratio * n_b)`` points of each example, starting from a given
  point and then repeatedly the point farthest (Euclidean) from the points
  already picked.  Indices come grouped by example, in picking order.
* Radius search returns, for each query ``y_i``, the points ``x_j`` of the same
  example with ``|x_j - y_i| <= r``; at most ``max_num_neighbors`` of them, the
  ones with the smallest index (the CUDA ball query of PointNet++ does the
  same).  The native CPU kernels cap differently (the first ones found in a
  tree search), which only matters when a ball holds more than the cap.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from gmbench.errors import GmbenchError

BACKENDS = ("pyg-lib", "torch-cluster", "torch")

# Query rows processed at once by :func:`radius_torch`; bounds the dense
# distance block to about this many * points-per-example floats.
_RADIUS_QUERY_CHUNK = 4096


def _probe_pyg_lib() -> bool:
    try:
        from torch_geometric.nn import fps, radius

        x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        fps(x, None, ratio=0.5, random_start=False)
        radius(x, x, 0.5, max_num_neighbors=4)
        return True
    except (ImportError, RuntimeError, AttributeError, NotImplementedError):
        return False


def _probe_torch_cluster() -> bool:
    try:
        import torch_cluster

        x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        torch_cluster.fps(x, None, ratio=0.5, random_start=False)
        torch_cluster.radius(x, x, 0.5, max_num_neighbors=4)
        return True
    except (ImportError, OSError, RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=1)
def sampling_backend() -> str:
    """Which implementation FPS and radius search use here: one of :data:`BACKENDS`.

    Probed once per process (a tiny call of each candidate); the runner
    records it in the environment record.
    """
    forced = os.environ.get("GMBENCH_SAMPLING_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise GmbenchError(
                f"GMBENCH_SAMPLING_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}; "
                "unset it or pick one of those"
            )
        return forced
    if _probe_pyg_lib():
        return "pyg-lib"
    if _probe_torch_cluster():
        return "torch-cluster"
    return "torch"


def _batch_layout(batch: Tensor | None, n: int, device) -> tuple[Tensor, Tensor, int]:
    """``(counts [B], ptr [B+1], B)`` of a sorted batch vector (``None``: one example)."""
    if batch is None:
        counts = torch.tensor([n], device=device)
    else:
        if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch vector must be sorted (examples stored contiguously)")
        size = int(batch.max()) + 1 if batch.numel() else 0
        counts = torch.bincount(batch, minlength=size)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.long, device=device)
    ptr[1:] = counts.cumsum(0)
    return counts, ptr, counts.numel()


def _to_dense(pos: Tensor, counts: Tensor, ptr: Tensor) -> tuple[Tensor, Tensor]:
    """Pad a flat point set into ``[B, P_max, D]`` plus a validity mask ``[B, P_max]``."""
    b = counts.numel()
    p_max = int(counts.max()) if b else 0
    local = torch.arange(p_max, device=pos.device)
    mask = local[None, :] < counts[:, None]
    dense = pos.new_zeros(b, p_max, pos.shape[-1])
    dense[mask] = pos
    return dense, mask


def farthest_point_sampling_torch(pos: Tensor, batch: Tensor | None, ratio: float, start: Tensor | None = None) -> Tensor:
    """Farthest point sampling in plain PyTorch, all examples at once.

    Shapes: ``pos [N, D]``, ``batch [N]`` (sorted) or ``None``, ``start [B]``
    (local index of each example's first point; default 0) -> ``index [M]``
    into ``pos`` with ``M = sum_b ceil(ratio * n_b)``, grouped by example in
    picking order.  One step per sampled point, each an ``O(B * P_max)``
    update of the squared distance to the picked set.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    counts, ptr, b = _batch_layout(batch, pos.shape[0], pos.device)
    dense, mask = _to_dense(pos, counts, ptr)
    n_sample = torch.ceil(counts.to(torch.float64) * ratio).long()
    m_max = int(n_sample.max()) if b else 0
    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=pos.device)
    rows = torch.arange(b, device=pos.device)
    # Padding gets -1 so it is never the farthest; real points start at +inf.
    distance = torch.full(mask.shape, float("inf"), dtype=pos.dtype, device=pos.device)
    distance[~mask] = -1.0
    picked = torch.empty(b, m_max, dtype=torch.long, device=pos.device)
    current = start.to(torch.long)
    with torch.no_grad():
        for step in range(m_max):
            picked[:, step] = current
            delta = dense - dense[rows, current].unsqueeze(1)
            distance = torch.minimum(distance, (delta * delta).sum(-1))
            current = distance.argmax(dim=1)
    keep = torch.arange(m_max, device=pos.device)[None, :] < n_sample[:, None]
    return (picked + ptr[:-1, None])[keep]


def radius_torch(
    x: Tensor,
    y: Tensor,
    r: float,
    batch_x: Tensor | None = None,
    batch_y: Tensor | None = None,
    max_num_neighbors: int = 32,
) -> Tensor:
    """Radius search in plain PyTorch: ``edge_index [2, E]`` of ``(query, point)`` pairs.

    Shapes: ``x [N, D]``, ``y [M, D]``, sorted batch vectors ``batch_x [N]``,
    ``batch_y [M]`` -> ``[2, E]`` with row 0 indexing ``y`` (sorted) and row 1
    indexing ``x``, as :func:`torch_geometric.nn.radius`.  For each query the
    neighbours with ``|x_j - y_i| <= r`` in increasing index order, at most
    ``max_num_neighbors``.  Each query is compared with every point of its own
    example (dense, chunked over queries), which is what small point clouds
    (up to a few thousand points) need.
    """
    counts_x, ptr_x, bx = _batch_layout(batch_x, x.shape[0], x.device)
    counts_y, ptr_y, by = _batch_layout(batch_y, y.shape[0], y.device)
    if batch_y is None:
        batch_y = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    if by > bx:
        raise ValueError(f"queries belong to {by} examples but points to only {bx}")
    dense_x, mask_x = _to_dense(x, counts_x, ptr_x)
    r2 = float(r) * float(r)
    rows, cols = [], []
    with torch.no_grad():
        for lo in range(0, y.shape[0], _RADIUS_QUERY_CHUNK):
            q = y[lo : lo + _RADIUS_QUERY_CHUNK]
            qb = batch_y[lo : lo + _RADIUS_QUERY_CHUNK]
            candidates = dense_x[qb]  # [Q, P_max, D]
            d2 = ((candidates - q[:, None, :]) ** 2).sum(-1)
            inside = (d2 <= r2) & mask_x[qb]
            # Keep the first max_num_neighbors hits of each row (index order).
            inside &= inside.cumsum(1) <= max_num_neighbors
            query, local = inside.nonzero(as_tuple=True)
            rows.append(query + lo)
            cols.append(local + ptr_x[qb[query]])
    if not rows:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _start_points(pos: Tensor, counts: Tensor, ptr: Tensor, random_start: bool) -> Tensor:
    """Local start index per example.

    ``random_start``: uniform (torch's global RNG, so seeded runs repeat).
    Otherwise the point farthest from the example's centroid, which does not
    depend on the order of the points, so evaluation is permutation invariant.
    """
    b = counts.numel()
    if random_start:
        return (torch.rand(b, device=pos.device) * counts).long().clamp_max(counts - 1)
    dense, mask = _to_dense(pos, counts, ptr)
    centroid = (dense * mask[..., None]).sum(1) / counts[:, None].clamp_min(1)
    d2 = ((dense - centroid[:, None]) ** 2).sum(-1).masked_fill(~mask, -1.0)
    return d2.argmax(dim=1)


def farthest_point_sampling(pos: Tensor, batch: Tensor | None, ratio: float, random_start: bool = True) -> Tensor:
    """FPS with the backend of :func:`sampling_backend`: ``pos [N, D]`` -> ``index [M]``.

    ``random_start=False`` starts each example at its point farthest from the
    centroid (order independent); ``True`` at a random point.  Native kernels
    always start at an example's first row, so that point is swapped to the
    front before the call and the indices are mapped back.
    """
    counts, ptr, _ = _batch_layout(batch, pos.shape[0], pos.device)
    start = _start_points(pos, counts, ptr, random_start)
    backend = sampling_backend()
    if backend == "torch":
        return farthest_point_sampling_torch(pos, batch, ratio, start)
    order = torch.arange(pos.shape[0], device=pos.device)
    first, chosen = ptr[:-1], ptr[:-1] + start
    order[first], order[chosen] = chosen, first
    if backend == "pyg-lib":
        from torch_geometric.nn import fps as native_fps
    else:
        from torch_cluster import fps as native_fps
    index = native_fps(pos[order], None if batch is None else batch, ratio=ratio, random_start=False)
    return order[index]


def radius(
    x: Tensor,
    y: Tensor,
    r: float,
    batch_x: Tensor | None = None,
    batch_y: Tensor | None = None,
    max_num_neighbors: int = 32,
) -> Tensor:
    """Radius search with the backend of :func:`sampling_backend` (see :func:`radius_torch`)."""
    backend = sampling_backend()
    if backend == "torch":
        return radius_torch(x, y, r, batch_x, batch_y, max_num_neighbors)
    if backend == "pyg-lib":
        from torch_geometric.nn import radius as native_radius
    else:
        from torch_cluster import radius as native_radius
    return native_radius(x, y, r, batch_x, batch_y, max_num_neighbors=max_num_neighbors)
