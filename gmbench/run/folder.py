"""The run folder: the only module that knows its file names and formats.

A run folder holds::

    suite.yaml          the suite file as it was run
    run.json            the resolved suite: every cell's id and configuration
    environment.json    versions, git commit, devices (gmbench.environment)
    loggers.json        the experiment trackers' runs (gmbench.loggers)
    .lock               held by the driver and its workers (gmbench.run.lock)
    cells/<id>/         config.json, epochs.jsonl, checkpoint.pt, metrics.json
                        (+ diagnostics.csv, footprint.json, error.txt)
    results.csv/.parquet  one row per cell (gmbench.run.results)

``run.json`` and ``metrics.json`` carry ``format_version`` (:data:`FORMAT_VERSION`);
files without it were written before it existed (version 1, the same fields) and
are read as they are; a newer version than this gmbench knows is refused in one line.
The readers return the records without the version field.

Every file of a run folder is written atomically, but folders get copied,
synced half-way, edited by hand or filled by a full disk.  Readers here never
give a traceback for such a folder: a damaged file is named in one warning
line that says what happens and what to do, and what can be rebuilt is
rebuilt from the files that remain:

* a damaged or missing ``run.json``: the cells are read from
  ``cells/*/config.json`` (the cell folder's name is the cell id);
* a damaged ``metrics.json``: the cell counts as not finished (status
  ``damaged``): ``gmbench run`` runs it again, resuming from its checkpoint;
* a damaged ``environment.json``: the report leaves the environment out;
  the next ``gmbench run`` rewrites it.

gmbench.run.prepare checks a folder against the suite about to run in it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, TypedDict

from gmbench import io
from gmbench.errors import GmbenchError

log = logging.getLogger("gmbench.run")

CELLS_DIR = "cells"
RUN_FILE = "run.json"
SUITE_FILE = "suite.yaml"
ENVIRONMENT_FILE = "environment.json"
LOCK_FILE = ".lock"
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
LOGGERS_FILE = "loggers.json"  # the experiment trackers' run ids (gmbench.loggers)
# In each cell folder:
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
ERROR_FILE = "error.txt"
DIAGNOSTICS_FILE = "diagnostics.csv"
FOOTPRINT_FILE = "footprint.json"

# run.json and metrics.json: 2 added the field itself; 1 (no field) has the same content.
FORMAT_VERSION = 2
FORMAT_FIELD = "format_version"

# Status of a cell whose metrics.json cannot be read (it is run again).
DAMAGED = "damaged"

_warned: set[str] = set()


class CellConfig(TypedDict, total=False):
    """A resolved cell (``config.json``, and each entry of ``run.json``'s ``cells``).

    The fields every task has; each task adds its own (gmbench.suite's schema)."""

    task: str
    label: str
    seed: int


class CellMetrics(TypedDict, total=False):
    """A cell's ``metrics.json``: these fields for every status, the task's own when ``ok``."""

    cell_id: str
    status: str  # ok, failed, diverged, oom, interrupted (damaged: read back from a broken file)
    error: str  # one line; empty when ok (the traceback is in error.txt)
    wall_time_s: float
    finished_at: str  # UTC, ISO 8601


class EpochRecord(TypedDict, total=False):
    """One line of a training cell's ``epochs.jsonl`` (written by gmbench.training)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    lr: float
    epoch_time_s: float
    samples_per_s: float
    peak_memory_mb: float


class NewerFormat(GmbenchError):
    """A run folder written by a newer gmbench (its format_version is unknown here)."""


def _versioned(record: dict, path: Path) -> dict:
    """``record`` without its format field; refuse a version newer than this gmbench's."""
    version = record.get(FORMAT_FIELD, 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NewerFormat(
            f"{path} has {FORMAT_FIELD} {version!r}, newer than this gmbench reads ({FORMAT_VERSION}); "
            "upgrade gmbench to read this run folder"
        )
    return {key: value for key, value in record.items() if key != FORMAT_FIELD}


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def warn_once(message: str) -> None:
    """Log a warning line once per command (readers run after every finished cell)."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def new_command() -> None:
    """A new run or report starts: its damaged files are named again."""
    _warned.clear()


def _load_json(path: Path) -> tuple[object, str | None]:
    """(value, None) or (None, what is wrong with the file)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except json.JSONDecodeError as error:
        where = "is empty" if not raw.strip() else f"is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}; truncated?)"
        return None, where


def _load_json_object(path: Path) -> tuple[dict | None, str | None]:
    """As :func:`_load_json`, and valid JSON that is not an object is a problem too."""
    value, problem = _load_json(path)
    if problem is None and not isinstance(value, dict):
        return None, f"holds a JSON {type(value).__name__.replace('NoneType', 'null')}, not an object"
    return value, problem


def read_json_object(path: str | os.PathLike, what_to_do: str) -> dict | None:
    """A JSON object file; ``None`` (missing or, with a warning naming it, damaged)."""
    path = Path(path)
    if not path.is_file():
        return None
    value, problem = _load_json_object(path)
    if problem is not None:
        warn_once(f"{path} {problem}; {what_to_do}")
        return None
    return value


# --------------------------------------------------------------------------- cells


def cell_dir(run_dir: str | os.PathLike, cell_id: str) -> Path:
    return Path(run_dir) / CELLS_DIR / cell_id


def read_metrics(run_dir: str | os.PathLike, cell_id: str) -> CellMetrics | None:
    """A cell's metrics; ``None`` if it has none yet; status ``damaged`` if its file is damaged."""
    return read_metrics_file(cell_dir(run_dir, cell_id) / METRICS_FILE)


def write_metrics(folder: str | os.PathLike, metrics: CellMetrics | dict) -> None:
    """Write a cell folder's ``metrics.json`` (NaN/inf as null, with the format version)."""
    io.write_json(Path(folder) / METRICS_FILE, {FORMAT_FIELD: FORMAT_VERSION, **_finite(dict(metrics))})


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def failure(cell_id: str, status: str, error: str, **fields: Any) -> CellMetrics:
    """The metrics of a cell that did not finish: ``status`` (failed, diverged, oom,
    interrupted), a one-line ``error`` and the time; every path that records one builds it here."""
    return {"cell_id": cell_id, "status": status, "error": error.splitlines()[0] if error else "",
            **fields, "finished_at": now_utc()}


def write_failure(folder: str | os.PathLike, status: str, error: str, **fields: Any) -> CellMetrics:
    """Record a cell that did not finish in its ``metrics.json``; return the metrics."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = failure(folder.name, status, error, **fields)
    write_metrics(folder, metrics)
    return metrics


def write_config(folder: str | os.PathLike, config: CellConfig | dict) -> None:
    """Start a cell: its ``config.json``; the previous attempt's ``error.txt`` goes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(folder / CONFIG_FILE, config)
    (folder / ERROR_FILE).unlink(missing_ok=True)


def config_written_at(folder: str | os.PathLike) -> float | None:
    """When the cell's ``config.json`` was written (its last start); ``None`` if never."""
    try:
        return (Path(folder) / CONFIG_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def metrics_written_at(folder: str | os.PathLike) -> float | None:
    """When the cell's ``metrics.json`` was last written; ``None`` if it has none."""
    try:
        return (Path(folder) / METRICS_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def write_error(folder: str | os.PathLike, traceback_text: str) -> None:
    io.write_text(Path(folder) / ERROR_FILE, traceback_text)


def read_epochs(folder: str | os.PathLike) -> list[EpochRecord]:
    """A cell's ``epochs.jsonl`` up to its first incomplete or damaged line (empty if none)."""
    path = Path(folder) / EPOCHS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line still being written (or a damaged one: the checkpoint rewrites the log)
        if not isinstance(record, dict):
            break
        records.append(record)
    return records


def count_epochs(folder: str | os.PathLike) -> int:
    return len(read_epochs(folder))


def read_config(folder: str | os.PathLike, what_to_do: str) -> CellConfig | None:
    return read_json_object(Path(folder) / CONFIG_FILE, what_to_do)


def read_metrics_file(path: str | os.PathLike) -> dict | None:
    """A cell's ``metrics.json``: ``None`` if it does not exist (the cell has not finished).

    A damaged one (not JSON, not an object, no ``status``) reads as status
    ``damaged`` with an ``error`` naming the file, so that a run redoes the cell
    and a report lists it instead of showing it as finished or pending.
    """
    path = Path(path)
    if not path.is_file():
        return None
    value, problem = _load_json_object(path)
    if problem is None and not isinstance(value.get("status"), str):
        problem = "has no 'status' field"
    if problem is None:
        return _versioned(value, path)
    error = f"{path} {problem}"
    warn_once(f"{error}; the cell counts as not finished: 'gmbench run' runs it again (resuming from its checkpoint)")
    return {"cell_id": path.parent.name, "status": DAMAGED, "error": error}


def cells_from_folders(run_dir: str | os.PathLike) -> list[dict]:
    """``[{"id", "config"}]`` of the cell folders that hold a readable ``config.json``."""
    cells = []
    folder = Path(run_dir) / CELLS_DIR
    if not folder.is_dir():
        return cells
    for cell in sorted(folder.iterdir()):
        config = read_config(cell, "that cell is left out; 'gmbench run' writes it again") if cell.is_dir() else None
        if config is not None:
            cells.append({"id": cell.name, "config": config})
    return cells


# --------------------------------------------------------------------------- run.json


def _run_problem(value) -> str | None:
    if not isinstance(value, dict):
        return f"holds a JSON {type(value).__name__}, not an object"
    cells = value.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("config"), dict) for c in cells):
        return "has no valid 'cells' list"
    return None


def read_run_file(run_dir: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(run.json's content, None), or (None, what is wrong) if it is missing or damaged."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None, "is missing"
    value, problem = _load_json(path)
    if problem is None:
        problem = _run_problem(value)
    return (_versioned(value, path), None) if problem is None else (None, problem)


def write_run(run_dir: str | os.PathLike, suite_text: str, run: dict) -> None:
    """``suite.yaml`` (the suite file as it was run) and ``run.json`` (the resolved suite)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir / SUITE_FILE, suite_text)
    io.write_json(run_dir / RUN_FILE, {FORMAT_FIELD: FORMAT_VERSION, **run})


def read_run(run_dir: str | os.PathLike) -> dict | None:
    """The run's description: ``run.json``, or, when it is missing or damaged, one rebuilt
    from the cell folders (with a warning); ``None`` when neither exists."""
    run_dir = Path(run_dir)
    run, problem = read_run_file(run_dir)
    if run is not None:
        return run
    cells = cells_from_folders(run_dir)
    if not cells:
        if problem != "is missing":
            warn_once(f"{run_dir / RUN_FILE} {problem} and there are no cell folders to rebuild it from; run the suite again with --out {run_dir}")
        return None
    warn_once(
        f"{run_dir / RUN_FILE} {problem}; results rebuilt from the {len(cells)} cell folders (default report tables); "
        f"run 'gmbench run SUITE --out {run_dir}' to restore it"
    )
    return {"name": run_dir.name, "cells": cells, "report": {}, "rebuilt": True}


def read_environment(run_dir: str | os.PathLike) -> dict:
    """``environment.json`` (empty if missing or damaged, with a warning for the latter)."""
    return read_json_object(
        Path(run_dir) / ENVIRONMENT_FILE, "the report leaves the environment out; the next 'gmbench run' rewrites it"
    ) or {}


# --------------------------------------------------------------------------- temporary files

# gmbench.io.atomic_path's temporary files: ".<name>.<random>.tmp".
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temp_files(run_dir: str | os.PathLike, older_than: float) -> int:
    """Delete the atomic-write temporary files a killed run left in the run folder and its
    cell folders (only those last written before ``older_than``); return how many.

    Call it holding the run lock: every process of an earlier run has exited then
    (they hold the lock while they live), so no such file is still being written.
    """
    run_dir = Path(run_dir)
    folders = [run_dir] + ([p for p in (run_dir / CELLS_DIR).iterdir() if p.is_dir()] if (run_dir / CELLS_DIR).is_dir() else [])
    removed, size = 0, 0
    for folder in folders:
        for path in folder.iterdir():
            if not _TEMP_NAME.match(path.name) or not path.is_file():
                continue
            try:
                stat = path.stat()
                if stat.st_mtime >= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            size += stat.st_size
    if removed:
        log.info("removed %d temporary file(s) (%.1f MB) that an interrupted run left in %s", removed, size / 1e6, run_dir)
    return removed
