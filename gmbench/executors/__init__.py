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

:data:`EXECUTORS` maps the names accepted by ``gmbench run --executor`` to
``module:class``; each class is built as ``cls(jobs=N, **executor_options)``.
"""

from __future__ import annotations

import importlib

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


__all__ = ["EXECUTORS", "LocalExecutor", "create_executor"]
