"""Executors: how the cells of a suite are run.

An executor has one method::

    run(cells, run_dir, options, on_start, on_epoch, on_done, poll) -> None

It calls :func:`gmbench.runner.run_cell` for every cell (a
:class:`gmbench.suite.Cell`) with the cell folder
``gmbench.runner.cell_dir(run_dir, cell.id)``, and reports back on the
driver: ``on_start(cell)`` when a cell starts, ``on_epoch(cell, record)`` per
finished epoch where it can (in-process), ``on_done(cell, metrics)`` once per
cell -- also for a cell whose worker died (then with a ``failed`` status that
the executor writes to the cell's ``metrics.json`` itself) -- and ``poll()``
every second or so while it waits (the progress display reads the cells'
``epochs.jsonl`` files then).  Executors that run cells elsewhere need a run
folder on storage shared with the driver.

Interrupted (Ctrl-C, or ``SIGTERM`` through
:func:`gmbench.executors.lifetime.stop_on_sigterm`), an executor stops its
cells at once, calls ``on_done`` with :func:`record_interrupted`'s metrics
for every cell in flight (status ``interrupted``: the next run resumes it from
its checkpoint) and re-raises.

:data:`EXECUTORS` maps the names accepted by ``gmbench run --executor`` to
``module:class``; each class is built as ``cls(jobs=N, **executor_options)``.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from gmbench import io
from gmbench.errors import GmbenchError
from gmbench.executors.local import LocalExecutor

EXECUTORS = {
    "local": "gmbench.executors.local:LocalExecutor",
    "ray": "gmbench.executors.ray:RayExecutor",
}


def create_executor(name: str, jobs: int = 1, **options):
    if name not in EXECUTORS:
        raise GmbenchError(f"unknown executor '{name}'; available: {', '.join(EXECUTORS)}")
    module_name, class_name = EXECUTORS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(jobs=jobs, **options)


def record_interrupted(folder, interrupt: BaseException, since: float | None = None) -> dict:
    """Write and return the metrics of a cell stopped mid-run: status ``interrupted``.

    A cell that finished (``metrics.json`` written at or after ``since``) just before
    the interrupt keeps its metrics.
    """
    from gmbench.executors.lifetime import interrupt_name
    from gmbench.run_folder import read_metrics_file
    from gmbench.runner import METRICS_FILE

    folder = Path(folder)
    path = folder / METRICS_FILE
    if since is not None and path.is_file() and path.stat().st_mtime >= since:
        written = read_metrics_file(path)
        if written.get("status") == "ok":
            return written
    epochs = folder / "epochs.jsonl"
    if epochs.is_file():
        done = sum(1 for line in epochs.read_text().splitlines() if line.strip())
        again = f"after {done} epoch(s); run the same command again to resume it from its checkpoint"
    else:
        again = "before its first epoch; run the same command again to run it"
    metrics = {
        "cell_id": folder.name,
        "status": "interrupted",
        "error": f"interrupted by {interrupt_name(interrupt)} {again}",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io.write_json(path, metrics)
    return metrics


__all__ = ["EXECUTORS", "LocalExecutor", "create_executor", "record_interrupted"]
