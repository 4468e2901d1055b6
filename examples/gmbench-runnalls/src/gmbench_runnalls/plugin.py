r"""Runnalls' greedy pairwise merging with the KL-discrimination bound.

Runnalls (2007), "Kullback-Leibler approach to Gaussian mixture reduction":
repeatedly merge the pair of Gaussians ``(i, j)`` with the smallest upper bound
on the KL divergence the merge adds,

.. math:: B(i, j) = \tfrac12 \left[(w_i + w_j) \ln\det\Sigma_{ij}
          - w_i \ln\det\Sigma_i - w_j \ln\det\Sigma_j\right],

where the merged Gaussian is the moment match (weight ``w_i + w_j``, the
weighted mean and covariance).  Mass and mean are preserved exactly.

Shapes: ``reduce(m [..., N, 1+D+D*D], n) -> [..., n, 1+D+D*D]``.  Vectorised
over all mixtures; the ``N - n`` merges are sequential (the algorithm is
greedy).  Memory ``O(N^2)`` per mixture for the cost matrix, time ``O(N^2)``
per mixture plus ``O(N)`` per merge.

The bound is invariant to the unit of length (scaling all covariances by
``s^2`` adds the same ``D ln s^2`` to every log-determinant, which cancels), so
no normalisation is needed.

Weights are expected non-negative (the output of ReLU fitting).  Gaussians of
opposite sign are only merged when nothing else is left.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.plugins import hookimpl


def merge_moments(w_i, mu_i, cov_i, w_j, mu_j, cov_j):
    """Moment-matched merge of two weighted Gaussians (broadcasting): ``(w, mu, cov)``."""
    w = w_i + w_j
    safe = torch.where(w.abs() > 0, w, torch.ones_like(w))
    a = torch.where(w.abs() > 0, w_i / safe, torch.full_like(w, 0.5)).unsqueeze(-1)
    b = 1 - a
    mu = a * mu_i + b * mu_j
    d_i, d_j = (mu_i - mu).unsqueeze(-1), (mu_j - mu).unsqueeze(-1)
    cov = a.unsqueeze(-1) * (cov_i + d_i @ d_i.transpose(-1, -2)) + b.unsqueeze(-1) * (cov_j + d_j @ d_j.transpose(-1, -2))
    return w, mu, cov


def merge_costs(w, mu, cov, logdet):
    """Runnalls' bound ``B(i, j)`` for all pairs: ``[G, N], [G, N, D], [G, N, D, D] -> [G, N, N]``."""
    wi, wj = w.unsqueeze(-1).abs(), w.unsqueeze(-2).abs()
    merged_w, _, merged_cov = merge_moments(
        wi, mu.unsqueeze(-2), cov.unsqueeze(-3), wj, mu.unsqueeze(-3), cov.unsqueeze(-4)
    )
    _, merged_logdet = gm.symmetric_inverse_and_logdet(merged_cov)
    cost = 0.5 * (merged_w * merged_logdet - wi * logdet.unsqueeze(-1) - wj * logdet.unsqueeze(-2))
    opposite = (w.unsqueeze(-1) >= 0) != (w.unsqueeze(-2) >= 0)
    return torch.where(opposite, cost + torch.finfo(cost.dtype).max / 4, cost)


class RunnallsReduction:
    """Runnalls' greedy pairwise merging by the KL-discrimination bound (third-party example plugin).

    No parameters: the bound needs none.
    """

    name = "runnalls"

    def reduce(self, m: Tensor, n_components: int) -> Tensor:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"the number of output Gaussians must be a positive integer, got {n_components!r}")
        n, k = m.shape[-2], m.shape[-1]
        if n <= n_components:
            return gm.pad(m, n_components)
        batch = m.shape[:-2]
        flat = m.reshape(-1, n, k)
        g = flat.shape[0]
        w, mu, cov = gm.weights(flat), gm.positions(flat), gm.covariances(flat)
        alive = torch.ones(g, n, dtype=torch.bool, device=m.device)
        rows = torch.arange(g, device=m.device)
        eye = torch.eye(n, dtype=torch.bool, device=m.device)
        with torch.no_grad():
            _, logdet = gm.symmetric_inverse_and_logdet(cov)
            cost = merge_costs(w, mu, cov, logdet).masked_fill(eye, float("inf"))
        for _ in range(n - n_components):
            with torch.no_grad():
                best = cost.flatten(1).argmin(-1)
                # The merged Gaussian takes the lower slot: output order does not
                # depend on which of the two symmetric entries won the argmin.
                i, j = torch.minimum(best // n, best % n), torch.maximum(best // n, best % n)
            merged_w, merged_mu, merged_cov = merge_moments(
                w[rows, i], mu[rows, i], cov[rows, i], w[rows, j], mu[rows, j], cov[rows, j]
            )
            at_i = torch.nn.functional.one_hot(i, n).bool()
            w = torch.where(at_i, merged_w.unsqueeze(-1), w)
            mu = torch.where(at_i.unsqueeze(-1), merged_mu.unsqueeze(-2), mu)
            cov = torch.where(at_i[..., None, None], merged_cov.unsqueeze(-3), cov)
            with torch.no_grad():
                alive[rows, j] = False
                # Only row and column i change; j is retired.
                _, logdet_i = gm.symmetric_inverse_and_logdet(cov[rows, i])
                logdet = torch.where(at_i, logdet_i.unsqueeze(-1), logdet)
                row = merge_costs_row(w, mu, cov, logdet, i)
                row = row.masked_fill(~alive | at_i, float("inf"))
                cost[rows, i] = row
                cost[rows, :, i] = row
                cost[rows, j] = float("inf")
                cost[rows, :, j] = float("inf")
        order = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)[:, :n_components]
        out = gm.pack(w, mu, cov).gather(1, order.unsqueeze(-1).expand(g, n_components, k))
        return out.reshape(*batch, n_components, k)


def merge_costs_row(w, mu, cov, logdet, i):
    """``B(i, j)`` for every ``j`` and one ``i`` per mixture: ``-> [G, N]``."""
    rows = torch.arange(w.shape[0], device=w.device)
    wi = w[rows, i].abs().unsqueeze(-1)
    wj = w.abs()
    merged_w, _, merged_cov = merge_moments(wi, mu[rows, i].unsqueeze(-2), cov[rows, i].unsqueeze(-3), wj, mu, cov)
    _, merged_logdet = gm.symmetric_inverse_and_logdet(merged_cov)
    cost = 0.5 * (merged_w * merged_logdet - wi * logdet[rows, i].unsqueeze(-1) - wj * logdet)
    opposite = (w[rows, i].unsqueeze(-1) >= 0) != (w >= 0)
    return torch.where(opposite, cost + torch.finfo(cost.dtype).max / 4, cost)


@hookimpl
def gmbench_reduction():
    return RunnallsReduction
