r"""Hierarchical EM with soft partitioning (Eckart et al. 2016, "Accelerated generative models
for 3D point cloud data"), the ``eckart`` input-fitting plugin (paper Section 5.3, Figure 6).

The hierarchy is a tree with ``per_node`` children per node and ``levels``
levels.  Level 1 fits ``per_node`` Gaussians to the whole point set with EM.
At each further level every node fits its own ``per_node`` Gaussians to the
points *softly partitioned* to it: a point enters child node ``j`` of its
parent with weight :math:`w_p \gamma_{pj}` when its responsibility
:math:`\gamma_{pj} > \lambda_p` (``threshold``) and is left out otherwise.
A leaf's mixing weight is the product of the local mixing weights on its path
(renormalised to sum 1, because thresholding drops a little mass).  The result
is the leaf level: ``per_node ** levels`` Gaussians.

All nodes of one level are fitted as one batch of ``B * per_node**(level-1)``
EM problems; there is no loop over samples or nodes.

Differences from Eckart et al.: they use 8 children per node (here
``per_node``, default 5 as in the GMCN paper's Figure 6); as in their method a
node's E step involves only its own children.  We do not reproduce their
child initialisation: each node's children are seeded with k-means++ on the
node's weighted points (``init="kmeans++"``; ``"points"``: random points of
the node) followed by one hard-assignment M step, and every level runs up to
``iterations`` EM steps (per-node convergence with ``tolerance``).
Nodes that receive no points get zero-weight children that
copy the parent Gaussian.  The paper's Figure 6 used ``per_node=5``, 3 levels
(125 Gaussians) and ``threshold=0.1``; with ``n_components=128`` the 3
remaining slots are zero-weight padding.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch

from gmbench.input_fitting.base import FitDevice, FitDtype, FitSeed, InfeasibleFit, InputFitting, Normalize, RegCovar
from gmbench.input_fitting.em import MixtureParameters, e_step, run_em
from gmbench.input_fitting.kmeans import hard_m_step, kmeans_plus_plus, random_points
from gmbench.plugins import hookimpl


def hierarchy_levels(n_components: int, per_node: int) -> int:
    """Largest ``L >= 1`` with ``per_node ** L <= n_components``."""
    if n_components < per_node:
        raise ValueError(f"n_components ({n_components}) must be at least per_node ({per_node})")
    return max(1, int(math.floor(math.log(n_components) / math.log(per_node) + 1e-9)))


class EckartFitting(InputFitting):
    """Eckart et al. 2016 hierarchical EM with soft partitioning (Table 4 "Eckart").

    ``per_node`` Gaussians per node, ``levels`` levels (``None``: as many as
    fit in ``n_components``; the rest is zero-weight padding), soft-partition
    ``threshold`` on the responsibilities, ``iterations``/``tolerance`` per
    level's EM, ``init`` (``kmeans++`` or ``points``) seeds each node's children.  See the module docstring for the algorithm and how it differs
    from Eckart's paper.
    """

    name = "eckart"

    def __init__(
        self,
        per_node: Annotated[int, "Gaussians per tree node (at least 2)"] = 5,
        levels: Annotated[int | None, "tree levels (null: as many as fit in n_components; the rest is padding)"] = None,
        threshold: Annotated[float, "soft-partition threshold on the responsibilities, in [0, 1)"] = 0.1,
        iterations: Annotated[int, "EM steps per level, at most"] = 30,
        tolerance: Annotated[float, "convergence tolerance of each level's EM"] = 1e-3,
        init: Annotated[Literal["kmeans++", "points"], "seeding of each node's children"] = "kmeans++",
        reg_covar: RegCovar = "auto",
        normalize: Normalize = True,
        seed: FitSeed = 0,
        dtype: FitDtype = "float32",
        device: FitDevice = None,
    ):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        if per_node < 2:
            raise ValueError(f"per_node must be at least 2, got {per_node}")
        if levels is not None and levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if init not in ("kmeans++", "points"):
            raise ValueError(f"init must be 'kmeans++' or 'points', got {init!r}")
        self.init = init
        self.per_node = int(per_node)
        self.levels = levels
        self.threshold = float(threshold)
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)

    def _seeds(self, x, w, n, generator):
        if self.init == "kmeans++":
            return kmeans_plus_plus(x, w, n, generator)
        return random_points(x, w, n, generator)

    def check_feasible(self, batch, n_points, n_components, dims, device):
        if n_components < self.per_node:
            raise InfeasibleFit(f"eckart: n_gaussians (n_components) = {n_components} is less than per_node = "
                                f"{self.per_node}; use n_gaussians >= {self.per_node} or a smaller per_node")
        if self.levels is not None and self.per_node**self.levels > n_components:
            raise InfeasibleFit(f"eckart: per_node ** levels = {self.per_node}**{self.levels} = "
                                f"{self.per_node ** self.levels} Gaussians exceed n_gaussians (n_components) = "
                                f"{n_components}; use fewer levels (or levels: null) or more Gaussians")
        super().check_feasible(batch, n_points, n_components, dims, device)

    def min_memory_elements(self, n_points, n_components, dims):
        # The first level's E step: [P, per_node] responsibilities.
        return super().min_memory_elements(n_points, n_components, dims) + n_points * self.per_node

    def fit_standardized(self, x, w, n_components, reg_covar, generator):
        j = self.per_node
        levels = self.levels if self.levels is not None else hierarchy_levels(n_components, j)
        if j**levels > n_components:  # check_feasible says this to users; fit_standardized may be called directly
            raise ValueError(f"per_node ** levels = {j ** levels} exceeds n_components = {n_components}")
        b, p, d = x.shape
        reg = torch.as_tensor(reg_covar, dtype=x.dtype, device=x.device).reshape(-1)
        reg = reg.expand(b) if reg.numel() == 1 else reg
        # Each node holds only the points softly partitioned to it, compacted:
        # indices into its cloud [G, P_node] and weights [G, P_node] (0 = padding).
        owner = torch.arange(b, device=x.device)  # cloud of each node
        index = torch.arange(p, device=x.device).expand(b, p)
        node_w = w
        node_pi = torch.ones(b, dtype=x.dtype, device=x.device)
        node_mu = (w.unsqueeze(-1) * x).sum(1)
        node_cov = torch.eye(d, dtype=x.dtype, device=x.device).expand(b, d, d)
        for level in range(levels):
            xg = x[owner.unsqueeze(-1), index]  # [G, P_node, D]
            regg = reg[owner]
            empty = node_w.sum(-1) <= 0
            # Empty nodes run on uniform weights so the batch stays well defined;
            # their children are replaced by zero-weight copies of the parent below.
            wg = torch.where(empty.unsqueeze(-1), torch.ones_like(node_w), node_w)
            wg = wg / wg.sum(-1, keepdim=True)
            init = hard_m_step(xg, wg, self._seeds(xg, wg, j, generator), regg)
            params, _, _ = run_em(xg, wg, init, regg, self.iterations, self.tolerance)
            pi = node_pi.unsqueeze(-1) * params.pi * (~empty).unsqueeze(-1)
            mu = torch.where(empty[:, None, None], node_mu.unsqueeze(1), params.mu)
            cov = torch.where(empty[:, None, None, None], node_cov.unsqueeze(1), params.cov)
            node_pi, node_mu, node_cov = pi.reshape(-1), mu.reshape(-1, d), cov.reshape(-1, d, d)
            if level == levels - 1:
                break
            gamma, _ = e_step(xg, params)  # [G, P_node, j]
            child_w = (wg.unsqueeze(-1) * gamma * (gamma > self.threshold)).transpose(1, 2)  # [G, j, P_node]
            child_w = (child_w * (~empty)[:, None, None]).reshape(-1, child_w.shape[-1])
            child_index = index.repeat_interleave(j, 0)
            owner = owner.repeat_interleave(j, 0)
            keep = child_w > 0
            size = max(1, int(keep.sum(-1).max()))
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :size]
            index, node_w = torch.gather(child_index, 1, order), torch.gather(child_w, 1, order)
        leaves = j**levels
        pi = node_pi.reshape(b, leaves)
        pi = pi / pi.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return MixtureParameters(pi, node_mu.reshape(b, leaves, d), node_cov.reshape(b, leaves, d, d))


@hookimpl
def gmbench_input_fitting():
    return EckartFitting
