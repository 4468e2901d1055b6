"""One cell: :func:`run_cell` runs it in this process and records its result.

:func:`run_cell` is self-contained and picklable (a module-level function of
plain data), so any executor -- in-process, worker processes, Ray -- can call
it (through :func:`gmbench.run.launcher.launch_cell`, which adds data-parallel
ranks); it never raises for a failing experiment but records the failure in
``metrics.json``.  An interrupted cell resumes from its checkpoint the next time
(the trainer does that).
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from gmbench import plugins
from gmbench.cell_environment import cell_environment
from gmbench.loggers import CellLoggers
from gmbench.run import folder
from gmbench.tasks import dataset_parameters, task_for
from gmbench.training import TrainingDiverged


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings of one invocation that are not part of a cell's identity."""

    device: str = "cpu"
    backend: str | None = None
    backend_params: dict | None = None  # the suite's backend_params (cutoff, cpu_kernel, ...)
    data_root: str | None = None
    cache_dir: str | None = None
    plugins: tuple[str, ...] = ()
    progress: bool = False  # per-batch bars inside a cell (the trainer's tqdm)
    nproc_per_node: int = 1  # data-parallel processes per training cell (gmbench.run.launcher)
    loggers: tuple | None = None  # gmbench.loggers.LoggerChoice, each cell's experiment trackers; None: the suite's


def run_cell(cell_config: dict, cell_dir: str | Path, options: RunOptions, on_epoch: Callable[[dict], Any] | None = None) -> dict:
    """Run one cell in this process and write ``metrics.json``; return the metrics.

    ``cell_config`` is a resolved cell (``Suite.cells[i].config``); the result
    has ``status`` ``ok``, ``failed``, ``diverged`` or ``oom`` and, unless ok,
    ``error`` (one line; the traceback goes to ``error.txt``).
    """
    cell_dir = Path(cell_dir)
    folder.write_config(cell_dir, cell_config)
    started = time.perf_counter()
    tracking = CellLoggers(options.loggers or (), cell_config, cell_dir)
    try:
        # The same set-up as every data-parallel rank (gmbench.run.launcher).
        with cell_environment(options, seed=cell_config.get("seed")):
            task = task_for(cell_config)
            result = task.run(cell_config, cell_dir, options, tracking.epoch_callback(on_epoch))
        metrics = {"cell_id": cell_dir.name, **result, "status": "ok", "error": "",
                   "wall_time_s": time.perf_counter() - started, "finished_at": folder.now_utc()}
    except Exception as error:  # noqa: BLE001 - a failing cell is a result, not a crash
        folder.write_error(cell_dir, traceback.format_exc())
        metrics = folder.failure(cell_dir.name, failure_status(error), f"{type(error).__name__}: {error}",
                                 wall_time_s=time.perf_counter() - started)
    folder.write_metrics(cell_dir, metrics)
    tracking.end(metrics)
    return metrics


def failure_status(error: BaseException) -> str:
    if isinstance(error, TrainingDiverged):
        return "diverged"
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(error).lower():
        return "oom"
    return "failed"


def check_data(cells, options: RunOptions) -> None:
    """Fail before any cell runs when a data set's local files are missing.

    Calls each distinct data set's optional ``check()``; its
    :class:`~gmbench.errors.DataError` is a one-line user error (exit 2), not
    one failed cell per data set.
    """
    seen = set()
    for cell in cells:
        config = cell.config
        if not task_for(config).uses_dataset:
            continue
        params = dataset_parameters(config["dataset_params"], options.data_root)
        key = (config["dataset"], json.dumps(params, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        dataset = plugins.create("dataset", config["dataset"], **params)
        check = getattr(dataset, "check", None)
        if check is not None:
            check()
