"""Launching one cell: in this process, or data-parallel on N local ranks.

:func:`launch_cell` is what every executor calls for a cell: a training cell with
``options.nproc_per_node > 1`` runs on that many spawned processes
(:func:`run_cell_on_ranks`, see :mod:`gmbench.run.ranks` for how they train
together), anything else runs in this process (:func:`gmbench.run.cell.run_cell`).

The ranks get the environment variables torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).  Every rank trains inside the
same :func:`gmbench.cell_environment.cell_environment` as a single-process cell
(plugins, backend with the suite's ``backend_params``, device, seeds): rank 0
through :func:`~gmbench.run.cell.run_cell` (it writes the cell folder), the
others through :func:`_train_without_writing`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from gmbench.cell_environment import cell_environment
from gmbench.run import folder
from gmbench.run.cell import RunOptions, run_cell
from gmbench.run.lifetime import die_with_parent
from gmbench.run.ranks import destroy_process_group, init_process_group
from gmbench.tasks import task_for

log = logging.getLogger("gmbench.run")

# After one rank failed, how long the others get to record the failure themselves
# (rank 0 writes metrics.json) before they are terminated.
FAILURE_GRACE_S = 20.0
POLL_S = 1.0


def launch_cell(cell_config: dict, cell_dir: str | Path, options: RunOptions,
                on_epoch: Callable[[dict], Any] | None = None) -> dict:
    """Run one cell (data-parallel when the options and its task ask for it); its metrics."""
    if options.nproc_per_node > 1 and task_for(cell_config).data_parallel:
        # Each rank calls run_cell (with nproc_per_node=1); rank 0 writes the cell folder.
        return run_cell_on_ranks(cell_config, cell_dir, options, options.nproc_per_node, on_epoch)
    return run_cell(cell_config, cell_dir, options, on_epoch)


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous of one cell's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cell_on_ranks(cell_config: dict, cell_dir: str | Path, options, nproc: int, on_epoch: Callable[[dict], Any] | None = None) -> dict:
    """Run one training cell data-parallel on ``nproc`` local processes; return rank 0's metrics.

    Called by :func:`launch_cell` when ``options.nproc_per_node > 1``.  While
    the ranks train, new lines of the cell's ``epochs.jsonl`` are passed to ``on_epoch``.
    A rank that dies or raises ends the cell: the others get :data:`FAILURE_GRACE_S`
    to finish (rank 0 records the failure itself when it sees it), then are terminated,
    and the cell is recorded as failed here if rank 0 did not.
    """
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    launched = time.time()
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    port = free_port()
    threads = max(1, torch.get_num_threads() // nproc)
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, nproc, port, threads, cell_config, str(cell_dir), options, errors),
            name=f"gmbench-rank{rank}",
        )
        for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    seen = 0
    failed_at = None
    try:
        while any(process.is_alive() for process in processes):
            for process in processes:
                process.join(timeout=POLL_S / nproc)
            seen = _forward_epochs(cell_dir, seen, on_epoch)
            if failed_at is None and any(process.exitcode not in (None, 0) for process in processes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                break
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    _forward_epochs(cell_dir, seen, on_epoch)

    written_at = folder.metrics_written_at(cell_dir)
    metrics = folder.read_metrics_file(cell_dir / folder.METRICS_FILE) if written_at is not None else None
    written_now = metrics is not None and metrics["status"] != folder.DAMAGED and written_at >= launched - 1.0
    if written_now and (metrics.get("status") != "ok" or all(p.exitcode == 0 for p in processes)):
        return metrics
    reasons = []
    while not errors.empty():
        rank, message = errors.get()
        reasons.append(f"rank {rank}: {message}")
    for rank, process in enumerate(processes):
        if process.exitcode not in (0, None) and not any(r.startswith(f"rank {rank}:") for r in reasons):
            reasons.append(f"rank {rank} exited with code {process.exitcode}")
    return folder.write_failure(cell_dir, "failed", "; ".join(reasons) or "a rank ended without writing metrics")


def _forward_epochs(cell_dir: Path, seen: int, on_epoch) -> int:
    if on_epoch is None:
        return seen
    records = folder.read_epochs(cell_dir)
    for record in records[seen:]:
        on_epoch(record)
    return max(seen, len(records))


def _rank_main(rank: int, world_size: int, port: int, threads: int, cell_config: dict, cell_dir: str, options, errors) -> None:
    """One rank: join the group, then rank 0 runs the cell (and writes); the others only train."""
    die_with_parent()  # never outlive the process that launched the ranks (it may be killed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's: it stops the ranks
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    failed = _train_rank(rank, cell_config, cell_dir, options, errors)
    # Not in a ``finally``: there the failure's traceback would still hold the frames that
    # hold the DDP wrapper, which holds the group, and the group must be freed before exit
    # (see gmbench.run.ranks).
    destroy_process_group()
    if failed:
        sys.exit(1)


def _train_rank(rank: int, cell_config: dict, cell_dir: str, options, errors) -> bool:
    """Join the group and train; True when this rank failed (reported on ``errors`` and logged)."""
    try:
        _, device = init_process_group(options.device)
        options = dataclasses.replace(options, device=device, nproc_per_node=1, progress=options.progress and rank == 0)
        if rank == 0:
            run_cell(cell_config, cell_dir, options)
        else:
            _train_without_writing(cell_config, Path(cell_dir), options)
    except BaseException as error:  # noqa: BLE001 - reported to the launcher; the rank exits 1
        errors.put((rank, f"{type(error).__name__}: {error}".splitlines()[0]))
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        return True
    return False


def _train_without_writing(cell_config: dict, cell_dir: Path, options) -> None:
    """What :func:`~gmbench.run.cell.run_cell` does on rank 0, minus its writes (the trainer skips its own on ranks > 0):
    the task in the same :func:`~gmbench.cell_environment.cell_environment` as rank 0's."""
    with cell_environment(options, seed=cell_config.get("seed")):
        # Diagnostics run after training on the trained model and only write a file: rank 0's job.
        task_for(cell_config).run(dict(cell_config, diagnostics=False), cell_dir, options, None)
