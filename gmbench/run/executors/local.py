"""The local executor: cells in this process (``jobs=1``) or in N spawned worker processes.

With worker processes every cell gets a fresh process (``max_tasks_per_child=1``),
so the CPU peak memory the trainer records (the process's peak RSS) is the
cell's own; ``isolate=True`` does the same with one worker.

Worker processes use the ``spawn`` start method (safe with threads, CUDA and
every OS) through :class:`concurrent.futures.ProcessPoolExecutor`; each one
imports gmbench afresh and receives only plain data (cell configuration,
folder, :class:`gmbench.run.cell.RunOptions`).  When a worker dies (killed,
segfault, out of host memory) the pool breaks: the cells that were in flight
are recorded as failed with that reason, and the remaining ones go on in a new
pool.  With ``jobs > 1`` each worker limits itself to
``max(1, cpu_count // jobs)`` intra-op threads so the workers do not fight
over cores.

Workers never outlive the driver (:mod:`gmbench.run.lifetime`) and hold
the run folder's lock with it (:mod:`gmbench.run.lock`).  On Ctrl-C or
``SIGTERM`` the driver stops the workers at once (``SIGTERM``, ``SIGKILL``
after :data:`STOP_GRACE_S`) and records every cell in flight as
``interrupted``; the next run resumes those from their checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from gmbench.run.lifetime import die_with_parent, record_interrupted, worker_signals
from gmbench.run.folder import cell_dir, config_written_at, write_failure
from gmbench.run.launcher import launch_cell
from gmbench.run.lock import held

# Seconds stopped workers get to exit on SIGTERM before they are killed.
STOP_GRACE_S = 3.0


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
        if not self.isolate:
            for cell in cells:
                on_start(cell)
                folder = cell_dir(run_dir, cell.id)
                try:
                    metrics = launch_cell(cell.config, folder, options, on_epoch=lambda record, cell=cell: on_epoch(cell, record))
                except (KeyboardInterrupt, SystemExit) as interrupt:
                    on_done(cell, record_interrupted(folder, interrupt))
                    raise
                on_done(cell, metrics)
            return
        pending = list(cells)
        while pending:
            pending = self._run_pool(pending, run_dir, options, on_start, on_done, poll)

    def _run_pool(self, cells, run_dir, options, on_start, on_done, poll) -> list:
        """Run ``cells`` in one pool; return the cells that never started if the pool broke."""
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        context = multiprocessing.get_context("spawn")
        lock = held(run_dir)
        started: set[str] = set()
        reported: set[str] = set()
        pool_started = time.time()
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=context, initializer=_init_worker,
            initargs=(threads, lock.for_child() if lock is not None else None), max_tasks_per_child=1,
        )
        futures = {}
        broken = False
        try:
            futures = {
                pool.submit(_run_cell_in_worker, cell.config, cell_dir(run_dir, cell.id), options): cell for cell in cells
            }
            waiting = set(futures)
            while waiting:
                done, waiting = concurrent.futures.wait(waiting, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
                if lock is not None:
                    lock.note_workers(process.pid for process in _pool_processes(pool))
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
                    reported.add(cell.id)
                    on_done(cell, metrics)
                if poll is not None:
                    poll()
        except (KeyboardInterrupt, SystemExit) as interrupt:
            # Stop now, not after the cells in flight: they resume from their checkpoints.
            _stop_pool(pool)
            for future, cell in futures.items():
                folder = cell_dir(run_dir, cell.id)
                if cell.id in reported or not _started_since(folder, pool_started):
                    continue
                on_done(cell, record_interrupted(folder, interrupt, since=pool_started))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            # An exception's traceback keeps this frame: without the pool, its queues'
            # semaphores are released now (else the resource tracker warns at exit).
            del pool
        if broken:
            return [cell for future, cell in futures.items() if cell.id not in started]
        return []


def _pool_processes(pool) -> list:
    # ProcessPoolExecutor has no public list of its workers before Python 3.14.
    return list((getattr(pool, "_processes", None) or {}).values())


def _stop_pool(pool) -> None:
    """Stop every worker of ``pool``, also one it spawned to replace a worker while we stopped.

    A worker that exits without a result breaks the pool: it then starts no further cell.
    """
    processes = getattr(pool, "_processes", None) or {}  # the live dict: shutdown() drops it
    for _ in range(5):
        alive = [process for process in list(processes.values()) if not _exited(process)]
        if not alive:
            return
        stop_processes(alive)


def stop_processes(processes, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``processes`` (multiprocessing ``Process`` objects), SIGKILL those still alive after ``grace_s``."""
    from multiprocessing.connection import wait

    processes = [process for process in processes if process.exitcode is None]
    for process in processes:
        process.terminate()
    _wait_all(processes, grace_s, wait)
    for process in processes:
        if not _exited(process):
            process.kill()
    _wait_all(processes, grace_s, wait)


def _exited(process) -> bool:
    from multiprocessing.connection import wait

    # The sentinel, not is_alive(): the pool's own thread may reap the process concurrently.
    return bool(wait([process.sentinel], timeout=0))


def _wait_all(processes, timeout_s: float, wait) -> None:
    deadline = time.monotonic() + timeout_s
    remaining = [process.sentinel for process in processes]
    while remaining and time.monotonic() < deadline:
        ready = wait(remaining, timeout=max(0.0, deadline - time.monotonic()))
        remaining = [sentinel for sentinel in remaining if sentinel not in ready]


def _started_since(folder: Path, since: float) -> bool:
    """A worker has picked the cell up: run_cell writes config.json first thing."""
    written = config_written_at(folder)
    return written is not None and written >= since - 1.0


def _run_cell_in_worker(cell_config: dict, folder, options) -> dict:
    """:func:`gmbench.run.launcher.launch_cell` in a worker; stopped by the driver, the worker
    exits without a result, so that the pool counts it as lost and starts no cell after it."""
    try:
        return launch_cell(cell_config, folder, options)
    except SystemExit as stop:  # SIGTERM (lifetime.worker_signals): the finally blocks have run
        from multiprocessing import util

        # What a multiprocessing child runs at its normal exit (releases the semaphores
        # it registered, e.g. tqdm's lock); os._exit alone would leave them to the tracker.
        util._exit_function()
        os._exit(stop.code if isinstance(stop.code, int) else 1)


def _init_worker(threads: int, inherited_lock) -> None:
    """First thing in every worker: die with the driver, leave Ctrl-C to it, share its lock."""
    die_with_parent()
    worker_signals()
    # ``inherited_lock`` arrived as the run lock's descriptor, kept open (gmbench.run.lock).
    del inherited_lock
    torch.set_num_threads(threads)


def _worker_died(folder: Path, reason: str) -> dict:
    return write_failure(folder, "failed", reason)
