"""The results store: one row per cell in ``results.csv`` and ``results.parquet``.

The rows are rebuilt from the run folder (``run.json`` plus every cell's
``metrics.json``) whenever a cell finishes, so the files are always complete
for the cells run so far; cells not run yet have status ``pending``.  Every
number in a report comes from these files.  A damaged ``run.json`` is rebuilt
from the cell folders (:func:`gmbench.run.folder.read_run`); a damaged
``metrics.json`` gives its cell the status ``damaged``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gmbench import io
from gmbench.errors import GmbenchError
from gmbench.run.folder import RESULTS_CSV, RESULTS_PARQUET, RUN_FILE, cell_dir, count_epochs, read_metrics, read_run
from gmbench.tasks import task_for

# The columns every results file has, in this order; task-specific
# metrics (time_ms, rmse, memory_mb, ...) follow them.
COLUMNS = [
    "suite", "cell_id", "task", "label", "dataset", "model", "input", "transfer_fitting", "reduction",
    "input_fitting", "n_gaussians", "n_points", "layout", "seed", "epochs", "test_accuracy",
    "best_test_accuracy", "smoothed_test_accuracy", "train_time_s", "samples_per_s", "peak_memory_mb", "params", "status", "error",
]
# Columns that differ between two runs of the same cells on the same machine (wall-clock
# times, throughput, peak memory); every other value is reproduced exactly on CPU
# (docs/reports.md, "Determinism").
VARYING_COLUMNS = ("train_time_s", "samples_per_s", "peak_memory_mb", "input_time_s", "wall_time_s", "time_ms", "time_ms_min")
# Configuration fields copied from the cell (metrics override them where the cell resolved more).
_CONFIG_COLUMNS = ("task", "label", "dataset", "model", "input", "input_fitting", "n_gaussians", "n_points", "seed", "transfer_fitting", "layout", "batch", "kernel_gaussians", "integrated", "dims", "n_mixtures")
_SKIP_METRICS = ("cell_id", "finished_at")
_INTEGER_COLUMNS = ("n_gaussians", "n_points", "seed", "epochs", "params", "batch_size", "n_train", "n_test", "num_classes", "dims")


def collect(run_dir: str | Path, run: dict | None = None) -> pd.DataFrame:
    """The results table of a run folder (reads run.json and the cells' metrics.json).

    ``run``: the run's description as :func:`gmbench.run.folder.read_run` returns it
    (read here when not given).
    """
    run_dir = Path(run_dir)
    if run is None:
        run = read_run(run_dir)
    if run is None:
        raise GmbenchError(f"'{run_dir}' holds neither a readable run.json nor cell folders; pass the --out folder of 'gmbench run'")
    rows = []
    for cell in run["cells"]:
        config = cell["config"]
        task = task_for(config)
        row: dict = {"suite": run["name"], "cell_id": cell["id"]}
        for key in _CONFIG_COLUMNS:
            if key in config:
                row[key] = config[key]
        row.update(task.result_fields(config))
        metrics = read_metrics(run_dir, cell["id"])
        if metrics is None:
            row["status"] = "pending"
            row["error"] = ""
        else:
            for key, value in metrics.items():
                if key in _SKIP_METRICS or isinstance(value, (dict, list)):
                    continue
                if value is None and row.get(key) is not None:
                    continue
                row[key] = value
        if metrics is not None and metrics.get("status") != "ok" and task.epochs_field is not None:
            # A failed or diverged cell: the epochs it finished, not the ones it was given.
            row["epochs"] = count_epochs(cell_dir(run_dir, cell["id"]))
        if not row.get("label"):
            row["label"] = task.label(config)
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    for column in _INTEGER_COLUMNS:  # nullable integers: 48, not 48.0, next to empty cells
        if column in frame.columns:
            numbers = pd.to_numeric(frame[column], errors="coerce")
            if (numbers.dropna() % 1 == 0).all():
                frame[column] = numbers.astype("Int64")
    extra = [column for column in frame.columns if column not in COLUMNS]
    return frame[COLUMNS + extra]


def write_results(run_dir: str | Path) -> pd.DataFrame:
    """Rebuild ``results.csv`` and ``results.parquet`` atomically; return the table."""
    run_dir = Path(run_dir)
    frame = collect(run_dir)
    with io.atomic_path(run_dir / RESULTS_CSV) as tmp:
        frame.to_csv(tmp, index=False)
    with io.atomic_path(run_dir / RESULTS_PARQUET) as tmp:
        _parquet_safe(frame).to_parquet(tmp, index=False)
    return frame


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns that mix types (e.g. a string and None) become strings for Arrow."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            values = frame[column].dropna()
            if not values.map(type).eq(str).all() and not values.empty:
                frame[column] = frame[column].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    return frame


# The columns a results.csv read on its own (no run.json, no cell folders) must have.
REQUIRED_COLUMNS = ("cell_id", "status")


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """The results of a run folder: rebuilt from run.json and the cells where they exist
    (a damaged run.json from the cells alone), else read from ``results.csv``."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run is not None:
        return collect(run_dir, run)
    return read_results_csv(run_dir)


def read_results_csv(run_dir: str | Path) -> pd.DataFrame:
    """``results.csv`` of a folder without run.json and cell folders (e.g. one copied alone)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_CSV
    if not path.is_file():
        raise GmbenchError(f"'{run_dir}' is not a gmbench run folder (no {RUN_FILE} or {RESULTS_CSV}); pass the --out folder of 'gmbench run'")
    cannot = "and there are no run.json or cell folders to rebuild it from; copy the whole run folder, or run the suite again"
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GmbenchError(f"{path} cannot be read as CSV ({type(error).__name__}: {reason}) {cannot}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise GmbenchError(
            f"{path} has no {', '.join(repr(c) for c in missing)} column (columns: {', '.join(map(str, frame.columns[:8]))}"
            f"{', ...' if len(frame.columns) > 8 else ''}); it is not a gmbench results file {cannot}"
        )
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    return frame
