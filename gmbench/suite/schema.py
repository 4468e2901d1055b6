"""What a suite may contain: top-level keys, each task's cell fields (owned by the
:class:`~gmbench.tasks.Task` objects, looked up here by task name), bounds, and the
resolved :class:`Cell` / :class:`Suite` records."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from gmbench import tasks
from gmbench.tasks.fields import MAX_GAUSSIANS, Field  # noqa: F401 (the suite's names for them)

TASKS = tuple(tasks.TASKS)  # the task types' one home is gmbench.tasks
TOP_LEVEL_KEYS = ("name", "description", "task", "plugins", "backend", "backend_params", "cell", "matrix", "exclude", "smoke", "report", "loggers")
REPORT_TABLE_KEYS = ("name", "title", "rows", "columns", "value", "extra", "where", "paper", "source", "epochs")

# TrainConfig fields a suite may not set: device and progress come from the command line.
RUNNER_TRAINING_FIELDS = ("device", "progress")

# Cells of a suite, all matrix blocks together, before 'exclude' (more is a typo, not a study).
MAX_CELLS = 10_000

# Each task's cell fields and required fields by task name, for reading (documentation,
# tools).  The Task objects own them (gmbench.tasks; a changed default there changes the ids
# of the cells relying on it) and the suite's checks ask them directly.
CELL_FIELDS: dict[str, dict[str, Field]] = {name: task.fields for name, task in tasks.TASKS.items()}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {name: task.required for name, task in tasks.TASKS.items()}


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
        parts = [str(label), *tasks.task_for(c).title_parts(c)]
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
