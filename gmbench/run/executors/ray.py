"""The Ray executor: every cell is one Ray task, scheduled by its resource needs.

``gmbench run SUITE --executor ray [--address ADDR]``.  Without an address a
local Ray instance is started for the run (and shut down after it) with
``jobs x cpus_per_cell`` CPUs; with one (``auto``, ``ray://host:10001``,
``host:6379``) the cells go to that cluster.  ``--jobs`` is the number of cells
in flight at once, as for the local executor; Ray places them where their
resources (``num_cpus``, ``num_gpus``, ``memory``) are free.

Where results live.  Workers run :func:`gmbench.run.launcher.launch_cell`, which writes
the cell folder (``config.json``, ``epochs.jsonl``, ``checkpoint.pt``,
``metrics.json``) directly into the run folder, so the run folder must be on
storage that the driver and every worker node see under the same path (NFS,
Lustre, a bind mount).  The worker also returns the metrics to the driver; the
driver alone writes ``results.csv``/``.parquet`` (and ``metrics.json`` for a
cell whose worker died), so the results store is never written concurrently.
A probe task checks at start that the run folder is visible to a worker.

Fault tolerance.  A worker process or node that dies mid-cell (killed, OOM
killer, pre-empted node) is a *system* failure: Ray re-runs the task up to
``max_retries`` times, and the re-run resumes from the cell's checkpoint (the
trainer reads ``checkpoint.pt``), so at most the epoch in flight is lost.
An exception inside a cell is an experiment result, not a system failure:
``run_cell`` records it in ``metrics.json`` and it is not retried.  A cell whose
retries are used up is recorded as ``failed`` (``oom`` when Ray's memory
monitor killed it) and the other cells go on.  Restarting the driver resumes
the run (the runner skips cells whose ``metrics.json`` says ``ok``); on an
interrupt (Ctrl-C, ``SIGTERM``) the driver cancels the tasks it submitted so
that no stale worker keeps writing into the folder, and records the cells in
flight as ``interrupted`` (resumed from their checkpoints by the next run).
When the driver is killed outright, Ray ends the job's tasks itself.

Nondeterminism.  Each cell runs the same code with the same seeds as with the
local executor; on CPU, with the same number of intra-op threads, the metrics
are identical.  Wall times, ``samples_per_s`` and ``peak_memory_mb`` (a worker
process's peak RSS includes what earlier cells in the same reused worker
allocated) differ, and GPU kernels may differ in the last bits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch

from gmbench.errors import GmbenchError
from gmbench.run.lifetime import record_interrupted
from gmbench.run.executors.local import _started_since
from gmbench.run.folder import cell_dir, read_metrics, write_failure
from gmbench.run.launcher import launch_cell

log = logging.getLogger("gmbench.run")

# The results are small dicts: a local instance needs no large object store
# (Ray's default takes 30 % of RAM as shared memory).
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# How often the driver wakes to detect started cells and read epochs (seconds).
POLL_S = 1.0


def ray_unavailable_reason() -> str | None:
    """Why ``import ray`` fails here, or ``None`` when it works."""
    try:
        import ray  # noqa: F401
    except ImportError as error:
        return f"ray is not installed ({error}); install it with: pip install 'gmbench[ray]'"
    return None


@dataclasses.dataclass(frozen=True)
class CellResources:
    """What one cell asks Ray for; ``memory_gb`` is a scheduling reservation, not a limit."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None

    def ray_options(self) -> dict:
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb:
            options["memory"] = int(self.memory_gb * 2**30)
        return options


def start_local_ray(num_cpus: int, **init_options) -> None:
    """Start a Ray instance on this machine with ``num_cpus`` CPUs and the GPUs Ray finds.

    Its workers get the driver's ``sys.path``, as spawned worker processes do, so
    that plugin modules importable here (a suite's ``plugins:``) import there too.
    """
    import ray

    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}},
        **{"log_to_driver": True, **init_options},
    )


class RayExecutor:
    """Run each cell as a Ray task with ``resources``; at most ``jobs`` cells in flight.

    ``address``: a Ray cluster (``None``: start a local instance for this run).
    ``cpus_per_cell`` / ``gpus_per_cell`` / ``memory_gb_per_cell``: the task's
    resource request (``gpus_per_cell=None``: one GPU per process when the run's
    device is CUDA, else none).  A cell trained on ``nproc_per_node`` processes
    (``RunOptions.nproc_per_node``) asks for that many times the CPUs and GPUs.
    ``max_retries``: re-runs of a cell after its worker died.
    """

    name = "ray"

    def __init__(
        self,
        jobs: int = 1,
        address: str | None = None,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float | None = None,
        memory_gb_per_cell: float | None = None,
        max_retries: int = 3,
    ):
        if jobs < 1:
            raise GmbenchError(f"--jobs must be >= 1, got {jobs}")
        if cpus_per_cell <= 0:
            raise GmbenchError(f"--cpus-per-cell must be positive, got {cpus_per_cell}")
        if gpus_per_cell is not None and gpus_per_cell < 0:
            raise GmbenchError(f"--gpus-per-cell must be >= 0, got {gpus_per_cell}")
        if memory_gb_per_cell is not None and memory_gb_per_cell <= 0:
            raise GmbenchError(f"--memory-per-cell must be positive (GiB), got {memory_gb_per_cell}")
        if max_retries < 0:
            raise GmbenchError(f"--max-retries must be >= 0, got {max_retries}")
        reason = ray_unavailable_reason()
        if reason is not None:
            raise GmbenchError(f"--executor ray: {reason}")
        self.jobs = jobs
        self.address = address
        self.cpus_per_cell = float(cpus_per_cell)
        self.gpus_per_cell = gpus_per_cell
        self.memory_gb_per_cell = memory_gb_per_cell
        self.max_retries = max_retries

    def resources(self, options) -> CellResources:
        """The request of one cell under ``options`` (device, processes per cell)."""
        processes = max(1, options.nproc_per_node)
        gpus = self.gpus_per_cell
        if gpus is None:
            gpus = 1.0 if str(options.device).startswith("cuda") else 0.0
        return CellResources(cpus=self.cpus_per_cell * processes, gpus=gpus * processes, memory_gb=self.memory_gb_per_cell)

    # ----------------------------------------------------------------- the run

    def run(self, cells, run_dir, options, on_start, on_epoch, on_done, poll=None) -> None:
        import ray

        cells = list(cells)
        if not cells:
            return
        run_dir = Path(run_dir).resolve()
        resources = self.resources(options)
        started_here = self._connect(resources)
        try:
            _check_shared_folder(run_dir)
            self._schedule(cells, run_dir, options, resources, on_start, on_done, poll)
        finally:
            if started_here:
                ray.shutdown()

    def _connect(self, resources: CellResources) -> bool:
        """Join the cluster (or start a local instance); True if this call started Ray."""
        import ray

        if ray.is_initialized():
            return False
        if self.address:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise GmbenchError(
                    f"cannot connect to the Ray cluster at --address {self.address} ({error}); "
                    "check the address printed by 'ray start --head' or omit --address for a local instance"
                ) from None
            return True
        start_local_ray(num_cpus=max(1, int(round(self.jobs * resources.cpus))))
        return True

    def _schedule(self, cells, run_dir: Path, options, resources: CellResources, on_start, on_done, poll) -> None:
        import ray

        # The task's intra-op threads; a data-parallel cell divides them among its ranks.
        threads = max(1, int(resources.cpus))
        task = ray.remote(_run_cell_task).options(
            **resources.ray_options(), max_retries=self.max_retries, retry_exceptions=False, name="gmbench-cell"
        )
        queue = list(cells)
        in_flight: dict = {}  # ObjectRef -> (cell, submitted at)
        started: set[str] = set()
        counts = _Counts(total=len(cells))
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.jobs:
                    cell = queue.pop(0)
                    folder = cell_dir(run_dir, cell.id)
                    in_flight[task.remote(cell.config, str(folder), options, threads)] = (cell, time.time())
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
                for cell, submitted in in_flight.values():
                    if cell.id not in started and _started_since(cell_dir(run_dir, cell.id), submitted):
                        started.add(cell.id)
                        on_start(cell)
                for ref in ready:
                    cell, _ = in_flight.pop(ref)
                    metrics = _collect(ref, cell_dir(run_dir, cell.id), self.max_retries)
                    if cell.id not in started:
                        started.add(cell.id)
                        on_start(cell)
                    on_done(cell, metrics)
                    counts.finished(metrics.get("status") == "ok")
                counts.report(running=len(started & {c.id for c, _ in in_flight.values()}), queued=len(queue) + len(in_flight))
                if poll is not None:
                    poll()
        except BaseException as stop:
            # Interrupted (Ctrl-C, SIGTERM) or crashed: stop the cells we started so that a
            # restarted driver does not race stale workers for the same cell folders.
            for ref in in_flight:
                ray.cancel(ref, force=True)
            if isinstance(stop, (KeyboardInterrupt, SystemExit)):
                for cell, submitted in in_flight.values():
                    if cell.id in started:
                        on_done(cell, record_interrupted(cell_dir(run_dir, cell.id), stop, since=submitted))
            raise


@dataclasses.dataclass
class _Counts:
    """Cells done / running / failed, logged on the driver whenever they change."""

    total: int
    done: int = 0
    failed: int = 0
    last: tuple = ()

    def finished(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1

    def report(self, running: int, queued: int) -> None:
        state = (self.done, self.failed, running)
        if state != self.last:
            self.last = state
            log.info(
                "ray: %d/%d cells done (%d failed), %d running, %d waiting",
                self.done, self.total, self.failed, running, max(queued - running, 0),
            )


def _run_cell_task(cell_config: dict, folder: str, options, threads: int) -> dict:
    """The Ray task: :func:`gmbench.run.launcher.launch_cell` with the worker's thread count and GPU."""
    torch.set_num_threads(threads)
    if str(options.device).startswith("cuda:"):
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned: they are cuda:0...
        options = dataclasses.replace(options, device="cuda")
    return launch_cell(cell_config, folder, options)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (``ray.init`` would wait for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise GmbenchError(
            f"cannot reach the Ray cluster at --address {address} ({error.strerror or error}); "
            "check the address printed by 'ray start --head' (and that its port is open) or omit --address"
        ) from None


def _probe_folder(run_dir: str) -> tuple[str, bool]:
    return socket.gethostname(), Path(run_dir).is_dir()


def _check_shared_folder(run_dir: Path) -> None:
    """Fail early when a worker cannot see the run folder (it must be shared storage)."""
    import ray

    host, visible = ray.get(ray.remote(_probe_folder).options(num_cpus=0).remote(str(run_dir)))
    if not visible:
        raise GmbenchError(
            f"run folder '{run_dir}' does not exist on Ray worker node '{host}'; with --executor ray the "
            "run folder (--out) must be on storage shared by all nodes under the same path"
        )


def _collect(ref, folder: Path, max_retries: int) -> dict:
    """The cell's metrics; a task Ray gave up on is recorded as failed (or oom) here."""
    import ray
    import ray.exceptions

    try:
        return ray.get(ref)
    except ray.exceptions.OutOfMemoryError as error:
        status, reason = "oom", f"Ray's memory monitor killed the worker running this cell ({_first_line(error)})"
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as error:
        status = "failed"
        reason = f"the Ray worker running this cell died {max_retries + 1} time(s) ({type(error).__name__}); see the Ray logs"
    except ray.exceptions.TaskCancelledError:
        status, reason = "failed", "the Ray task running this cell was cancelled"
    except ray.exceptions.RayError as error:
        status, reason = "failed", f"{type(error).__name__}: {_first_line(error)}"
    # The worker may have finished and written its metrics before the result was lost.
    # (A cell with an ok metrics.json is never submitted, so an ok one is from this run.)
    written = read_metrics(folder.parent.parent, folder.name)
    if written is not None and written.get("status") == "ok":
        return written
    return write_failure(folder, status, reason)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
