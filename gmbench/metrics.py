r"""Fitting-error metrics (paper Appendix F, Tables 10-11), the exact L2 distance, and the
paper's reporting convention for accuracies (TensorBoard smoothing).

Sampled RMSE (the paper's measure): positions are drawn from the Gaussians of
a *sampling mixture* (by default the input of the fitting): pick a Gaussian
uniformly among those with non-zero weight, then a point from it (``b + L z``
with ``C = L L^T`` and ``z`` standard normal).  Drawing uniformly per Gaussian
(not in proportion to the weights) also covers the negative parts of the
input, where a ReLU fit must be close to zero.  The generator is seeded, so a
metric is reproducible.

Exact L2 distance (beyond the paper): for mixtures ``f = sum_i a_i g_i`` and
``h = sum_j c_j g_j``

.. math:: \int f h \,dx = \sum_{ij} a_i c_j\, \mathcal{N}(b_i;\, b_j,\, C_i + C_j),

because the integral of the product of two normalised Gaussians is a Gaussian
in the difference of their means; hence
``||f - h||_2^2 = <f, f> - 2 <f, h> + <h, h>`` without any sampling.

Smoothed accuracy (the paper's Appendix F: "test accuracy as shown in
TensorBoard with the smoothing set to 0.9"): TensorBoard's debiased
exponential moving average over the epochs ``t = 1, 2, ...`` of a curve ``v_t``,

.. math:: s_t = w\, s_{t-1} + (1 - w)\, v_t, \quad s_0 = 0, \qquad
          \hat v_t = \frac{s_t}{1 - w^t},

with ``w = 0.9`` (the division removes the bias towards the start value 0;
a constant curve is returned unchanged, as TensorBoard does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from gmbench import mixture as gm

TargetFunction = Callable[[Tensor], Tensor]


def sample_points(m: Tensor, n_samples: int, seed: int = 0) -> Tensor:
    """``[B, C, n_samples, D]`` positions drawn from the Gaussians of ``m`` (uniform over non-zero ones)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    m = m.detach()
    d = gm.n_dims(m)
    nonzero = (gm.weights(m) != 0).to(torch.float64).cpu()
    # Mixtures without any non-zero Gaussian are sampled from all of them.
    probabilities = torch.where(nonzero.sum(-1, keepdim=True) > 0, nonzero, torch.ones_like(nonzero))
    flat_p = probabilities.reshape(-1, probabilities.shape[-1])
    index = torch.multinomial(flat_p, n_samples, replacement=True, generator=generator)
    index = index.reshape(*m.shape[:-2], n_samples).to(m.device)
    z = torch.randn(*m.shape[:-2], n_samples, d, generator=generator, dtype=m.dtype).to(m.device)
    centres = gm.positions(m).gather(-2, index.unsqueeze(-1).expand(*index.shape, d))
    covariances = gm.covariances(m).gather(-3, index[..., None, None].expand(*index.shape, d, d))
    factor = torch.linalg.cholesky(covariances + 1e-12 * torch.eye(d, dtype=m.dtype, device=m.device))
    return centres + (factor @ z.unsqueeze(-1)).squeeze(-1)


def _values(target: Tensor | TargetFunction, points: Tensor) -> Tensor:
    if callable(target) and not isinstance(target, Tensor):
        return target(points)
    return gm.evaluate(target, points)


def relu_of(m: Tensor) -> TargetFunction:
    """The function ``x -> relu(m(x))`` (the target of transfer fitting)."""
    return lambda points: gm.evaluate(m, points).clamp_min(0)


@torch.no_grad()
def rmse_sampled(
    target: Tensor | TargetFunction,
    fitted: Tensor,
    sample_from: Tensor | None = None,
    n_samples: int = 10_000,
    seed: int = 0,
) -> Tensor:
    """Per-mixture RMSE ``[B, C]`` between ``target`` and the mixture ``fitted``.

    ``target`` is a mixture ``[B, C, N, K]`` or a function of points
    ``[B, C, M, D] -> [B, C, M]``; positions are drawn from ``sample_from``
    (default: ``target`` if it is a mixture, else ``fitted``).
    """
    if sample_from is None:
        sample_from = target if isinstance(target, Tensor) else fitted
    points = sample_points(sample_from, n_samples, seed)
    error = _values(target, points) - gm.evaluate(fitted, points)
    return error.pow(2).mean(-1).sqrt()


def inner_products(m1: Tensor, m2: Tensor, chunk: int = 256) -> Tensor:
    """``[B, C]`` exact ``int m1(x) m2(x) dx`` (float64, chunked over the Gaussians of ``m1``)."""
    if m1.shape[-1] != m2.shape[-1]:
        raise ValueError("both mixtures must have the same dimension")
    d = gm.n_dims(m1)
    m1, m2 = m1.to(torch.float64), m2.to(torch.float64)
    total = torch.zeros(torch.broadcast_shapes(m1.shape[:-2], m2.shape[:-2]), dtype=torch.float64, device=m1.device)
    for start in range(0, m1.shape[-2], chunk):
        part = m1[..., start : start + chunk, :]
        cov = gm.covariances(part).unsqueeze(-3) + gm.covariances(m2).unsqueeze(-4)  # [.., n1, n2, D, D]
        precision, logdet = gm.symmetric_inverse_and_logdet(cov)
        diff = gm.positions(part).unsqueeze(-2) - gm.positions(m2).unsqueeze(-3)
        exponent = -0.5 * torch.einsum("...a,...ab,...b->...", diff, precision, diff)
        density = torch.exp(exponent + gm.log_normaliser(logdet, d))
        total = total + torch.einsum("...i,...ij,...j->...", gm.weights(part), density, gm.weights(m2))
    return total


def l2_distance(m1: Tensor, m2: Tensor) -> Tensor:
    """``[B, C]`` exact ``||m1 - m2||_2`` in closed form (see the module docstring)."""
    squared = inner_products(m1, m1) - 2 * inner_products(m1, m2) + inner_products(m2, m2)
    return squared.clamp_min(0).sqrt()


@torch.no_grad()
def fitting_errors(
    m_in: Tensor,
    dense: Tensor,
    reduced: Tensor,
    n_samples: int = 100_000,
    seed: int = 0,
) -> dict[str, float]:
    """The three RMSE figures of Table 10, plus the exact L2 distance of the reduction.

    * ``all``: ``reduced`` vs ``relu(m_in)``;
    * ``relu``: ``dense`` vs ``relu(m_in)``;
    * ``reduction``: ``reduced`` vs ``dense`` (its input);
    * ``reduction_l2``: mean over mixtures of the exact ``||reduced - dense||_2``.

    The RMSEs pool all mixtures and ``n_samples`` positions per mixture drawn
    from the Gaussians of ``m_in`` (the same positions for all three).
    """
    points = sample_points(m_in, n_samples, seed)
    target = gm.evaluate(m_in, points).clamp_min(0)
    dense_values = gm.evaluate(dense, points)
    reduced_values = gm.evaluate(reduced, points)

    def rmse(a: Tensor, b: Tensor) -> float:
        return float((a - b).double().pow(2).mean().sqrt())

    return {
        "all": rmse(reduced_values, target),
        "relu": rmse(dense_values, target),
        "reduction": rmse(reduced_values, dense_values),
        "reduction_l2": float(l2_distance(reduced, dense).mean()),
    }


TENSORBOARD_SMOOTHING = 0.9  # the paper's Appendix F setting


def tensorboard_smoothed(values: Sequence[float], weight: float = TENSORBOARD_SMOOTHING) -> list[float]:
    """TensorBoard's smoothed curve of ``values`` (debiased EMA, see the module docstring).

    Like TensorBoard, a non-finite value is passed through unsmoothed (and does not
    enter the average), and a constant curve is returned as it is.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"the smoothing weight must be in [0, 1), got {weight!r}")
    values = [float(v) for v in values]
    if values and all(v == values[0] for v in values):
        return values
    smoothed, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        smoothed.append(last / (1 - weight**count))
    return smoothed


def accuracy_summary(accuracies: Sequence[float]) -> dict[str, float]:
    """``smoothed_test_accuracy``: the paper's number (last point of the smoothed curve) for the
    per-epoch test accuracies of one training run (``nan`` without epochs)."""
    smoothed = tensorboard_smoothed(accuracies)
    return {"smoothed_test_accuracy": smoothed[-1] if smoothed else float("nan")}
