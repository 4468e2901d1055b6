"""Checking a run folder against the suite about to run in it, and writing the suite there.

:func:`check_run_dir` only reads (safe before the run lock is taken); the runner
calls it again under the lock and then writes ``suite.yaml`` and ``run.json``
(:func:`gmbench.run.folder.write_run`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gmbench.errors import GmbenchError
from gmbench.run.folder import CELLS_DIR, LOCK_FILE, RUN_FILE, cells_from_folders, read_run_file, warn_once

log = logging.getLogger("gmbench.run")


class SuiteChanged(GmbenchError):
    """The run folder was started from a different suite (or different --smoke)."""


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
        elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
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
