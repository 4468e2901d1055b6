"""The paper's numbers beside the measured ones in report tables (every number it prints).

A paper record (``gmbench/report/paper_results.yaml``) holds the table's main number as
``value`` and every other number the paper prints for that row as a field
``paper_<results column>``: ``paper_params`` beside the measured ``params``,
``paper_train_time_s`` beside ``train_time_s``, ``paper_smoothed_test_accuracy_epoch_50``
beside the smoothed test accuracy at epoch 50.  :func:`paper_columns` lays
them out: a measured column listed in the table's ``extra:`` gets its paper
column right after it; a paper field no extra measures gets a column of its
own, so nothing the paper prints is left out.

Epoch columns (a table's ``epochs: [5, 50]``) are the TensorBoard-smoothed test
accuracy (:func:`gmbench.metrics.tensorboard_smoothed`, the paper's Appendix F
convention) at those epochs, computed from each cell's ``epochs.jsonl``.

A paper table may carry a ``note:`` (a known inconsistency of the paper, a unit
conversion), printed under the table's title.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from gmbench.metrics import tensorboard_smoothed
from gmbench.paper_numbers import PAPER_RESULTS, load_paper_results  # noqa: F401 (re-exported by gmbench.report)
from gmbench.run.folder import cell_dir, read_epochs

EPOCH_COLUMN = "smoothed_test_accuracy_epoch_{}"
PAPER_PREFIX = "paper_"


def epoch_column(epoch: int) -> str:
    """The results column of the smoothed test accuracy at ``epoch`` (1-based)."""
    return EPOCH_COLUMN.format(int(epoch))


def smoothed_accuracy_at(history: list[float], epochs: list[int]) -> dict[str, float]:
    """``{epoch_column(e): smoothed accuracy after epoch e}``; ``nan`` where the run is shorter."""
    smoothed = tensorboard_smoothed(history)
    return {epoch_column(e): smoothed[e - 1] if 1 <= e <= len(smoothed) else math.nan for e in epochs}


def with_epoch_columns(run_dir: Path, frame: pd.DataFrame, spec: dict) -> tuple[pd.DataFrame, dict]:
    """Add the epoch columns a table's ``epochs:`` asks for (from the cells' ``epochs.jsonl``)
    to ``frame`` and put them first among the table's extras."""
    epochs = [int(e) for e in spec.get("epochs") or []]
    if not epochs:
        return frame, spec
    frame = frame.copy()
    rows = []
    for cell_id in frame["cell_id"]:
        history = []
        for record in read_epochs(cell_dir(run_dir, str(cell_id))):
            try:
                history.append(float(record["test_accuracy"]))
            except (ValueError, KeyError, TypeError):
                break  # an incomplete record of a crashed cell: keep the epochs before it
        rows.append(smoothed_accuracy_at(history, epochs))
    for epoch in epochs:
        frame[epoch_column(epoch)] = [row[epoch_column(epoch)] for row in rows]
    extras = [epoch_column(e) for e in epochs] + [name for name in spec.get("extra", []) if name not in map(epoch_column, epochs)]
    return frame, {**spec, "extra": extras}


def format_paper_number(value) -> str:
    """A paper number as the paper prints it (all its digits; thousands separated)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""  # no paper number for this cell (pandas holds a missing one as nan)
    if isinstance(value, str) or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    text = repr(float(value))
    if "e" in text or "inf" in text or "nan" in text:
        return text
    decimals = 0 if text.endswith(".0") else len(text.split(".")[1])
    return f"{float(value):,.{decimals}f}"


def _key_matches(record: dict, row_key: dict) -> bool:
    """The record's identifying fields that the row key has are equal (others are ignored:
    a per-row column such as #params is shared by a row's n_gaussians columns)."""
    for field, value in record.items():
        if field in ("value", "notes") or field.startswith(PAPER_PREFIX):
            continue
        if field in row_key and not same_value(row_key[field], value):
            return False
    return True


def row_paper_value(records: list[dict], row_key: dict, field: str) -> str:
    """The paper's ``field`` for a table row: its value in the matching records
    (several different values are joined with " / ")."""
    values = []
    for record in records:
        if field in record and _key_matches(record, row_key):
            text = format_paper_number(record[field])
            if text not in values:
                values.append(text)
    return " / ".join(values)


def paper_fields(records: list[dict]) -> list[str]:
    """The ``paper_*`` fields of a paper table's records, in first-seen order."""
    fields: list[str] = []
    for record in records:
        for field in record:
            if field.startswith(PAPER_PREFIX) and field not in fields:
                fields.append(field)
    return fields


def unmeasured_paper_fields(records: list[dict], extras: list[str]) -> list[str]:
    """Paper fields that no extra column measures; they get columns of their own."""
    return [field for field in paper_fields(records) if field[len(PAPER_PREFIX):] not in extras]


def paper_note(paper: dict | None) -> str:
    """The paper table's ``note`` as a Markdown quote (empty without one)."""
    note = (paper or {}).get("note")
    return f"> **Note on the paper's numbers:** {' '.join(str(note).split())}\n" if note else ""


def record_matches(record: dict, key: dict) -> bool:
    for field, value in record.items():
        if field in ("value", "notes") or field.startswith("paper_"):
            continue
        if field not in key:
            return False
        if not same_value(key[field], value):
            return False
    return True


def same_value(a, b) -> bool:
    """Equal as numbers when both are numbers (CSV turns 32 into 32.0), else as text."""
    if isinstance(a, bool) or isinstance(b, bool) or str(a) in ("True", "False") or str(b) in ("True", "False"):
        return str(a) == str(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def matching_paper_value(records: list[dict], key: dict):
    for record in records:
        if record_matches(record, key):
            return record.get("value")
    return None
