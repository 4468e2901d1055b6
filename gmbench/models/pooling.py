r"""Pooling by rescaling the domain, with batch-norm-like statistics (paper Section 4.3).

Reducing the Gaussian count enlarges the Gaussians but not the receptive field
of the next kernels; rescaling positions and covariances so that the mean
covariance trace becomes D (an average variance of 1 per axis) does.  The
scale factor of channel ``c`` is

.. math:: s_c = \sqrt{D / \bar t_c},

with :math:`\bar t_c` the mean covariance trace of channel ``c``.  As in batch
norm, :math:`\bar t_c` is the mean over the batch and the Gaussians while
training, and a running average of those batch means at evaluation.  The
authors used the running average in training too
(``use_running_average=True``).

Like :class:`torch.nn.BatchNorm1d`, ``momentum = None`` makes the running value
the plain average of all batch means since :meth:`reset_running_stats`; the
trainer's precise statistics (``training.precise_bn_samples``) use that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmbench import mixture as gm


class ScaleNormalization(nn.Module):
    """Per-channel domain rescaling to mean covariance trace D (no learnable parameters).

    Shapes: ``forward(m [B, C, N, 1+D+D*D]) -> [B, C, N, 1+D+D*D]``; weights unchanged.
    Buffer ``running_trace [C]`` starts at D (scale 1) and follows
    ``(1 - momentum) * running + momentum * batch_mean`` in training
    (``momentum`` None: the average of the batch means since the last reset).
    """

    def __init__(self, channels: int, dims: int, momentum: float = 0.1, use_running_average: bool = False):
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"pooling momentum must be in (0, 1], got {momentum}")
        self.channels = channels
        self.dims = dims
        self.momentum = momentum
        self.use_running_average = use_running_average
        self.register_buffer("running_trace", torch.full((channels,), float(dims)))
        # Batches averaged while momentum is None; not saved (a count, not a statistic).
        self.batches_tracked = 0

    def reset_running_stats(self) -> None:
        """Back to scale 1 (``running_trace`` = D) and no batches averaged."""
        self.running_trace.fill_(float(self.dims))
        self.batches_tracked = 0

    def batch_trace(self, m: Tensor) -> Tensor:
        """``[C]``: the mean covariance trace of each channel over batch and Gaussians."""
        return gm.mean_covariance_trace(m).mean(0)

    def forward(self, m: Tensor) -> Tensor:
        if self.training:
            trace = self.batch_trace(m)
            with torch.no_grad():
                self.batches_tracked += 1
                weight = 1.0 / self.batches_tracked if self.momentum is None else self.momentum
                self.running_trace.lerp_(trace.detach().to(self.running_trace.dtype), weight)
            if self.use_running_average:
                trace = self.running_trace
        else:
            trace = self.running_trace
        tiny = torch.finfo(m.dtype).tiny
        factor = torch.sqrt(self.dims / trace.to(m.dtype).clamp_min(tiny))
        return gm.scale(m, factor.expand(m.shape[0], self.channels))

    def extra_repr(self) -> str:
        return f"{self.channels}, dims={self.dims}, momentum={self.momentum}, use_running_average={self.use_running_average}"
