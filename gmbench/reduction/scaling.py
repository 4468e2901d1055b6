"""Input checks and the scale normalisation shared by the reduction methods.

The authors' reduction pre-scales each mixture so that the mean covariance
trace of its (non-zero) Gaussians is ``D`` and scales the result back: the EM
equations are scale-equivariant, but the likelihoods and the Morton
quantisation are better conditioned at unit scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmbench import mixture as gm


def check_reduction_input(m: Tensor, n_components: int) -> None:
    """Raise ``ValueError`` for a target count < 1 or a tensor that is not a mixture batch."""
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"the number of output Gaussians must be a positive integer, got {n_components!r}")
    if m.dim() < 3:
        raise ValueError(f"a mixture batch must be [..., N, 1+D+D*D], got shape {tuple(m.shape)}")
    gm.n_dims(m)


def prescale(m: Tensor, enabled: bool = True) -> tuple[Tensor, Tensor | None]:
    """``[G, N, K]`` -> scaled mixtures and per-mixture factors ``[G]`` (``None`` if disabled)."""
    if not enabled:
        return m, None
    d = gm.n_dims(m)
    with torch.no_grad():
        trace = gm.mean_covariance_trace(m, weighted=True)
        factor = torch.sqrt(d / trace.clamp_min(torch.finfo(m.dtype).tiny))
        factor = torch.where(torch.isfinite(factor) & (trace > 0), factor, torch.ones_like(factor))
    return gm.scale(m, factor), factor


def unscale(m: Tensor, factor: Tensor | None) -> Tensor:
    """Undo :func:`prescale`."""
    return m if factor is None else gm.scale(m, 1.0 / factor)


def reduce_batched(
    m: Tensor, n_components: int, normalize_scale: bool, reduce_flat: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """The frame every reduction shares around its ``reduce_flat([G, N, K], n) -> [G, n, K]``.

    Checks the input, pads mixtures that already have at most ``n_components``
    Gaussians, flattens the batch, pre-scales (:func:`prescale`), reduces,
    scales back and restores the batch shape ``[..., n_components, K]``.
    """
    check_reduction_input(m, n_components)
    if m.shape[-2] <= n_components:
        return gm.pad(m, n_components)
    batch, n, k = m.shape[:-2], m.shape[-2], m.shape[-1]
    flat, factor = prescale(m.reshape(-1, n, k), normalize_scale)
    return unscale(reduce_flat(flat, n_components), factor).reshape(*batch, n_components, k)
