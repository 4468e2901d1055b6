"""Task types: what a cell does (``task:`` in a suite), one :class:`Task` object each.

A task owns its run function, the metric a report tabulates by default, the
epochs the progress display plans for a cell, and how a cell's configuration
becomes a row of ``results.csv``; the runner, results, report and progress look
it up with :func:`task_for` instead of branching on task names.  The run
functions live in one module per task and are imported when a cell runs, so
reading results (``gmbench report``) does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from gmbench.errors import GmbenchError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    module: str  # gmbench.tasks.<module>.run(config, cell_dir, options, on_epoch) -> metrics
    default_metric: str  # the value of a report's default table
    report_extra: tuple[str, ...] = ()  # more columns of that table
    uses_dataset: bool = False  # cells load a dataset plugin (checked before a run starts)
    data_parallel: bool = False  # --nproc-per-node N runs a cell on N ranks (gmbench.run.launcher)
    epochs_field: tuple[str, ...] | None = None  # path to the planned epochs in a cell's config
    default_epochs: int = 1
    # results.csv columns taken from a cell's configuration, beyond those every task copies.
    result_fields: Callable[[dict], dict[str, Any]] = lambda config: {}
    label: Callable[[dict], str] = lambda config: ""  # a cell's label when the suite gives none

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        # Deferred: the run modules import torch and the plugins; results and reports do not need them.
        return importlib.import_module(f"gmbench.tasks.{self.module}").run

    def planned_epochs(self, config: dict) -> int:
        """Epochs a cell of this task runs (progress bars and ETAs count them); 1 without epochs."""
        if self.epochs_field is None:
            return 1
        value: Any = config
        for key in self.epochs_field:
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else self.default_epochs


def _train_result_fields(config: dict) -> dict[str, Any]:
    training, params = config.get("training") or {}, config.get("model_params") or {}
    row = {
        "epochs": TRAIN.planned_epochs(config),
        "batch_size": training.get("batch_size", 21),
        "layout": params.get("layout"),
        # A point-cloud cell uses no fitted mixtures: leave the column empty.
        "input_fitting": config.get("input_fitting") if config.get("input") != "points" else None,
    }
    for nested in ("reduction", "transfer_fitting"):
        if nested in params:
            row[nested] = params[nested]
    return row


def _train_label(config: dict) -> str:
    return f"{config.get('model')} ({config.get('input')})"


def _named_label(config: dict) -> str:
    return str(config.get("transfer_fitting") or config.get("layout") or config.get("task"))


TRAIN = Task("train", "train", "test_accuracy", report_extra=("params", "train_time_s", "peak_memory_mb"), uses_dataset=True, data_parallel=True, epochs_field=("training", "epochs"), default_epochs=60,
             result_fields=_train_result_fields, label=_train_label)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        TRAIN,
        Task("footprint", "footprint", "memory_mb", label=_named_label),
        Task("transfer_fitting_timing", "transfer_fitting_timing", "time_ms", label=_named_label),
    )
}


def get(name: str) -> Task:
    if name not in TASKS:
        raise GmbenchError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# A suite (and a cell) without ``task:`` trains.
DEFAULT_TASK = "train"


def task_for(config: dict) -> Task:
    """The task of a resolved cell (:data:`DEFAULT_TASK` when the field is missing, as in a suite)."""
    return get(config.get("task") or DEFAULT_TASK)
