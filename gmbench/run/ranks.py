"""Data-parallel training of one cell: this process's place among the cell's ranks.

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

:func:`init_process_group` reads the environment variables torchrun sets
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so it
also works in a script started by ``torchrun``; :mod:`gmbench.run.launcher` sets
them for the ranks it starts.

Leaving the group (:func:`destroy_process_group`) must free the backend before the
interpreter shuts down: gloo's worker threads hold each collective's tensors a moment
after it completes, and a worker that drops the last reference to a Python tensor needs
the GIL.  During interpreter finalization CPython ends such a thread with
``pthread_exit``, whose unwinding through a ``noexcept`` destructor calls
``std::terminate``: the rank aborts ("terminate called without an active exception",
exit code -6) after it trained correctly.  Freed while the interpreter is alive, the
backend joins its threads and nothing runs during finalization.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gmbench.errors import GmbenchError

log = logging.getLogger("gmbench.run")


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
    # torch.distributed.nn's functions default to ``group=group.WORLD``, evaluated when the
    # module is first imported; DistributedDataParallel imports it lazily.  Imported after
    # init_process_group, those defaults would hold the default group until the interpreter
    # shuts down, so destroy_process_group could not free it (see the module docstring).
    # Imported before, the defaults are None.
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    _current = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
    return _current, rank_device


def destroy_process_group() -> bool:
    """Leave the process group and free its backend now (its threads joined); idempotent.

    Call it once nothing references the group any more: a DDP wrapper (also one kept alive
    by a traceback's frames) holds it.  False, with a warning, when something still does:
    then the backend's threads outlive this call and can abort the process as it exits.
    """
    global _current
    _current = SINGLE_PROCESS
    if not dist.is_initialized():
        return True
    group = dist.group.WORLD
    dist.destroy_process_group()
    # Two references: ``group`` and getrefcount's argument.  More: someone else holds it.
    if sys.getrefcount(group) > 2:
        gc.collect()  # a DDP wrapper in a reference cycle
    if sys.getrefcount(group) > 2:
        log.warning(
            "the process group is still referenced after destroy_process_group; its backend's "
            "threads run until the interpreter exits and can abort this process there"
        )
        return False
    del group  # the last reference: the backend finishes its queued work and joins its threads
    return True
