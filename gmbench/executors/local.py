"""The local executor: cells in this process (``jobs=1``) or in N spawned worker processes.

With worker processes every cell gets a fresh process (``max_tasks_per_child=1``),
so the CPU peak memory the trainer records (the process's peak RSS) is the
cell's own; ``isolate=True`` does the same with one worker.

Worker processes use the ``spawn`` start method (safe with threads, CUDA and
every OS) through :class:`concurrent.futures.ProcessPoolExecutor`; each one
imports gmbench afresh and receives only plain data (cell configuration,
folder, :class:`gmbench.runner.RunOptions`).  When a worker dies (killed,
segfault, out of host memory) the pool breaks: the cells that were in flight
are recorded as failed with that reason, and the remaining ones go on in a new
pool.  With ``jobs > 1`` each worker limits itself to
``max(1, cpu_count // jobs)`` intra-op threads so the workers do not fight
over cores.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from gmbench import io


class LocalExecutor:
    """Run cells in-process (``jobs=1``) or in ``jobs`` worker processes."""

    name = "local"

    def __init__(self, jobs: int = 1, isolate: bool = False):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        # A fresh process per cell: per-cell peak RSS on CPU, nothing leaks between cells.
        self.isolate = isolate or jobs > 1

    def run(self, cells, run_dir, options, on_start, on_epoch, on_done, poll=None) -> None:
        from gmbench.runner import cell_dir, run_cell

        if not self.isolate:
            for cell in cells:
                on_start(cell)
                metrics = run_cell(cell.config, cell_dir(run_dir, cell.id), options, on_epoch=lambda record, cell=cell: on_epoch(cell, record))
                on_done(cell, metrics)
            return
        pending = list(cells)
        while pending:
            pending = self._run_pool(pending, run_dir, options, on_start, on_done, poll)

    def _run_pool(self, cells, run_dir, options, on_start, on_done, poll) -> list:
        """Run ``cells`` in one pool; return the cells that never started if the pool broke."""
        from gmbench.runner import cell_dir, run_cell

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        context = multiprocessing.get_context("spawn")
        started: set[str] = set()
        pool_started = time.time()
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=context, initializer=_limit_threads, initargs=(threads,), max_tasks_per_child=1,
        )
        with pool:
            futures = {
                pool.submit(run_cell, cell.config, cell_dir(run_dir, cell.id), options): cell for cell in cells
            }
            waiting = set(futures)
            broken = False
            while waiting:
                done, waiting = concurrent.futures.wait(waiting, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
                for future, cell in futures.items():
                    if cell.id not in started and _started_since(cell_dir(run_dir, cell.id), pool_started):
                        started.add(cell.id)
                        on_start(cell)
                for future in done:
                    cell = futures[future]
                    try:
                        metrics = future.result()
                    except BrokenProcessPool:
                        broken = True
                        if not _started_since(cell_dir(run_dir, cell.id), pool_started):
                            started.discard(cell.id)
                            continue  # never ran: retry it in a fresh pool
                        started.add(cell.id)
                        metrics = _worker_died(cell_dir(run_dir, cell.id), "the worker process running this cell died (killed or crashed)")
                    except Exception as error:  # noqa: BLE001 - e.g. unpicklable result
                        metrics = _worker_died(cell_dir(run_dir, cell.id), f"{type(error).__name__}: {error}")
                    if cell.id not in started:
                        started.add(cell.id)
                        on_start(cell)
                    on_done(cell, metrics)
                if poll is not None:
                    poll()
            if broken:
                return [cell for future, cell in futures.items() if cell.id not in started]
        return []


def _started_since(folder: Path, since: float) -> bool:
    """A worker has picked the cell up: run_cell writes config.json first thing."""
    try:
        return (Path(folder) / "config.json").stat().st_mtime >= since - 1.0
    except FileNotFoundError:
        return False


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker_died(folder: Path, reason: str) -> dict:
    from gmbench.runner import METRICS_FILE

    metrics = {
        "cell_id": Path(folder).name,
        "status": "failed",
        "error": reason,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io.write_json(Path(folder) / METRICS_FILE, metrics)
    return metrics
