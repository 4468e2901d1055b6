r"""The PointNet / PointNet++ authors' batch-norm momentum schedule.

Both reference implementations update the batch-norm running statistics fast
at first and slower later: TensorFlow decay
``min(0.99, 1 - 0.5 * 0.5 ** floor(samples / 200000))``, i.e. PyTorch momentum

.. math:: \mu(s) = \max(0.01,\; 0.5 \cdot 0.5^{\lfloor s / 200000 \rfloor})

after :math:`s` training samples.  PyTorch's default momentum 0.1 makes the
running statistics lag the quickly changing early weights; evaluated with them,
a PointNet++ trained for a few epochs predicts one class for every input.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchNormMomentumSchedule(nn.Module):
    """Sets the momentum of every ``BatchNorm`` of a model from the samples trained on so far.

    The counter is a buffer, so it is saved in checkpoints and a resumed run
    continues the schedule.  Call :meth:`step` at the start of each training
    forward with the batch size.
    """

    def __init__(self, initial: float = 0.5, decay_samples: int = 200_000, rate: float = 0.5, minimum: float = 0.01):
        super().__init__()
        if not 0.0 < minimum <= initial <= 1.0:
            raise ValueError(f"batch-norm momentum must satisfy 0 < minimum <= initial <= 1, got {minimum}, {initial}")
        if decay_samples < 1:
            raise ValueError(f"bn_decay_samples must be positive, got {decay_samples}")
        self.initial = initial
        self.decay_samples = decay_samples
        self.rate = rate
        self.minimum = minimum
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    def momentum(self) -> float:
        halvings = int(self.samples_seen) // self.decay_samples
        return max(self.minimum, self.initial * self.rate**halvings)

    def step(self, model: nn.Module, batch_size: int) -> None:
        momentum = self.momentum()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum
        self.samples_seen += batch_size
