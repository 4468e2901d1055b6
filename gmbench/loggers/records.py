"""What loggers are given: one cell (:class:`CellInfo`) or one report (:class:`ReportInfo`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# MLflow stores a parameter value of at most 6,000 characters; a longer value (a long
# layout string) is cut there with a marker rather than refused.
MAX_PARAM_CHARS = 6000


@dataclasses.dataclass(frozen=True)
class CellInfo:
    """One cell as its loggers see it at the start of the cell.

    ``config`` is the resolved cell configuration (``config.json``), the
    hyper-parameters; ``environment`` is the run's ``environment.json``
    (versions, commit, devices); ``suite`` the suite's name.
    """

    run_dir: Path
    cell_dir: Path
    cell_id: str
    suite: str
    config: dict
    environment: dict

    @property
    def title(self) -> str:
        """``cell_id`` and label, e.g. ``3f2a9c01de GMCN``: the run's name in a tracking tool."""
        label = self.config.get("label") or self.config.get("model") or self.config.get("transfer_fitting") or self.config.get("layout")
        return f"{self.cell_id} {label}" if label else self.cell_id

    def hyperparameters(self) -> dict[str, Any]:
        """The configuration flattened to dotted keys (``training.epochs``), values as scalars:
        numbers, strings and booleans stay, ``None`` becomes ``"null"``, lists become JSON."""
        return flatten(self.config)


@dataclasses.dataclass(frozen=True)
class ReportInfo:
    """A written report: its run folder and suite, ``report.md`` and the figure files (PNG, PDF)."""

    run_dir: Path
    suite: str
    report_file: Path
    figures: tuple[Path, ...]


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"epochs": 8}}`` -> ``{"training.epochs": 8}``; an empty mapping stays as ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "null"
        else:
            flat[name] = json.dumps(value, sort_keys=True, default=str)
    return flat


def param_text(value: Any) -> str:
    """A hyper-parameter as the string MLflow stores, cut to :data:`MAX_PARAM_CHARS`."""
    text = json.dumps(value) if isinstance(value, bool) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def numeric_items(record: dict, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite-or-not numbers of a record (booleans and strings left out), as floats."""
    return {
        key: float(value) for key, value in record.items()
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
