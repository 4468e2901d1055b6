"""Fitting a few Gaussians to a small set of Gaussians: TreeHEM's per-node step.

A batch of independent problems ``[M, S, K]`` (mask ``[M, S]``), each reduced
to ``n_out`` Gaussians (a per-problem count, at most ``max_out``):

1. initial Gaussians: the ``S`` centroids are clustered by single linkage
   (Euclidean distance between centroids; Gaussians of opposite sign are never
   merged) into ``n_out`` clusters, and the Gaussian with the largest ``|w|``
   of each cluster is taken (paper Appendix D: "the most important Gaussians
   that have the least overlap");
2. one E step and one M step (Eq. 15-16, :mod:`gmbench.reduction.em`).

Shapes are small (``S = 2T``); everything is vectorised over ``M``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gmbench import mixture as gm
from gmbench.reduction.em import em_step


def take(m: Tensor, index: Tensor) -> Tensor:
    """``m[g, index[g, w]]``: ``[G, N, K]``, ``[G, W]`` -> ``[G, W, K]``.

    Through ``index_select`` rather than ``gather``: autograd then keeps only
    the indices for backward, not a copy of all of ``m``.
    """
    g, n = m.shape[:2]
    flat = (index + torch.arange(g, device=index.device).unsqueeze(-1) * n).flatten()
    return m.reshape(g * n, *m.shape[2:]).index_select(0, flat).view(*index.shape, *m.shape[2:])


def compact(m: Tensor, valid: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Move the valid Gaussians to the front (stable) and keep ``width`` slots."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[..., :width]
    return take(m, order), valid.gather(-1, order)


@torch.no_grad()
def single_linkage_labels(positions: Tensor, weights: Tensor, valid: Tensor, n_clusters: Tensor) -> Tensor:
    """Cluster labels ``[M, S]`` from single-linkage clustering into ``n_clusters`` (``[M]``) groups.

    Kruskal's algorithm on the complete graph of centroid distances: merge the
    closest pair of different clusters until ``n_clusters`` remain.  Pairs of
    opposite sign and invalid Gaussians never merge, so more clusters may
    remain when there is nothing left that may merge.
    """
    m, s = valid.shape
    # Squared distances order pairs like distances do (cdist is slow on tiny sets).
    dist = (positions.unsqueeze(-2) - positions.unsqueeze(-3)).pow(2).sum(-1)
    mergeable = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    mergeable &= (weights.unsqueeze(-1) >= 0) == (weights.unsqueeze(-2) >= 0)
    mergeable &= ~torch.eye(s, dtype=torch.bool, device=valid.device)
    labels = torch.arange(s, device=valid.device).expand(m, s).clone()
    remaining = valid.sum(-1)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    for _ in range(s - 1):  # at most S - 1 merges
        need = remaining > n_clusters
        if not bool(need.any()):
            break
        candidates = mergeable & (labels.unsqueeze(-1) != labels.unsqueeze(-2))
        flat = torch.where(candidates, dist, inf).flatten(1)
        best_value, best = flat.min(-1)
        merge = need & torch.isfinite(best_value)
        label_i = labels.gather(1, (best // s).unsqueeze(-1))
        label_j = labels.gather(1, (best % s).unsqueeze(-1))
        labels = torch.where(merge.unsqueeze(-1) & (labels == label_j), label_i, labels)
        remaining = remaining - merge.to(remaining.dtype)
    return labels


def initial_gaussians(target: Tensor, valid: Tensor, n_out: Tensor, max_out: int) -> tuple[Tensor, Tensor]:
    """The heaviest Gaussian of each single-linkage cluster: ``([M, max_out, K], valid [M, max_out])``."""
    with torch.no_grad():
        weights = gm.weights(target)
        magnitude = torch.where(valid, weights.abs(), torch.full_like(weights, -1.0))
        labels = single_linkage_labels(gm.positions(target), weights, valid, n_out)
        s = magnitude.shape[-1]
        index = torch.arange(s, device=magnitude.device)
        # j beats i: larger |w|, or equal |w| and lower index (a strict total order).
        heavier = (magnitude.unsqueeze(-2) > magnitude.unsqueeze(-1)) | (
            (magnitude.unsqueeze(-2) == magnitude.unsqueeze(-1)) & (index < index.unsqueeze(-1))
        )
        same = (labels.unsqueeze(-1) == labels.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
        beaten = (same & heavier).any(-1)
        representative = valid & ~beaten
        score = torch.where(representative, magnitude, torch.full_like(magnitude, -1.0))
        order = torch.argsort(-score, dim=-1, stable=True)[:, :max_out]
        slot = torch.arange(order.shape[1], device=order.device)
        init_valid = (score.gather(-1, order) >= 0) & (slot < n_out.unsqueeze(-1))
    return take(target, order), init_valid


def fit_nodes(
    target: Tensor,
    valid: Tensor,
    n_out: Tensor,
    max_out: int,
    virtual_points: float,
    kl_threshold: float | None,
    recompute: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fit ``n_out`` (``[M]``) Gaussians to each of ``M`` small mixtures ``[M, S, K]``.

    Returns ``([M, max_out, K], valid [M, max_out])``; the total integral of
    every problem is preserved (see :mod:`gmbench.reduction.em`).  With
    ``recompute`` the EM step keeps only its inputs for backward and runs
    again there (activation checkpointing): a few hundred floats less per
    problem for one more forward pass of the EM step.
    """
    init, init_valid = initial_gaussians(target, valid, n_out, max_out)
    if recompute and torch.is_grad_enabled() and (target.requires_grad or init.requires_grad):
        return checkpoint(
            em_step, target, valid, init, init_valid, virtual_points, kl_threshold, use_reentrant=False
        )
    return em_step(target, valid, init, init_valid, virtual_points, kl_threshold)
