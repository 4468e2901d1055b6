"""Data-parallel training of one cell on several processes (``gmbench run --nproc-per-node N``).

Each of the N processes (ranks) holds a full model replica wrapped in
:class:`torch.nn.parallel.DistributedDataParallel`; gradients are averaged
across ranks during ``backward``.  Gloo is the process-group backend on CPU
(so that this is testable without GPUs), NCCL on CUDA (one GPU per rank:
``cuda:<local rank>``).

Same recipe, same global batch.  The trainer keeps the paper's batch size as
the *global* batch: every rank draws the same permutation from the same seeded
generator (so no sampler state has to be exchanged), applies the augmentation
to the whole global batch, and trains on its contiguous shard of it
(:meth:`DistributedContext.shard`, sizes differ by at most one).  The loss is
rescaled so that DDP's gradient average equals the gradient of the mean loss
over the global batch (:meth:`DistributedContext.scale_for_backward`); training
with N ranks therefore follows single-process training up to floating-point
summation order.  Exceptions: batch-norm statistics are per rank on CPU (SyncBatchNorm
needs CUDA; on CUDA batch-norm layers are converted), and dropout masks differ.

Metrics are reduced across ranks (loss and correct counts summed, the test set
sharded and its correct counts summed), so every rank sees the same test
accuracy and takes the same learning-rate decision.  Only rank 0 writes
(``epochs.jsonl``, ``checkpoint.pt``, ``metrics.json``); all ranks read the
checkpoint when resuming, so the cell folder must be visible to all of them
(it is: the ranks of a cell run on one node).

:func:`run_cell_on_ranks` launches the ranks of one cell as spawned processes,
setting the environment variables torchrun sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_process_group`
reads exactly those, so it also works in a script started by ``torchrun``.
Every rank trains inside the same :func:`gmbench.cell_environment.cell_environment`
as a single-process cell (plugins, backend with the suite's ``backend_params``,
device, seeds): rank 0 through :func:`gmbench.runner.run_cell`, the others
through :func:`_train_without_writing`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gmbench import io
from gmbench.errors import GmbenchError

log = logging.getLogger("gmbench.run")

# After one rank failed, how long the others get to record the failure themselves
# (rank 0 writes metrics.json) before they are terminated.
FAILURE_GRACE_S = 20.0
POLL_S = 1.0


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files (logs, checkpoints, metrics)."""
        return self.rank == 0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` (batch norm synchronised on CUDA); the model itself
        when single-process.  DDP broadcasts rank 0's parameters and buffers at construction."""
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
        return DistributedDataParallel(model)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model inside a DDP wrapper (for ``state_dict`` and evaluation without collectives)."""
        return getattr(model, "module", model)

    def shard(self, batch: Tensor, allow_empty: bool = False) -> Tensor:
        """This rank's contiguous part of a global batch ``[G, ...] -> [~G / world_size, ...]``
        (sizes differ by at most one; ``allow_empty``: fewer samples than ranks is fine)."""
        if not self.is_distributed:
            return batch
        if len(batch) < self.world_size and not allow_empty:
            raise GmbenchError(
                f"a batch of {len(batch)} samples cannot be split over {self.world_size} processes; "
                "use a batch_size of at least --nproc-per-node"
            )
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def scale_for_backward(self, loss: Tensor, local_count: int, global_count: int) -> Tensor:
        """``loss`` (this rank's mean) rescaled so that DDP's gradient *average* over ranks is
        the gradient of the mean over the global batch: ``loss * local / global * world``."""
        if not self.is_distributed:
            return loss
        return loss * (local_count * self.world_size / global_count)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_finite(self, value: Tensor) -> bool:
        """True when ``value`` is finite on every rank (so all ranks stop together on a NaN)."""
        finite = bool(torch.isfinite(value).all())
        if not self.is_distributed:
            return finite
        return self.sum([0.0 if finite else 1.0])[0] == 0.0

    def _collective_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE_PROCESS = DistributedContext()
_current: DistributedContext = SINGLE_PROCESS


def current() -> DistributedContext:
    """The context of this process: set by :func:`init_process_group`, else single-process."""
    return _current


def init_process_group(device: str = "cpu", timeout_s: float = 1800.0) -> tuple[DistributedContext, str]:
    """Join the process group described by torchrun's environment variables.

    Returns the context and the device this rank trains on (``cuda:<LOCAL_RANK>``
    for a CUDA ``device``, else ``cpu``).  Backend: NCCL for CUDA, gloo for CPU.
    """
    global _current
    import datetime

    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise GmbenchError(f"cannot join a process group: environment variable(s) {', '.join(missing)} unset; start with torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise GmbenchError(f"device '{device}' requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank)
        backend, rank_device = "nccl", f"cuda:{local_rank}"
    else:
        backend, rank_device = "gloo", "cpu"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    _current = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
    return _current, rank_device


def destroy_process_group() -> None:
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = SINGLE_PROCESS


# --------------------------------------------------------------------------- launching one cell


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous of one cell's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cell_on_ranks(cell_config: dict, cell_dir: str | Path, options, nproc: int, on_epoch: Callable[[dict], Any] | None = None) -> dict:
    """Run one training cell data-parallel on ``nproc`` local processes; return rank 0's metrics.

    Called by :func:`gmbench.runner.run_cell` when ``options.nproc_per_node > 1``.  While
    the ranks train, new lines of the cell's ``epochs.jsonl`` are passed to ``on_epoch``.
    A rank that dies or raises ends the cell: the others get :data:`FAILURE_GRACE_S`
    to finish (rank 0 records the failure itself when it sees it), then are terminated,
    and the cell is recorded as failed here if rank 0 did not.
    """
    from gmbench.runner import METRICS_FILE

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

    metrics = _read_metrics(cell_dir / METRICS_FILE)
    written_now = metrics is not None and (cell_dir / METRICS_FILE).stat().st_mtime >= launched - 1.0
    if written_now and (metrics.get("status") != "ok" or all(p.exitcode == 0 for p in processes)):
        return metrics
    reasons = []
    while not errors.empty():
        rank, message = errors.get()
        reasons.append(f"rank {rank}: {message}")
    for rank, process in enumerate(processes):
        if process.exitcode not in (0, None) and not any(r.startswith(f"rank {rank}:") for r in reasons):
            reasons.append(f"rank {rank} exited with code {process.exitcode}")
    metrics = {
        "cell_id": cell_dir.name,
        "status": "failed",
        "error": "; ".join(reasons) or "a rank ended without writing metrics",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    io.write_json(cell_dir / METRICS_FILE, metrics)
    return metrics


def _read_metrics(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _forward_epochs(cell_dir: Path, seen: int, on_epoch) -> int:
    if on_epoch is None:
        return seen
    from gmbench.run_progress import _read_jsonl

    records = _read_jsonl(cell_dir / "epochs.jsonl")
    for record in records[seen:]:
        on_epoch(record)
    return max(seen, len(records))


def _rank_main(rank: int, world_size: int, port: int, threads: int, cell_config: dict, cell_dir: str, options, errors) -> None:
    """One rank: join the group, then rank 0 runs the cell (and writes); the others only train."""
    import signal

    from gmbench.executors.lifetime import die_with_parent

    die_with_parent()  # never outlive the process that launched the ranks (it may be killed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's: it stops the ranks
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        _, device = init_process_group(options.device)
        options = dataclasses.replace(options, device=device, nproc_per_node=1, progress=options.progress and rank == 0)
        if rank == 0:
            from gmbench.runner import run_cell

            run_cell(cell_config, cell_dir, options)
        else:
            _train_without_writing(cell_config, Path(cell_dir), options)
    except BaseException as error:
        errors.put((rank, f"{type(error).__name__}: {error}".splitlines()[0]))
        log.error("rank %d failed:\n%s", rank, traceback.format_exc())
        raise
    finally:
        destroy_process_group()


def _train_without_writing(cell_config: dict, cell_dir: Path, options) -> None:
    """What ``run_cell`` does on rank 0, minus its writes (the trainer skips its own on ranks > 0):
    the task in the same :func:`~gmbench.cell_environment.cell_environment` as rank 0's."""
    from gmbench.cell_environment import cell_environment
    from gmbench.runner import TASKS

    with cell_environment(options, seed=cell_config.get("seed")):
        # Diagnostics run after training on the trained model and only write a file: rank 0's job.
        TASKS[cell_config["task"]](dict(cell_config, diagnostics=False), cell_dir, options, None)
