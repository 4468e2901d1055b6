"""Executors: how the cells of a suite are run.

An executor has one method::

    run(cells, run_dir, options, on_start, on_epoch, on_done, poll) -> None

It calls :func:`gmbench.run.launcher.launch_cell` for every cell (a
:class:`gmbench.suite.Cell`) with the cell folder
``gmbench.run.folder.cell_dir(run_dir, cell.id)``, and reports back on the
driver: ``on_start(cell)`` when a cell starts, ``on_epoch(cell, record)`` per
finished epoch where it can (in-process), ``on_done(cell, metrics)`` once per
cell -- also for a cell whose worker died (then with a ``failed`` status that
the executor writes to the cell's ``metrics.json`` itself) -- and ``poll()``
every second or so while it waits (the progress display reads the cells'
``epochs.jsonl`` files then).  Executors that run cells elsewhere need a run
folder on storage shared with the driver.

Interrupted (Ctrl-C, or ``SIGTERM`` through
:func:`gmbench.run.lifetime.stop_on_sigterm`), an executor stops its
cells at once, calls ``on_done`` with
:func:`~gmbench.run.lifetime.record_interrupted`'s metrics
for every cell in flight (status ``interrupted``: the next run resumes it from
its checkpoint) and re-raises.

:data:`EXECUTORS` maps the names accepted by ``gmbench run --executor`` to
``module:class``; each class is built as ``cls(jobs=N, **executor_options)``.
"""

from __future__ import annotations

import importlib

from gmbench.errors import GmbenchError
from gmbench.run.lifetime import record_interrupted
from gmbench.run.executors.local import LocalExecutor

EXECUTORS = {
    "local": "gmbench.run.executors.local:LocalExecutor",
    "ray": "gmbench.run.executors.ray:RayExecutor",
}


def create_executor(name: str, jobs: int = 1, **options):
    if name not in EXECUTORS:
        raise GmbenchError(f"unknown executor '{name}'; available: {', '.join(EXECUTORS)}")
    module_name, class_name = EXECUTORS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(jobs=jobs, **options)


__all__ = ["EXECUTORS", "LocalExecutor", "create_executor", "record_interrupted"]
