"""Task types: what a cell does (``task:`` in a suite), one :class:`Task` object each.

A task owns its run function, the metric a report tabulates by default, the
epochs the progress display plans for a cell, how a cell's configuration
becomes a row of ``results.csv``, and its suite fields: each cell field with its
types, default and range (:class:`~gmbench.tasks.fields.Field`), the required
fields and plugin choices, the suite checks its cells get and how ``--smoke``
shrinks a cell.  The runner, results, report, progress and the suite package look
it up with :func:`task_for` / :func:`get` instead of branching on task names, so a
new task type is its run module plus its :class:`Task` here.  The run functions
live in one module per task and are imported when a cell runs, so reading
results (``gmbench report``) and validating a suite do not import them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from gmbench.errors import GmbenchError
from gmbench.tasks.fields import (
    DIMS,
    LABEL,
    MAX_GAUSSIANS,
    SEED,
    SMOKE_TEST_SAMPLES,
    SMOKE_TRAIN_SAMPLES,
    Field,
    count,
    is_int,
    shrink_layout,
)

INPUTS = ("gm", "points")


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
    title_parts: Callable[[dict], list[str]] = lambda config: []  # after the label in a cell's title
    # Suite fields: field -> Field.  Cell ids hash the resolved fields, so a default changed
    # here changes the ids of every cell that relies on it (old run folders no longer resume).
    fields: dict[str, Field] = dataclasses.field(default_factory=dict)
    required: tuple[str, ...] = ()  # fields every cell must set
    # Plugin choices of a cell: (kind, field naming the plugin, field with its parameters).
    plugin_fields: tuple[tuple[str, str, str], ...] = ()
    # Checks of a resolved cell, in order, by name (gmbench.suite.cell_checks.CHECKS).
    suite_checks: tuple[str, ...] = ("plugins",)
    # --smoke: shrink an expanded cell in place; the int is the suite's Gaussian-count divisor.
    smoke: Callable[[dict, int], None] = lambda config, factor: None
    smoke_divides_gaussians: bool = False  # --smoke divides the suite's Gaussian counts by one factor

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


def _train_title_parts(config: dict) -> list[str]:
    layout = (config.get("model_params") or {}).get("layout")
    return [str(layout)] if not config.get("label") and layout else []


def _named_label(config: dict) -> str:
    return str(config.get("transfer_fitting") or config.get("layout") or config.get("task"))


TRAIN_FIELDS = {
    "label": LABEL,
    "dataset": Field((str,), None),
    "dataset_params": Field((dict,), {}),
    "model": Field((str,), None),
    "model_params": Field((dict,), {}),
    "input": Field((str,), "gm", choices=INPUTS),
    "input_fitting": Field((str,), "kmeans"),
    "input_fitting_params": Field((dict,), {}),
    "n_gaussians": count(64, MAX_GAUSSIANS),
    "n_points": count(None, nullable=True),
    "seed": SEED,
    "training": Field((dict,), {}),
    "train_samples": count(None, nullable=True),
    "test_samples": count(None, nullable=True),
    "diagnostics": Field((bool,), False),
    "diagnostics_samples": count(16),
    "diagnostics_points": count(100_000),
}


def _train_smoke(config: dict, factor: int) -> None:
    """One epoch, at most 48 train / 24 test samples, small diagnostics; Gaussian counts
    (and the layout's, and the point count) divided by the suite's ``factor``."""
    config.setdefault("training", {})["epochs"] = 1
    config["train_samples"] = min(config.get("train_samples") or SMOKE_TRAIN_SAMPLES, SMOKE_TRAIN_SAMPLES)
    config["test_samples"] = min(config.get("test_samples") or SMOKE_TEST_SAMPLES, SMOKE_TEST_SAMPLES)
    config["diagnostics_samples"] = min(config.get("diagnostics_samples", 4), 4)
    config["diagnostics_points"] = min(config.get("diagnostics_points", 2000), 2000)
    n = config.get("n_gaussians", TRAIN_FIELDS["n_gaussians"].default)
    if factor > 1 and is_int(n):
        config["n_gaussians"] = max(2, n // factor)
        if config.get("n_points"):
            config["n_points"] = max(8, config["n_points"] // factor)
        params = config.get("model_params") or {}
        layout = params.get("layout")
        if isinstance(layout, str):
            params["layout"] = shrink_layout(layout.replace("{n_gaussians}", str(n)), factor)


TRAIN = Task("train", "train", "test_accuracy", report_extra=("params", "train_time_s", "peak_memory_mb"), uses_dataset=True, data_parallel=True, epochs_field=("training", "epochs"), default_epochs=60,
             result_fields=_train_result_fields, label=_train_label, title_parts=_train_title_parts,
             fields=TRAIN_FIELDS, required=("dataset", "model"),
             plugin_fields=(("dataset", "dataset", "dataset_params"), ("input_fitting", "input_fitting", "input_fitting_params"), ("model", "model", "model_params")),
             suite_checks=("model_params_placeholders", "plugins", "model_input", "gmcn_layout", "point_count", "training"),
             smoke=_train_smoke, smoke_divides_gaussians=True)

FOOTPRINT = Task(
    "footprint", "footprint", "memory_mb", label=_named_label,
    title_parts=lambda config: [f"integrated={config.get('integrated')} dims={config.get('dims')}"],
    fields={
        "label": LABEL,
        "layout": Field((str,), None),
        "batch": count(32),
        "kernel_gaussians": count(5),
        "integrated": Field((bool,), False),
        "dims": DIMS,
        "seed": SEED,
    },
    required=("layout",), suite_checks=("layout",),
)


def _timing_smoke(config: dict, factor: int) -> None:
    """16 mixtures of at most 32 Gaussians, timed once."""
    config["n_mixtures"] = min(config.get("n_mixtures", 800), 16)
    config["n_gaussians"] = min(config.get("n_gaussians", 256), 32)
    config["repeats"] = 1
    config["rmse_samples"] = min(config.get("rmse_samples", 20000), 2000)


TRANSFER_FITTING_TIMING = Task(
    "transfer_fitting_timing", "transfer_fitting_timing", "time_ms", label=_named_label,
    fields={
        "label": LABEL,
        "transfer_fitting": Field((str,), None),
        "transfer_fitting_params": Field((dict,), {}),
        "n_mixtures": count(800),
        "n_gaussians": count(256, MAX_GAUSSIANS),
        "dims": dataclasses.replace(DIMS, default=2),
        "repeats": count(3),
        "rmse_samples": count(20000),
        "seed": SEED,
    },
    required=("transfer_fitting",),
    plugin_fields=(("transfer_fitting", "transfer_fitting", "transfer_fitting_params"),),
    smoke=_timing_smoke,
)

TASKS: dict[str, Task] = {task.name: task for task in (TRAIN, FOOTPRINT, TRANSFER_FITTING_TIMING)}


def get(name: str) -> Task:
    if name not in TASKS:
        raise GmbenchError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def dataset_parameters(dataset_params: dict, data_root: Any = None) -> dict:
    """A copy of a cell's (or ``gmbench fit``'s) dataset parameters with the run's
    ``--data-root``, which overrides theirs.  The folder comes from the command line (or a
    run's environment record), not the suite, so cell ids do not depend on where the data
    lives; the runner, the trainer, ``gmbench fit`` and the report's figures all merge it here."""
    params = dict(dataset_params)
    if data_root is not None:
        params["data_root"] = data_root
    return params


# A suite (and a cell) without ``task:`` trains.
DEFAULT_TASK = "train"


def task_for(config: dict) -> Task:
    """The task of a resolved cell (:data:`DEFAULT_TASK` when the field is missing, as in a suite)."""
    return get(config.get("task") or DEFAULT_TASK)
