r"""TreeHEM: tree-based hierarchical EM reduction (paper Section 4.1, Appendix D).

Algorithm, vectorised level by level over all mixtures and tree nodes (the
only Python loops run over tree levels and over the at most ``2T - 1`` merge
steps of the per-node clustering):

1. pre-scale every mixture so its mean covariance trace is ``D`` (undone at the end);
2. sort the Gaussians by the Morton code of their centroids (``morton_bits`` per
   axis inside the mixture's bounding box); Gaussians with ``|w| < weight_threshold``
   are dropped;
3. build a complete binary tree over the sorted sequence whose bottom nodes hold
   ``T`` consecutive Gaussians (a node with at most ``T`` Gaussians passes them
   up unchanged, so nothing happens below that level); the sort puts the real
   Gaussians first, so each level fits only the prefix of nodes that holds any
   (the padding to a power of two and the dropped Gaussians cost nothing);
4. bottom-up: each node collects the up to ``2T`` Gaussians of its children; if
   there are more than ``T``, it picks ``T`` initial ones (single-linkage
   clustering of the centroids, heaviest of each cluster) and runs one E step
   (Eq. 15, Preiner's likelihood with ``virtual_points`` virtual samples and a
   KL gate ``kl_threshold``) and one M step (Eq. 16); the result is cached in
   the node;
5. top-down: starting from the root, greedily replace the frontier node of
   largest mass by its two children.

Differences to the authors' CUDA implementation, all deliberate:

* the tree is a balanced binary tree over the Morton-sorted Gaussians, not the
  LBVH radix tree (whose irregular shape does not vectorise level by level);
* the greedy top-down pass is computed in closed form: with node keys made
  monotone (a child's mass key never exceeds its parent's), best-first
  expansion expands exactly the nodes with the largest keys, so a sort and a
  cumulative sum of the Gaussian counts find the cut;
* the authors stop at ``N_p - T`` Gaussians and pad with zeros; here the node
  that would overshoot ``N_p`` is *partially* expanded: its children's
  Gaussians are fitted (same per-node step) by exactly as many Gaussians as are
  still missing plus its own, so the result has exactly ``N_p`` real Gaussians
  whenever the input has at least ``N_p`` Gaussians with ``|w| >= weight_threshold``;
* gradients come from autograd (the authors wrote a manual CUDA backward); with
  ``recompute`` (default) the per-node EM steps are recomputed in backward
  instead of stored (activation checkpointing), which keeps the training
  memory below MEM's.

Cost: ``O(N log N)`` time for the sort, ``O(N T^2)`` for the node fits, ``O(N)``
memory for the node caches (about ``2N`` Gaussians per mixture).

Shapes: ``reduce(m [..., N, K], n_components) -> [..., n_components, K]``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.plugins import hookimpl
from gmbench.reduction.morton import morton_codes
from gmbench.reduction.implementation import check_implementation, native_kernel
from gmbench.reduction.node_fit import compact, fit_nodes, take
from gmbench.reduction.scaling import reduce_batched


class TreeHEMReduction:
    """Tree-based hierarchical EM (TreeHEM): Morton tree, per-node EM to T Gaussians, greedy cut.

    Parameters (defaults are those of the authors' implementation):
    ``T`` Gaussians per tree node (a power of two >= 2; the paper uses 2 and 4);
    ``virtual_points`` Preiner's virtual sample count per node fit;
    ``kl_threshold`` the KL-divergence gate of the E step (``None``: off);
    ``weight_threshold`` Gaussians with smaller ``|w|`` are dropped;
    ``morton_bits`` bits per axis of the Morton code;
    ``normalize_scale`` pre-scale each mixture to mean covariance trace D;
    ``recompute`` recompute the per-node EM steps in backward instead of
    keeping their intermediates (several times less training memory, about
    one more forward pass of time; not in the authors' code; PyTorch path
    only: the native kernel always keeps each node fit's E step, about 100
    bytes per tree node at T = 2, and the Triton kernels always recompute);
    ``implementation`` of the node fits: ``auto`` (the fused C++ kernel on
    CPU where it builds, the Triton kernels on CUDA where triton is
    installed, else PyTorch), ``native``, ``triton`` or ``torch`` (see
    :mod:`gmbench.reduction.implementation`).
    """

    name = "treehem"

    def __init__(
        self,
        T: Annotated[int, "Gaussians per tree node, a power of two >= 2 (the paper uses 2 and 4)"] = 2,
        virtual_points: Annotated[float, "Preiner's virtual sample count per node fit"] = 4.0,
        kl_threshold: Annotated[float | None, "KL-divergence gate of the E step (null: off)"] = 0.5,
        weight_threshold: Annotated[float, "Gaussians with a smaller |weight| are dropped"] = 1e-7,
        morton_bits: Annotated[int, "bits per axis of the Morton code"] = 10,
        normalize_scale: Annotated[bool, "pre-scale each mixture to mean covariance trace D"] = True,
        recompute: Annotated[bool, "recompute the node fits in backward instead of keeping them (less memory, about one more forward pass)"] = True,
        implementation: Annotated[
            Literal["auto", "native", "torch", "triton"],
            "node fits: auto (the C++ kernel on CPU where it builds, Triton on CUDA where installed, else PyTorch), native, triton or torch",
        ] = "auto",
    ):
        if not isinstance(T, int) or T < 2 or T & (T - 1):
            raise ValueError(f"T must be a power of two >= 2, got {T!r}")
        if virtual_points <= 0:
            raise ValueError(f"virtual_points must be positive, got {virtual_points!r}")
        if kl_threshold is not None and kl_threshold <= 0:
            raise ValueError(f"kl_threshold must be positive or null, got {kl_threshold!r}")
        if weight_threshold < 0:
            raise ValueError(f"weight_threshold must be >= 0, got {weight_threshold!r}")
        if not 1 <= morton_bits <= 20:
            raise ValueError(f"morton_bits must be in 1..20, got {morton_bits!r}")
        self.T = T
        self.virtual_points = float(virtual_points)
        self.kl_threshold = kl_threshold
        self.weight_threshold = float(weight_threshold)
        self.morton_bits = morton_bits
        self.normalize_scale = normalize_scale
        self.recompute = recompute
        self.implementation = check_implementation(implementation)

    def __repr__(self) -> str:
        return f"TreeHEMReduction(T={self.T}, virtual_points={self.virtual_points}, kl_threshold={self.kl_threshold})"

    def reduce(self, m: Tensor, n_components: int) -> Tensor:
        return reduce_batched(m, n_components, self.normalize_scale, self._reduce_flat)

    # -- bottom-up ---------------------------------------------------------
    def _morton_order(self, m: Tensor, kernel=None) -> tuple[Tensor, Tensor, int]:
        """``(order [G, N], valid [G, N], n_leaves)``: the sort of the Gaussians, valid ones first.

        ``kernel``: the native node-fit module, which sorts in one pass (the same order).
        """
        n = m.shape[1]
        n_leaves = max(2, 1 << math.ceil(math.log2(math.ceil(n / self.T))))
        native = None if kernel is None else kernel.morton_order(m, self.weight_threshold, self.morton_bits)
        if native is not None:
            return (*native, n_leaves)
        valid = gm.weights(m).detach().abs() >= self.weight_threshold
        codes = morton_codes(gm.positions(m), valid, self.morton_bits)
        # Dropped Gaussians go to the end so they do not dilute the tree.
        codes = torch.where(valid, codes, torch.full_like(codes, torch.iinfo(torch.int64).max))
        order = torch.argsort(codes, dim=-1, stable=True)
        return order, valid, n_leaves

    def _sorted_leaves(self, m: Tensor) -> tuple[Tensor, Tensor, int]:
        g, n, k = m.shape
        order, valid, n_leaves = self._morton_order(m)
        m = take(m, order)
        valid = valid.gather(1, order)
        width = n_leaves * self.T
        m = gm.pad(m, width)
        valid = torch.cat([valid, valid.new_zeros(g, width - n)], dim=1)
        return m.view(g, n_leaves, self.T, k), valid.view(g, n_leaves, self.T), n_leaves

    def _build_tree(self, m: Tensor, fit=fit_nodes) -> tuple[Tensor, Tensor]:
        """Node caches in heap order (root 0, children 2i+1, 2i+2): ``[G, 2L-1, T, K]`` and mask."""
        T = self.T
        level, valid, _ = self._sorted_leaves(m)
        g, _, _, k = level.shape
        # The sort puts every valid Gaussian before the dropped ones and the
        # padding, so at each level only a prefix of the nodes holds anything:
        # the node fits run on that prefix (the power-of-two padding would
        # otherwise cost up to half of all the work) and the rest stays empty.
        n_valid = int(valid.flatten(1).sum(-1).max())
        span = T  # Gaussians of the sorted sequence under one node of the level
        levels = [(level, valid)]
        while level.shape[1] > 1:
            n_parents = level.shape[1] // 2
            span *= 2
            active = min(n_parents, max(1, -(-n_valid // span)))
            collected = level[:, : 2 * active].reshape(g * active, 2 * T, k)
            collected_valid = valid[:, : 2 * active].reshape(g * active, 2 * T)
            n_out = torch.full((g * active,), T, dtype=torch.long, device=m.device)
            fitted, fitted_valid = fit(
                collected, collected_valid, n_out, T, self.virtual_points, self.kl_threshold, self.recompute
            )
            use_fit = collected_valid.sum(-1) > T
            if not bool(use_fit.all()):
                passed, passed_valid = compact(collected, collected_valid, T)
                fitted = torch.where(use_fit[:, None, None], fitted, passed)
                fitted_valid = torch.where(use_fit[:, None], fitted_valid, passed_valid)
            level, valid = fitted.view(g, active, T, k), fitted_valid.view(g, active, T)
            if active < n_parents:
                empty = gm.pad(level.new_zeros(g, n_parents - active, 0, k), T)
                level = torch.cat([level, empty], 1)
                valid = torch.cat([valid, valid.new_zeros(g, n_parents - active, T)], 1)
            levels.append((level, valid))
        levels.reverse()
        return torch.cat([lv for lv, _ in levels], dim=1), torch.cat([va for _, va in levels], dim=1)

    # -- top-down ----------------------------------------------------------
    def _reduce_flat(self, m: Tensor, n_out: int) -> Tensor:
        T = self.T
        kernel = native_kernel(self.implementation, m)
        if kernel is not None and hasattr(kernel, "treehem"):  # native: sort, leaves, tree, cut, partial fit
            order, valid, n_leaves = self._morton_order(m, kernel)
            out, _ = kernel.treehem(m, valid, order, n_leaves, T, n_out, self.virtual_points, self.kl_threshold)
            return out
        fit = kernel.fit_nodes if kernel is not None else fit_nodes  # Triton: one launch per level
        nodes, valid = self._build_tree(m, fit)
        g, n_nodes, _, k = nodes.shape
        n_internal = (n_nodes - 1) // 2
        device = m.device
        with torch.no_grad():
            counts = valid.sum(-1)  # [G, nodes]
            key = (gm.weights(nodes).abs() * valid).sum(-1)
            depth_start = 1
            while depth_start < n_nodes:  # make keys monotone from the root down, level by level
                idx = torch.arange(depth_start, 2 * depth_start + 1, device=device)
                key[:, idx] = torch.minimum(key[:, idx], key[:, (idx - 1) // 2])
                depth_start = 2 * depth_start + 1
            internal = torch.arange(n_internal, device=device)
            jump = counts[:, 2 * internal + 1] + counts[:, 2 * internal + 2] - counts[:, :n_internal]
            # Stable sort of heap-ordered nodes: on equal keys a parent precedes its children.
            order = torch.argsort(-key[:, :n_internal], dim=-1, stable=True)
            totals = torch.cat([counts[:, :1], counts[:, :1] + torch.cumsum(jump.gather(1, order), -1)], -1)
            n_expanded = ((totals <= n_out).sum(-1) - 1).clamp_min(0)  # [G]
            current = totals.gather(1, n_expanded.unsqueeze(-1)).squeeze(-1)
            has_partial = (current != n_out) & (n_expanded < n_internal)
            partial = order.gather(1, n_expanded.clamp_max(n_internal - 1).unsqueeze(-1)).squeeze(-1)
            rank = torch.empty_like(order).scatter_(1, order, internal.expand(g, -1).contiguous())
            expanded = torch.cat([rank < n_expanded.unsqueeze(-1), counts.new_zeros(g, n_nodes - n_internal, dtype=torch.bool)], -1)
            parent = (torch.arange(1, n_nodes, device=device) - 1) // 2
            parent_expanded = torch.cat([expanded.new_ones(g, 1), expanded[:, parent]], -1)
            frontier = ~expanded & parent_expanded
            is_partial = torch.zeros_like(frontier).scatter_(1, partial.unsqueeze(-1), has_partial.unsqueeze(-1))
            selected = (frontier & ~is_partial).unsqueeze(-1) & valid
            partial_count = n_out - current + counts.gather(1, partial.unsqueeze(-1)).squeeze(-1)
            partial_count = torch.where(has_partial, partial_count, torch.ones_like(partial_count))
        children = torch.stack([2 * partial + 1, 2 * partial + 2], -1)  # [G, 2]
        child_nodes = take(nodes, children).reshape(g, 2 * T, k)
        child_valid = valid.gather(1, children[..., None].expand(g, 2, T)).reshape(g, 2 * T)
        partial_fit, partial_valid = fit(
            child_nodes, child_valid, partial_count, 2 * T, self.virtual_points, self.kl_threshold
        )
        partial_valid = partial_valid & has_partial.unsqueeze(-1)
        candidates = torch.cat([nodes.reshape(g, n_nodes * T, k), partial_fit], 1)
        candidate_valid = torch.cat([selected.reshape(g, n_nodes * T), partial_valid], 1)
        chosen, chosen_valid = compact(candidates, candidate_valid, n_out)
        if chosen.shape[1] < n_out:
            chosen = gm.pad(chosen, n_out)
            chosen_valid = torch.cat([chosen_valid, chosen_valid.new_zeros(g, n_out - chosen_valid.shape[1])], 1)
        return gm.with_weights(chosen, torch.where(chosen_valid, gm.weights(chosen), torch.zeros_like(gm.weights(chosen))))


@hookimpl
def gmbench_reduction():
    return TreeHEMReduction
