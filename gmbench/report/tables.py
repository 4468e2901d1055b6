"""Report tables: a results frame aggregated as a table spec says, in Markdown, CSV and LaTeX.

A table is declared in the suite's ``report: tables:`` list (or a default one is used)::

    - name: table1                      # file name
      title: "Table 1: ModelNet10 accuracy (%)"
      rows: [label, input]              # results columns forming the rows
      columns: n_gaussians              # optional: a results column spread into columns
      value: test_accuracy              # the aggregated metric (mean +/- std over seeds)
      extra: [params]                   # per-row columns (mean over the row's cells)
      paper: table1                     # key of gmbench/report/paper_results.yaml: adds paper columns
      source: results                   # or: diagnostics (per-layer RMSE of the cells)
      epochs: [5, 50]                   # optional: smoothed test accuracy at these epochs (gmbench.report.paper)

Accuracies are shown in percent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from gmbench.errors import GmbenchError
from gmbench.report import paper as paper_numbers
from gmbench.report.paper import matching_paper_value, same_value
from gmbench.run.folder import DIAGNOSTICS_FILE, cell_dir, warn_once
from gmbench.tasks import DEFAULT_TASK, TASKS

PERCENT_METRICS = ("test_accuracy", "best_test_accuracy", "smoothed_test_accuracy")
METRIC_TITLES = {
    "test_accuracy": "test accuracy (%)",
    "best_test_accuracy": "best test accuracy (%)",
    "smoothed_test_accuracy": "test accuracy, smoothed 0.9 (%)",
    "kernels": "#kernels",
    "train_time_s": "training time (s)",
    "peak_memory_mb": "peak memory (MiB)",
    "samples_per_s": "samples/s",
    "params": "#params",
    "time_ms": "time (ms)",
    "rmse": "RMSE",
    "memory_mb": "memory (MiB)",
    "total_gaussians": "Gaussians",
}


def default_tables(frame: pd.DataFrame, task: str) -> list[dict]:
    kind = TASKS.get(task, TASKS[DEFAULT_TASK])
    value = kind.default_metric
    rows = ["label"] + [c for c in ("dataset", "input") if c in frame and frame[c].nunique(dropna=True) > 1]
    spec = {"name": "results", "title": f"{METRIC_TITLES.get(value, value)} per configuration", "rows": rows, "value": value}
    if "n_gaussians" in frame and frame["n_gaussians"].nunique(dropna=True) > 1:
        spec["columns"] = "n_gaussians"
    if kind.report_extra:
        spec["extra"] = list(kind.report_extra)
    return [spec]


def _scale(metric: str) -> float:
    return 100.0 if _is_percent(metric) else 1.0


def _is_percent(metric: str) -> bool:
    return metric in PERCENT_METRICS or metric.startswith("smoothed_test_accuracy_epoch_")


def _format(mean: float, std: float, count: int, metric: str) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    digits = 1 if _is_percent(metric) or abs(mean) >= 100 else 3 if abs(mean) < 10 else 2
    if metric in ("params", "total_gaussians", "kernels", "n_points"):
        return f"{mean:,.0f}"
    text = f"{mean:.{digits}f}"
    if count > 1 and std == std:
        text += f" ± {std:.{digits}f}"
    return text


def _format_paper(value, metric: str) -> str:
    return paper_numbers.format_paper_number(value)  # as printed in the paper, all its digits


def _column_title(name: str) -> str:
    if name.startswith("smoothed_test_accuracy_epoch_"):
        return f"epoch {name.rsplit('_', 1)[1]}, smoothed (%)"
    return METRIC_TITLES.get(name, name)


def build_table(frame: pd.DataFrame, spec: dict, paper: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aggregate ``frame`` as ``spec`` says; return (display table of strings, tidy numbers)."""
    value = spec.get("value", "test_accuracy")
    rows = list(spec.get("rows", ["label"]))
    column = spec.get("columns")
    extra = list(spec.get("extra", []))
    for name in rows + ([column] if column else []) + [value]:
        if name not in frame.columns:
            raise GmbenchError(f"report table '{spec.get('name')}': results have no column '{name}'; columns are: {', '.join(frame.columns)}")
    for field, wanted in (spec.get("where") or {}).items():
        if field not in frame.columns:
            raise GmbenchError(f"report table '{spec.get('name')}': 'where' names no results column '{field}'")
        frame = frame[frame[field].map(lambda v, wanted=wanted: same_value(v, wanted))]
    ok = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.copy()
    ok[value] = pd.to_numeric(ok[value], errors="coerce") * _scale(value)
    keys = rows + ([column] if column else [])
    for key in keys:
        ok[key] = ok[key].fillna("-")
    grouped = ok.groupby(keys, sort=False, dropna=False)[value].agg(["mean", "std", "count"]).reset_index()
    records = (paper or {}).get("records", [])
    grouped["paper"] = [matching_paper_value(records, dict(zip(keys, values))) for values in grouped[keys].itertuples(index=False)]
    tidy = grouped.rename(columns={"mean": f"{value}_mean", "std": f"{value}_std", "count": "n"})

    display_rows = []
    row_keys = list(dict.fromkeys(tuple(values) for values in grouped[rows].itertuples(index=False)))
    column_values = list(dict.fromkeys(grouped[column])) if column else [None]
    if column and all(_sort_key(value)[0] == 0 for value in column_values):
        column_values = sorted(column_values, key=_sort_key)  # numbers ascending; names keep their order
    for row_key in row_keys:
        line = dict(zip(rows, row_key))
        selected = grouped
        for name, item in zip(rows, row_key):
            selected = selected[selected[name] == item]
        for col_value in column_values:
            cell = selected if col_value is None else selected[selected[column] == col_value]
            header = METRIC_TITLES.get(value, value) if col_value is None else f"{column}={col_value}"
            if cell.empty:
                line[header] = ""
                paper_value = matching_paper_value(records, {**dict(zip(rows, row_key)), **({column: col_value} if column else {})})
            else:
                first = cell.iloc[0]
                line[header] = _format(first["mean"], first["std"], int(first["count"]), value)
                paper_value = first["paper"]
            if records:
                line[f"{header} paper"] = _format_paper(paper_value, value)
        for name in extra:
            if name in ok.columns:
                subset = ok
                for key_name, item in zip(rows, row_key):
                    subset = subset[subset[key_name] == item]
                numbers = pd.to_numeric(subset[name], errors="coerce").dropna() * _scale(name)
                if not len(numbers):
                    text = "n/a"
                elif name == "params" and numbers.nunique() > 1:  # e.g. a 2D and a 3D data set in one row
                    text = f"{_format(float(numbers.min()), float('nan'), 1, name)}-{_format(float(numbers.max()), float('nan'), 1, name)}"
                else:
                    text = _format(float(numbers.mean()), float("nan"), 1, name)
                line[_column_title(name)] = text
            if any(f"paper_{name}" in record for record in records):  # the paper's number beside ours
                line[f"{_column_title(name)} paper"] = paper_numbers.row_paper_value(records, dict(zip(rows, row_key)), f"paper_{name}")
        for field in paper_numbers.unmeasured_paper_fields(records, extra):  # printed by the paper, not measured here
            line[f"paper: {field[len('paper_'):]}"] = paper_numbers.row_paper_value(records, dict(zip(rows, row_key)), field)
        display_rows.append(line)
    return pd.DataFrame(display_rows), tidy


def build_diagnostics_table(run_dir: Path, frame: pd.DataFrame, spec: dict, paper: dict | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer RMSE (Tables 10-11) from the cells' ``diagnostics.csv``, averaged over seeds."""
    parts = []
    for _, row in frame[frame["status"] == "ok"].iterrows():
        path = cell_dir(run_dir, row["cell_id"]) / DIAGNOSTICS_FILE
        if path.is_file():
            try:
                diagnostics = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
                warn_once(f"{path} cannot be read ({type(error).__name__}); that cell is left out of table '{spec.get('name')}' (delete the cell's metrics.json and rerun 'gmbench run' to redo it)")
                continue
            for key in spec.get("rows", ["label"]):
                if key not in diagnostics.columns:
                    diagnostics[key] = row.get(key)
            if "n_gaussians" not in diagnostics.columns:
                diagnostics["n_gaussians"] = row.get("n_gaussians")
            parts.append(diagnostics)
    if not parts:
        return pd.DataFrame(), pd.DataFrame()
    data = pd.concat(parts, ignore_index=True)
    data["status"] = "ok"
    data = data.rename(columns={"value": "rmse"})
    spec = {**spec, "value": "rmse"}
    spec.setdefault("rows", ["layer", "label"])
    spec.setdefault("columns", "metric")
    return build_table(data, spec, paper)


def main_task(frame: pd.DataFrame) -> str:
    """The task of most cells (a run rebuilt from its cell folders has no run.json to say)."""
    tasks = frame["task"].dropna() if "task" in frame else pd.Series(dtype=object)
    return str(tasks.mode().iloc[0]) if len(tasks) else DEFAULT_TASK


def _sort_key(value):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no finished cells_\n"
    header = [str(c).replace("|", "\\|") for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str) -> str:
    def escape(text: str) -> str:
        for char, replacement in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("±", r"$\pm$"), ("->", r"$\rightarrow$")):
            text = text.replace(char, replacement)
        return text

    columns = [escape(str(c)) for c in table.columns]
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule", " & ".join(columns) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        lines.append(" & ".join(escape(str(row[c])) for c in table.columns) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- compare


COMPARE_METRICS = ("test_accuracy", "best_test_accuracy", "smoothed_test_accuracy", "train_time_s", "samples_per_s", "peak_memory_mb", "time_ms", "rmse", "memory_mb")


def compare_runs(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Cells present in both runs (same cell id = same configuration) side by side with deltas."""
    keys = [c for c in ("cell_id", "label", "dataset", "n_gaussians", "seed") if c in frame.columns]
    merged = frame.merge(other, on="cell_id", how="inner", suffixes=("", " other"))
    table = merged[keys].copy()
    for metric in COMPARE_METRICS:
        if metric not in merged or f"{metric} other" not in merged:
            continue
        this = pd.to_numeric(merged[metric], errors="coerce") * _scale(metric)
        that = pd.to_numeric(merged[f"{metric} other"], errors="coerce") * _scale(metric)
        if this.isna().all() and that.isna().all():
            continue
        table[metric] = this.round(4)
        table[f"{metric} other"] = that.round(4)
        table[f"{metric} delta"] = (this - that).round(4)
    table["status"] = merged["status"] + " / " + merged["status other"]
    return table


# --------------------------------------------------------------------------- the report


# The layout of report.md; ``gmbench report --template FILE`` substitutes the same
# ``string.Template`` fields into another Markdown file (see reports/).
