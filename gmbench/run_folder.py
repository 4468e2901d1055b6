"""Reading a run folder that may be damaged, and preparing it for a run.

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

:func:`prepare_run_dir` checks a folder against the suite about to run in it
and, under the run lock, writes ``suite.yaml`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from gmbench import io
from gmbench.errors import GmbenchError

log = logging.getLogger("gmbench.run")

CELLS_DIR = "cells"
RUN_FILE = "run.json"
SUITE_FILE = "suite.yaml"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"

# Status of a cell whose metrics.json cannot be read (it is run again).
DAMAGED = "damaged"

_warned: set[str] = set()


class SuiteChanged(GmbenchError):
    """The run folder was started from a different suite (or different --smoke)."""


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


def read_json_object(path: str | os.PathLike, what_to_do: str) -> dict | None:
    """A JSON object file; ``None`` (missing or, with a warning naming it, damaged)."""
    path = Path(path)
    if not path.is_file():
        return None
    value, problem = _load_json(path)
    if problem is None and not isinstance(value, dict):
        problem = f"holds a JSON {type(value).__name__.replace('NoneType', 'null')}, not an object"
    if problem is not None:
        warn_once(f"{path} {problem}; {what_to_do}")
        return None
    return value


# --------------------------------------------------------------------------- cells


def read_metrics_file(path: str | os.PathLike) -> dict | None:
    """A cell's ``metrics.json``: ``None`` if it does not exist (the cell has not finished).

    A damaged one (not JSON, not an object, no ``status``) reads as status
    ``damaged`` with an ``error`` naming the file, so that a run redoes the cell
    and a report lists it instead of showing it as finished or pending.
    """
    path = Path(path)
    if not path.is_file():
        return None
    value, problem = _load_json(path)
    if problem is None and not isinstance(value, dict):
        problem = f"holds a JSON {type(value).__name__.replace('NoneType', 'null')}, not an object"
    if problem is None and not isinstance(value.get("status"), str):
        problem = "has no 'status' field"
    if problem is None:
        return value
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
        config = read_json_object(cell / CONFIG_FILE, "that cell is left out; 'gmbench run' writes it again") if cell.is_dir() else None
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
    return (value, None) if problem is None else (None, problem)


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


# --------------------------------------------------------------------------- preparing a run


def check_run_dir(suite, run_dir: str | os.PathLike, update: bool = False) -> None:
    """Raise :class:`SuiteChanged` if ``run_dir`` holds another suite (or no run at all).

    Reads only: safe before the run lock is taken (nothing is created for a refused folder).
    """
    run_dir = Path(run_dir)
    run, problem = read_run_file(run_dir)
    if run is None:
        cells = cells_from_folders(run_dir)
        if cells:
            warn_once(f"{run_dir / RUN_FILE} {problem}; the finished cells are read from {run_dir / CELLS_DIR} and run.json is written again")
            run = {"name": suite.name, "cells": cells}
        elif run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()):
            raise SuiteChanged(
                f"'{run_dir}' exists and is not a gmbench run folder ({RUN_FILE} {problem}, no cell folders); pass an empty or new --out"
            )
        else:
            return
    old = {cell["id"]: cell["config"] for cell in run["cells"]}
    new = {cell.id: cell.config for cell in suite.cells}
    added = [key for key in new if key not in old]
    removed = [key for key in old if key not in new]
    if not (added or removed):
        return
    summary = _change_summary(old, new, added, removed)
    if not update:
        raise SuiteChanged(
            f"run folder '{run_dir}' was started from a different version of suite "
            f"'{run.get('name')}' ({summary}); "
            "rerun with --update to run the new cells and drop the removed ones from the results, "
            "or pass another --out"
        )
    log.info("suite changed: %s; --update given, continuing", summary)


def prepare_run_dir(suite, run_dir: str | os.PathLike, update: bool = False) -> None:
    """Check ``run_dir`` (see :func:`check_run_dir`) and write ``suite.yaml`` and ``run.json``.

    Call it holding the run lock: it writes into the folder.
    """
    run_dir = Path(run_dir)
    check_run_dir(suite, run_dir, update=update)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.write_text(run_dir / SUITE_FILE, suite.text)
    io.write_json(run_dir / RUN_FILE, suite.to_json())


def _change_summary(old: dict, new: dict, added: list, removed: list) -> str:
    parts = []
    if added:
        parts.append(f"{len(added)} new cell(s), e.g. {_config_brief(new[added[0]])}")
    if removed:
        parts.append(f"{len(removed)} cell(s) no longer in the suite, e.g. {_config_brief(old[removed[0]])}")
    if added and removed:
        changed = _changed_fields(old[removed[0]], new[added[0]])
        if changed:
            parts.append(f"differing fields: {', '.join(changed[:4])}")
    return "; ".join(parts)


def _config_brief(config: dict) -> str:
    keys = ("label", "model", "dataset", "n_gaussians", "seed", "transfer_fitting", "layout")
    return " ".join(f"{key}={config[key]}" for key in keys if config.get(key) is not None)


def _changed_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            changed += _changed_fields(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            changed.append(prefix + key)
    return changed


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
