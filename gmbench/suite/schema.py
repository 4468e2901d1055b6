"""What a suite may contain: top-level keys, each task's cell fields with types,
defaults and ranges, and the resolved :class:`Cell` / :class:`Suite` records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from gmbench import tasks

TASKS = tuple(tasks.TASKS)  # the task types' one home is gmbench.tasks
TOP_LEVEL_KEYS = ("name", "description", "task", "plugins", "backend", "backend_params", "cell", "matrix", "exclude", "smoke", "report", "loggers")
REPORT_TABLE_KEYS = ("name", "title", "rows", "columns", "value", "extra", "where", "paper", "source", "epochs")
INPUTS = ("gm", "points")

# TrainConfig fields a suite may not set: device and progress come from the command line.
RUNNER_TRAINING_FIELDS = ("device", "progress")

# Input Gaussians per sample (train) and per mixture (transfer_fitting_timing), and every
# Gaussian count of a GMCN layout.  k-means++ seeding makes N passes over a sample's
# P >= N points (N * P distances: 4.3e9 at N = P = 65,536, days for a data set), the first
# convolution makes F * N_k * N Gaussians per sample, and no point set gmbench reads has
# that many points (ModelNet's resampled files: 10,000).
MAX_GAUSSIANS = 2**16
# Cells of a suite, all matrix blocks together, before 'exclude' (more is a typo, not a study).
MAX_CELLS = 10_000
MAX_SEED = 2**63 - 1  # torch.manual_seed's range

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


_LABEL = Field((str, _NONE), None)
_SEED = Field((int,), 0, minimum=0, maximum=MAX_SEED)
_DIMS = Field((int,), 3, choices=(2, 3))


def _count(default: Any, maximum: int | None = None, nullable: bool = False) -> Field:
    return Field((int, _NONE) if nullable else (int,), default, minimum=1, maximum=maximum)


# Per task: field -> Field.  Cell ids hash the resolved fields, so a default changed
# here changes the ids of every cell that relies on it (old run folders no longer resume).
CELL_FIELDS: dict[str, dict[str, Field]] = {
    "train": {
        "label": _LABEL,
        "dataset": Field((str,), None),
        "dataset_params": Field((dict,), {}),
        "model": Field((str,), None),
        "model_params": Field((dict,), {}),
        "input": Field((str,), "gm", choices=INPUTS),
        "input_fitting": Field((str,), "kmeans"),
        "input_fitting_params": Field((dict,), {}),
        "n_gaussians": _count(64, MAX_GAUSSIANS),
        "n_points": _count(None, nullable=True),
        "seed": _SEED,
        "training": Field((dict,), {}),
        "train_samples": _count(None, nullable=True),
        "test_samples": _count(None, nullable=True),
        "diagnostics": Field((bool,), False),
        "diagnostics_samples": _count(16),
        "diagnostics_points": _count(100_000),
    },
    "footprint": {
        "label": _LABEL,
        "layout": Field((str,), None),
        "batch": _count(32),
        "kernel_gaussians": _count(5),
        "integrated": Field((bool,), False),
        "dims": _DIMS,
        "seed": _SEED,
    },
    "transfer_fitting_timing": {
        "label": _LABEL,
        "transfer_fitting": Field((str,), None),
        "transfer_fitting_params": Field((dict,), {}),
        "n_mixtures": _count(800),
        "n_gaussians": _count(256, MAX_GAUSSIANS),
        "dims": dataclasses.replace(_DIMS, default=2),
        "repeats": _count(3),
        "rmse_samples": _count(20000),
        "seed": _SEED,
    },
}
REQUIRED_FIELDS = {
    "train": ("dataset", "model"),
    "footprint": ("layout",),
    "transfer_fitting_timing": ("transfer_fitting",),
}
# Plugin choices of a cell: (kind, field naming the plugin, field with its parameters).
PLUGIN_FIELDS = {
    "train": (("dataset", "dataset", "dataset_params"), ("input_fitting", "input_fitting", "input_fitting_params"), ("model", "model", "model_params")),
    "footprint": (),
    "transfer_fitting_timing": (("transfer_fitting", "transfer_fitting", "transfer_fitting_params"),),
}


@dataclasses.dataclass
class Cell:
    """One resolved experiment: ``config`` (plain JSON data) and its stable ``id``."""

    id: str
    config: dict
    index: int = 0

    @property
    def title(self) -> str:
        c = self.config
        label = c.get("label") or c.get("model") or c.get("transfer_fitting") or c.get("layout")
        parts = [str(label)]
        layout = (c.get("model_params") or {}).get("layout") if c.get("task") == "train" else None
        if not c.get("label") and layout:
            parts.append(str(layout))
        if c.get("task") == "footprint":
            parts.append(f"integrated={c.get('integrated')} dims={c.get('dims')}")
        for key in ("dataset", "n_gaussians", "seed"):
            if key in c:
                parts.append(f"{key}={c[key]}" if key != "dataset" else str(c[key]))
        return " ".join(parts)


@dataclasses.dataclass
class Suite:
    """A validated suite: its source, settings and expanded cells."""

    name: str
    path: str
    text: str
    task: str
    plugins: list[str]
    backend: str | None
    description: str
    cells: list[Cell]
    report: dict
    smoke: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)  # --set PATH=VALUE items, in order
    backend_params: dict = dataclasses.field(default_factory=dict)
    loggers: list[dict] = dataclasses.field(default_factory=list)  # [{"name", "params"}] (gmbench.loggers)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "task": self.task,
            "plugins": self.plugins,
            "backend": self.backend,
            "backend_params": self.backend_params,
            "description": self.description,
            "smoke": self.smoke,
            "overrides": self.overrides,
            "report": self.report,
            "loggers": self.loggers,
            "cells": [{"id": cell.id, "config": cell.config} for cell in self.cells],
        }


def cell_id(config: dict) -> str:
    """Stable id of a resolved cell: the first 10 hex digits of SHA-256 of its canonical JSON."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]
