"""What a task's cell fields are (:class:`Field`: types, default, range) and how ``--smoke``
shrinks a cell: the pieces a :class:`~gmbench.tasks.Task` is built from.

Light on purpose (no torch): the suite reads a task's fields to validate a suite before
anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Input Gaussians per sample (train) and per mixture (transfer_fitting_timing), and every
# Gaussian count of a GMCN layout.  k-means++ seeding makes N passes over a sample's
# P >= N points (N * P distances: 4.3e9 at N = P = 65,536, days for a data set), the first
# convolution makes F * N_k * N Gaussians per sample, and no point set gmbench reads has
# that many points (ModelNet's resampled files: 10,000).
MAX_GAUSSIANS = 2**16
MAX_SEED = 2**63 - 1  # torch.manual_seed's range

# --smoke: training cells get this many train / test samples; the suite's largest Gaussian
# count is divided down to at most SMOKE_MAX_GAUSSIANS (gmbench.suite.smoke.smoke_factor).
SMOKE_TRAIN_SAMPLES = 48
SMOKE_TEST_SAMPLES = 24
SMOKE_MAX_GAUSSIANS = 16

_NONE = type(None)


@dataclasses.dataclass(frozen=True)
class Field:
    """One cell field: allowed types (``NoneType`` = may be null), default, range."""

    types: tuple
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple | None = None

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.maximum is not None:
            return f"between {self.minimum:,} and {self.maximum:,}"
        return f">= {self.minimum}"

    def in_range(self, value: Any) -> bool:
        if value is None:
            return True
        if self.choices is not None and value not in self.choices:
            return False
        if self.minimum is not None and value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum


LABEL = Field((str, _NONE), None)
SEED = Field((int,), 0, minimum=0, maximum=MAX_SEED)
DIMS = Field((int,), 3, choices=(2, 3))


def count(default: Any, maximum: int | None = None, nullable: bool = False) -> Field:
    """A positive integer field (a size, a number of samples or repeats)."""
    return Field((int, _NONE) if nullable else (int,), default, minimum=1, maximum=maximum)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shrink_layout(layout: str, factor: int) -> str:
    """Divide every Gaussian count of a layout string by ``factor`` (at least 2 each), for --smoke."""
    parts = layout.split("->")
    shrunk = []
    for part in parts[:-1]:
        if "/" in part and part.split("/")[1].strip().isdigit():
            channels, gaussians = part.split("/")
            shrunk.append(f"{channels.strip()}/{max(2, int(gaussians) // factor)}")
        else:
            shrunk.append(part)
    return "->".join([*shrunk, parts[-1]])
