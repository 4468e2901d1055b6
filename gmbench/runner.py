"""Running suites: one cell at a time (:func:`run_cell`) and whole suites (:func:`run_suite`).

A run folder holds::

    suite.yaml          the suite file as it was run
    run.json            the resolved suite: every cell's id and configuration
    environment.json    versions, git commit, devices (gmbench.environment)
    cells/<id>/         config.json, epochs.jsonl, checkpoint.pt, metrics.json
                        (+ diagnostics.csv, footprint.json, error.txt)
    results.csv/.parquet  one row per cell (gmbench.results)

:func:`run_cell` is self-contained and picklable (a module-level function of
plain data), so any executor -- in-process, worker processes, Ray -- can call
it; it never raises for a failing experiment but records the failure in
``metrics.json``.  Re-running :func:`run_suite` on the same folder skips the
cells whose ``metrics.json`` says ``ok``, re-runs failed ones, and lets
interrupted ones resume from their checkpoint (the trainer does that).

:func:`run_suite` takes the run folder's lock (:mod:`gmbench.run_lock`, held by
the driver and its workers) before it writes anything there; a damaged run
folder is read as :mod:`gmbench.run_folder` describes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from gmbench import io
from gmbench.run_folder import CELLS_DIR, CONFIG_FILE, METRICS_FILE, RUN_FILE, SUITE_FILE, SuiteChanged, prepare_run_dir  # noqa: F401 - their home before run_folder
from gmbench.run_lock import LOCK_FILE, run_lock  # noqa: F401 - likewise

log = logging.getLogger("gmbench.run")

ERROR_FILE = "error.txt"
DIAGNOSTICS_FILE = "diagnostics.csv"

# Subsets for train_samples/test_samples are drawn with this fixed seed, so every
# cell of a suite (whatever its training seed) sees the same samples.
SUBSET_SEED = 0


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
    nproc_per_node: int = 1  # data-parallel processes per training cell (gmbench.distributed)
    loggers: tuple | None = None  # gmbench.loggers.LoggerChoice, each cell's experiment trackers; None: the suite's


# --------------------------------------------------------------------------- one cell


def run_cell(cell_config: dict, cell_dir: str | Path, options: RunOptions, on_epoch: Callable[[dict], Any] | None = None) -> dict:
    """Run one cell and write ``metrics.json``; return the metrics.

    ``cell_config`` is a resolved cell (``Suite.cells[i].config``); the result
    has ``status`` ``ok``, ``failed``, ``diverged`` or ``oom`` and, unless ok,
    ``error`` (one line; the traceback goes to ``error.txt``).
    """
    cell_dir = Path(cell_dir)
    if options.nproc_per_node > 1 and cell_config.get("task") == "train":
        from gmbench.distributed import run_cell_on_ranks

        # Each rank calls run_cell again (with nproc_per_node=1); rank 0 writes the cell folder.
        return run_cell_on_ranks(cell_config, cell_dir, options, options.nproc_per_node, on_epoch)
    cell_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(cell_dir / CONFIG_FILE, cell_config)
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    metrics: dict[str, Any] = {"cell_id": cell_dir.name}
    from gmbench.loggers import CellLoggers

    tracking = CellLoggers(options.loggers or (), cell_config, cell_dir)
    try:
        from gmbench.cell_environment import cell_environment

        # The same set-up as every data-parallel rank (gmbench.distributed).
        with cell_environment(options, seed=cell_config.get("seed")):
            task = TASKS[cell_config["task"]]
            metrics.update(task(cell_config, cell_dir, options, tracking.epoch_callback(on_epoch)))
        metrics["status"] = "ok"
        metrics["error"] = ""
    except Exception as error:  # noqa: BLE001 - a failing cell is a result, not a crash
        metrics["status"] = _failure_status(error)
        metrics["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        io.write_text(cell_dir / ERROR_FILE, traceback.format_exc())
    metrics["wall_time_s"] = time.perf_counter() - started
    metrics["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    io.write_json(cell_dir / METRICS_FILE, _finite(metrics))
    tracking.end(metrics)
    return metrics


def _failure_status(error: BaseException) -> str:
    from gmbench.training import TrainingDiverged

    if isinstance(error, TrainingDiverged):
        return "diverged"
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(error).lower():
        return "oom"
    return "failed"


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _subset(split, limit: int | None):
    if limit is None or limit >= len(split):
        return split
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    index = torch.randperm(len(split), generator=generator)[:limit].sort().values
    subset = split.subset(index)
    # The fitted-mixture cache keys on the split's name: a subset is another split.
    subset.split = f"{split.split}-first{limit}-seed{SUBSET_SEED}"
    return subset


def _plugin_choice(model_info, params: dict, kind: str) -> str | None:
    """``treehem(T=2)``: a nested plugin choice of a model with its parameters, for results."""
    accepted = {p.name: p for p in model_info.parameters}
    if kind not in accepted:
        return None
    name = params.get(kind, accepted[kind].default)
    if not isinstance(name, str):
        return None
    nested = params.get(f"{kind}_params") or {}
    if nested:
        return f"{name}(" + ",".join(f"{key}={value}" for key, value in sorted(nested.items())) + ")"
    return name


def check_data(cells, options: RunOptions) -> None:
    """Fail before any cell runs when a data set's local files are missing.

    Calls each distinct data set's optional ``check()``; its
    :class:`~gmbench.errors.DataError` is a one-line user error (exit 2), not
    one failed cell per data set.
    """
    from gmbench import plugins

    seen = set()
    for cell in cells:
        config = cell.config
        if config.get("task") != "train":
            continue
        params = dict(config["dataset_params"])
        if options.data_root is not None:
            params["data_root"] = options.data_root
        key = (config["dataset"], json.dumps(params, sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        dataset = plugins.create("dataset", config["dataset"], **params)
        check = getattr(dataset, "check", None)
        if check is not None:
            check()


def _train_task(config: dict, cell_dir: Path, options: RunOptions, on_epoch) -> dict:
    from gmbench import plugins
    from gmbench.metrics import accuracy_summary
    from gmbench.suite import substitute_placeholders
    from gmbench.training import TrainConfig, train

    dataset_params = dict(config["dataset_params"])
    if options.data_root is not None:
        dataset_params["data_root"] = options.data_root
    dataset = plugins.create("dataset", config["dataset"], **dataset_params)
    train_split = _subset(dataset.load("train"), config["train_samples"])
    test_split = _subset(dataset.load("test"), config["test_samples"])
    num_classes, dims = train_split.num_classes, train_split.dims

    model_info = plugins.get("model", config["model"])
    model_params = substitute_placeholders(config["model_params"], num_classes=num_classes)
    takes_points = "in_features" in {p.name for p in model_info.parameters}
    n_gaussians = config["n_gaussians"]
    metrics: dict[str, Any] = {
        "num_classes": num_classes, "dims": dims, "n_train": len(train_split), "n_test": len(test_split),
        "layout": model_params.get("layout"), "n_points": None,
        "transfer_fitting": _plugin_choice(model_info, model_params, "transfer_fitting"),
        "reduction": _plugin_choice(model_info, model_params, "reduction"),
    }

    fit_started = time.perf_counter()
    if config["input"] == "points":
        from gmbench.baselines.inputs import matching_point_count, sample_points

        n_points = config["n_points"] or matching_point_count(n_gaussians, dims)
        train_x = sample_points(train_split, n_points, seed=config["seed"])
        test_x = sample_points(test_split, n_points, seed=config["seed"] + 1_000_003)
        metrics["n_points"] = n_points
        model_params["in_features"] = 0
    else:
        from gmbench.cache import fit_cached

        fit = dict(method=config["input_fitting"], n_components=n_gaussians, params=config["input_fitting_params"], cache_dir=options.cache_dir, progress=options.progress)
        train_x = fit_cached(train_split, **fit)
        test_x = fit_cached(test_split, **fit)
        if takes_points:
            from gmbench.baselines.inputs import mixture_point_features

            train_x = mixture_point_features(train_x)
            test_x = mixture_point_features(test_x)
            model_params["in_features"] = int(train_x.shape[-1]) - dims
            metrics["n_points"] = int(train_x.shape[1])
    metrics["input_time_s"] = time.perf_counter() - fit_started

    torch.manual_seed(config["seed"])  # model initialisation depends on the cell seed only
    model = plugins.create("model", config["model"], num_classes=num_classes, dims=dims, **model_params)
    train_config = TrainConfig(**config["training"], seed=config["seed"], device=options.device, progress=options.progress)
    result = train(
        model, train_x, train_split.labels, test_x, test_split.labels, train_config,
        run_dir=cell_dir, on_epoch=on_epoch,
    )
    metrics.update(
        test_accuracy=result.test_accuracy, best_test_accuracy=result.best_test_accuracy,
        train_time_s=result.train_time_s, samples_per_s=result.samples_per_s,
        peak_memory_mb=result.peak_memory_mb, params=result.params, epochs=result.epochs_completed,
    )
    # The paper's accuracies are TensorBoard-smoothed (Appendix F); Table 8 also counts kernels.
    metrics.update(accuracy_summary([record["test_accuracy"] for record in result.history]))
    if callable(getattr(model, "kernel_count", None)):
        metrics["kernels"] = model.kernel_count()
    if config["diagnostics"]:
        metrics.update(_diagnostics(model, test_x[: config["diagnostics_samples"]], cell_dir, config))
    return metrics


def _diagnostics(model, x, cell_dir: Path, config: dict) -> dict:
    """Per-layer fitting errors (Tables 10-11) of the trained model on the first test samples."""
    from gmbench.diagnostics import fitting_diagnostics

    frame = fitting_diagnostics(model, x, n_samples=config["diagnostics_points"], seed=config["seed"])
    with io.atomic_path(cell_dir / DIAGNOSTICS_FILE) as tmp:
        frame.to_csv(tmp, index=False)
    summary = {}
    for _, row in frame.iterrows():
        summary[f"rmse_{row['metric']}_{row['layer']}"] = float(row["value"])
    return summary


def _footprint_task(config: dict, cell_dir: Path, options: RunOptions, on_epoch) -> dict:
    """Tables 5-6: the theoretical memory footprint of a layout (no training)."""
    from gmbench.footprint import footprint

    result = footprint(config["layout"], batch=config["batch"], kernel_gaussians=config["kernel_gaussians"], integrated=config["integrated"])
    rows = [dataclasses.asdict(row) | {"M_2D": row.mebibytes(2), "M_3D": row.mebibytes(3)} for row in result.rows]
    io.write_json(cell_dir / "footprint.json", rows)
    return {
        "layout": config["layout"],
        "total_gaussians": result.total_G,
        "kernel_gaussians_total": result.total_K,
        "data_gaussians_total": result.total_D,
        "memory_mb": result.total_mebibytes(config["dims"]),
        "params": result.parameters(config["dims"]),
    }


def random_test_mixtures(n_mixtures: int, n_gaussians: int, dims: int, seed: int) -> torch.Tensor:
    """Mixtures ``[n_mixtures, 1, n_gaussians, 1+D+D*D]`` like a convolution's output:
    weights ~ U(-1, 1), centres ~ U(-3, 3)^D, covariances ``A A^T + 0.05 I`` with
    ``A ~ N(0, 0.5^2)`` (so half the mass is negative and the ReLU matters)."""
    from gmbench import mixture

    generator = torch.Generator().manual_seed(seed)
    shape = (n_mixtures, 1, n_gaussians)
    weights = torch.rand(shape, generator=generator) * 2 - 1
    positions = torch.rand((*shape, dims), generator=generator) * 6 - 3
    factor = torch.randn((*shape, dims, dims), generator=generator) * 0.5
    covariances = factor @ factor.transpose(-1, -2) + 0.05 * torch.eye(dims)
    return mixture.pack(weights, positions, covariances)


# RMSE of the transfer fitting: on the first RMSE_MIXTURES mixtures only (it is
# O(mixtures x samples x N) and the timing, not the error, is Table 7's subject).
RMSE_MIXTURES = 32


def _transfer_fitting_timing_task(config: dict, cell_dir: Path, options: RunOptions, on_epoch) -> dict:
    """Table 7: time (and error) of one transfer-fitting method on random mixtures."""
    from gmbench import mixture, plugins
    from gmbench.training import peak_memory_mb

    device = torch.device(options.device)
    m = random_test_mixtures(config["n_mixtures"], config["n_gaussians"], config["dims"], config["seed"]).to(device)
    method = plugins.create("transfer_fitting", config["transfer_fitting"], **config["transfer_fitting_params"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        method.fit(m[:2])  # warm-up (lazy initialisation, kernel compilation)
        times = []
        for _ in range(config["repeats"]):
            _synchronize(device)
            started = time.perf_counter()
            fitted = method.fit(m)
            _synchronize(device)
            times.append(time.perf_counter() - started)
        subset, fitted_subset = m[:RMSE_MIXTURES], fitted[:RMSE_MIXTURES]
        generator = torch.Generator().manual_seed(config["seed"])
        # Sample positions uniformly in the box around all centres (plus 3 standard deviations).
        low, high = -3.0 - 3 * 1.0, 3.0 + 3 * 1.0
        points = (torch.rand((config["rmse_samples"], config["dims"]), generator=generator) * (high - low) + low).to(device)
        target = torch.relu(mixture.evaluate(subset, points))
        error = mixture.evaluate(fitted_subset, points) - target
        rmse = float(error.pow(2).mean().sqrt())
    times.sort()
    return {
        "time_ms": 1000 * times[len(times) // 2],
        "time_ms_min": 1000 * times[0],
        "rmse": rmse,
        "peak_memory_mb": peak_memory_mb(device),
        "n_gaussians": config["n_gaussians"],
        "transfer_fitting": config["transfer_fitting"] + (
            "(" + ",".join(f"{k}={v}" for k, v in sorted(config["transfer_fitting_params"].items())) + ")"
            if config["transfer_fitting_params"] else ""
        ),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TASKS: dict[str, Callable[..., dict]] = {
    "train": _train_task,
    "footprint": _footprint_task,
    "transfer_fitting_timing": _transfer_fitting_timing_task,
}


# --------------------------------------------------------------------------- whole suites


@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    total: int
    skipped: int
    ran: int
    failed: list[str]
    wall_time_s: float


def cell_dir(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / CELLS_DIR / cell_id


def read_metrics(run_dir: Path, cell_id: str) -> dict | None:
    """A cell's metrics; ``None`` if it has none yet; status ``damaged`` if its file is damaged."""
    from gmbench.run_folder import read_metrics_file

    return read_metrics_file(cell_dir(run_dir, cell_id) / METRICS_FILE)


def run_suite(suite, run_dir: str | Path, options: RunOptions, executor=None, update: bool = False, progress: bool = True) -> RunSummary:
    """Run every cell of ``suite`` that is not finished yet; write results as cells finish.

    ``SIGTERM`` stops the run like Ctrl-C (``KeyboardInterrupt``): the cells in flight are
    recorded as ``interrupted`` and resume from their checkpoints on the next run.
    """
    from gmbench.executors.lifetime import stop_on_sigterm
    from gmbench.run_folder import check_run_dir, new_command, remove_stale_temp_files

    run_dir = Path(run_dir)
    started = time.perf_counter()
    new_command()
    check_run_dir(suite, run_dir, update=update)  # refuse a wrong folder before creating anything
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) as lock, stop_on_sigterm():
        prepare_run_dir(suite, run_dir, update=update)
        remove_stale_temp_files(run_dir, older_than=lock.acquired_at)
        return _run_locked(suite, run_dir, options, executor, progress, started)


def _run_locked(suite, run_dir: Path, options: RunOptions, executor, progress: bool, started: float) -> RunSummary:
    from gmbench import environment, results
    from gmbench.executors import LocalExecutor
    from gmbench.run_progress import RunProgress

    environment.write_environment(
        run_dir / environment.ENVIRONMENT_FILE, device=options.device, backend=options.backend or suite.backend,
        data_root=options.data_root,
    )
    if options.backend is None and suite.backend:
        options = dataclasses.replace(options, backend=suite.backend)
    options = dataclasses.replace(options, plugins=tuple(suite.plugins), backend_params=suite.backend_params or None)
    from gmbench import loggers

    options = dataclasses.replace(options, loggers=loggers.choose(suite.loggers) if options.loggers is None else options.loggers)
    loggers.prepare_run(options.loggers, run_dir)  # checks each tracking store before any cell starts

    todo, skipped = [], 0
    for cell in suite.cells:
        previous = read_metrics(run_dir, cell.id)
        if previous is not None and previous.get("status") == "ok":
            skipped += 1
        else:
            todo.append(cell)
    check_data(todo, options)
    if skipped:
        log.info("%d of %d cells already finished in %s; running the other %d", skipped, len(suite.cells), run_dir, len(todo))
    results.write_results(run_dir)

    executor = executor or LocalExecutor(jobs=1)
    tracker = RunProgress(todo, run_dir, enabled=progress)
    failed: list[str] = []

    def on_done(cell, metrics: dict) -> None:
        tracker.cell_finished(cell, metrics)
        if metrics.get("status") != "ok":
            failed.append(cell.id)
        results.write_results(run_dir)

    try:
        executor.run(todo, run_dir, options, on_start=tracker.cell_started, on_epoch=tracker.epoch, on_done=on_done, poll=tracker.poll)
    finally:
        tracker.close()
        results.write_results(run_dir)
    return RunSummary(run_dir, len(suite.cells), skipped, len(todo), failed, time.perf_counter() - started)
