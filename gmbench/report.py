"""Reports of a run folder: the paper's tables and figures, from ``results.csv`` only.

``write_report(run_dir, out_dir)`` writes ``report.md`` (GitHub-readable),
``tables/<name>.{md,csv,tex}`` and ``figures/<name>.{png,pdf}``.  A table is
declared in the suite's ``report: tables:`` list (or a default one is used)::

    - name: table1                      # file name
      title: "Table 1: ModelNet10 accuracy (%)"
      rows: [label, input]              # results columns forming the rows
      columns: n_gaussians              # optional: a results column spread into columns
      value: test_accuracy              # the aggregated metric (mean +/- std over seeds)
      extra: [params]                   # per-row columns (mean over the row's cells)
      paper: table1                     # key of gmbench/paper_results.yaml: adds paper columns
      source: results                   # or: diagnostics (per-layer RMSE of the cells)
      epochs: [5, 50]                   # optional: smoothed test accuracy at these epochs (gmbench.report_paper)

Accuracies are shown in percent.  The paper's numbers live in
``gmbench/paper_results.yaml`` with the table they come from.
"""

from __future__ import annotations

import math
import os
import re
import string
from pathlib import Path

import pandas as pd
import yaml

from gmbench import io, report_paper
from gmbench.errors import GmbenchError
from gmbench.run.folder import DIAGNOSTICS_FILE, RESULTS_CSV, cell_dir, new_command, read_environment, read_run, warn_once
from gmbench.run.results import load_results
from gmbench.tasks import TASKS

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
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


def load_paper_results(path: str | Path = PAPER_RESULTS) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)["tables"]


# --------------------------------------------------------------------------- tables


def default_tables(frame: pd.DataFrame, task: str) -> list[dict]:
    kind = TASKS.get(task, TASKS["train"])
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


def _match(record: dict, key: dict) -> bool:
    for field, value in record.items():
        if field in ("value", "notes") or field.startswith("paper_"):
            continue
        if field not in key:
            return False
        if not _same(key[field], value):
            return False
    return True


def _same(a, b) -> bool:
    """Equal as numbers when both are numbers (CSV turns 32 into 32.0), else as text."""
    if isinstance(a, bool) or isinstance(b, bool) or str(a) in ("True", "False") or str(b) in ("True", "False"):
        return str(a) == str(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _format_paper(value, metric: str) -> str:
    return report_paper.format_paper_number(value)  # as printed in the paper, all its digits


def _column_title(name: str) -> str:
    if name.startswith("smoothed_test_accuracy_epoch_"):
        return f"epoch {name.rsplit('_', 1)[1]}, smoothed (%)"
    return METRIC_TITLES.get(name, name)


def _paper_value(records: list[dict], key: dict):
    for record in records:
        if _match(record, key):
            return record.get("value")
    return None


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
        frame = frame[frame[field].map(lambda v, wanted=wanted: _same(v, wanted))]
    ok = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.copy()
    ok[value] = pd.to_numeric(ok[value], errors="coerce") * _scale(value)
    keys = rows + ([column] if column else [])
    for key in keys:
        ok[key] = ok[key].fillna("-")
    grouped = ok.groupby(keys, sort=False, dropna=False)[value].agg(["mean", "std", "count"]).reset_index()
    records = (paper or {}).get("records", [])
    grouped["paper"] = [_paper_value(records, dict(zip(keys, values))) for values in grouped[keys].itertuples(index=False)]
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
                paper_value = _paper_value(records, {**dict(zip(rows, row_key)), **({column: col_value} if column else {})})
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
                line[f"{_column_title(name)} paper"] = report_paper.row_paper_value(records, dict(zip(rows, row_key)), f"paper_{name}")
        for field in report_paper.unmeasured_paper_fields(records, extra):  # printed by the paper, not measured here
            line[f"paper: {field[len('paper_'):]}"] = report_paper.row_paper_value(records, dict(zip(rows, row_key)), field)
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


def _main_task(frame: pd.DataFrame) -> str:
    """The task of most cells (a run rebuilt from its cell folders has no run.json to say)."""
    tasks = frame["task"].dropna() if "task" in frame else pd.Series(dtype=object)
    return str(tasks.mode().iloc[0]) if len(tasks) else "train"


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
DEFAULT_TEMPLATE = "$header\n$tables\n$figures\n$compare\n$failed\n$cells\n"
TEMPLATE_FIELDS = ("title", "description", "summary", "environment", "legend", "header", "tables", "figures", "compare", "failed", "cells")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, compare: str | Path | None = None, template: str | Path | None = None) -> Path:
    """Write tables, figures and ``report.md`` for ``run_dir``; return the path of report.md.

    ``template``: a Markdown file with ``$header``, ``$tables``, ``$figures``, ``$compare``,
    ``$failed``, ``$cells`` (and ``$title``, ``$description``, ``$summary``,
    ``$environment``, ``$legend``) fields; default :data:`DEFAULT_TEMPLATE`.
    """
    from gmbench import report_figures  # matplotlib: only when figures are drawn

    new_command()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GmbenchError(f"run folder '{run_dir}' does not exist; pass the --out folder of 'gmbench run'")
    frame = load_results(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    run = read_run(run_dir) or {"name": run_dir.name, "report": {}}
    task = run.get("task") or _main_task(frame)
    specs = (run.get("report") or {}).get("tables") or default_tables(frame, task)
    paper_tables = load_paper_results()

    environment = read_environment(run_dir)
    counts = frame["status"].value_counts().to_dict()
    sections: dict[str, str] = {"title": f"Report: {run.get('name')}", "description": (run.get("description") or "").strip()}
    lines = [f"# {sections['title']}", ""]
    if run.get("description"):
        lines += [run["description"].strip(), ""]
    sections["summary"] = (
        f"Run folder `{run_dir}`; {len(frame)} cells: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + (" (smoke run)" if run.get("smoke") else "") + "."
    )
    lines += [sections["summary"], ""]
    sections["environment"] = ""
    if environment:
        git = environment.get("git") or {}
        sections["environment"] = (
            f"gmbench {environment.get('gmbench')}, commit {str(git.get('commit'))[:10]}{' (modified)' if git.get('dirty') else ''}; "
            f"torch {environment.get('packages', {}).get('torch')}; device {environment.get('device')} "
            f"({', '.join(environment.get('gpus') or []) or environment.get('cpu')}); backend {environment.get('backend')}."
        )
        lines += [sections["environment"], ""]
    sections["legend"] = (
        "Accuracies in percent, mean ± standard deviation over seeds (± only with more than one seed); "
        "the *paper* columns are the numbers of Celarek et al. (ICLR 2022) from `gmbench/paper_results.yaml`."
    )
    lines += [sections["legend"], ""]
    sections["header"], lines = "\n".join(lines), []

    for spec in specs:
        name = spec.get("name", "table")
        paper = paper_tables.get(spec["paper"]) if spec.get("paper") else None
        if spec.get("paper") and paper is None:
            raise GmbenchError(f"report table '{name}': no paper table '{spec['paper']}' in {PAPER_RESULTS.name}; known: {', '.join(paper_tables)}")
        if spec.get("source") == "diagnostics":
            display, tidy = build_diagnostics_table(run_dir, frame, spec, paper)
        else:
            display, tidy = build_table(*report_paper.with_epoch_columns(run_dir, frame, spec), paper)
        title = spec.get("title", name)
        if paper and paper.get("source"):
            title += f" (paper: {paper['source']})"
        note = report_paper.paper_note(paper)
        io.write_text(out_dir / "tables" / f"{name}.md", f"## {title}\n\n" + (note + "\n" if note else "") + to_markdown(display))
        with io.atomic_path(out_dir / "tables" / f"{name}.csv") as tmp:
            tidy.to_csv(tmp, index=False)
        io.write_text(out_dir / "tables" / f"{name}.tex", to_latex(display, title))
        lines += [f"## {title}", "", *([note] if note else []), to_markdown(display), f"[CSV](tables/{name}.csv) · [LaTeX](tables/{name}.tex)", ""]
    sections["tables"], lines = "\n".join(lines), []

    figures = report_figures.draw_all(run_dir, frame, out_dir / "figures")
    if figures:
        lines += ["## Figures", ""]
        for title, stem in figures:
            lines += [f"### {title}", "", f"![{title}](figures/{stem}.png)", "", f"[PDF](figures/{stem}.pdf)", ""]
    sections["figures"], lines = "\n".join(lines), []

    if compare is not None:
        other = load_results(Path(compare))
        table = compare_runs(frame, other)
        with io.atomic_path(out_dir / "tables" / "compare.csv") as tmp:
            table.to_csv(tmp, index=False)
        io.write_text(out_dir / "tables" / "compare.md", to_markdown(table))
        lines += [f"## Compared with `{compare}`", "", f"{len(table)} cells in both runs (matched by cell id); delta = this run - other run.", "", to_markdown(table), ""]
    sections["compare"], lines = "\n".join(lines), []

    failed = frame[~frame["status"].isin(["ok"])]
    if len(failed):
        lines += ["## Cells not finished", "", to_markdown(failed[["cell_id", "label", "status", "error"]].fillna("")), ""]
    sections["failed"], lines = "\n".join(lines), []
    results_link = os.path.relpath(run_dir / RESULTS_CSV, out_dir)
    sections["cells"] = "\n".join(["## All cells", "", f"One row per cell: [results.csv]({results_link}) (also `results.parquet`).", ""])
    if template is not None:
        template_path = Path(template)
        if not template_path.is_file():
            raise GmbenchError(f"report template '{template_path}' does not exist; pass a Markdown file such as reports/paper-comparison.md")
        text = template_path.read_text()
    else:
        text = DEFAULT_TEMPLATE
    path = out_dir / "report.md"
    io.write_text(path, re.sub(r"\n{3,}", "\n\n", string.Template(text).safe_substitute(sections)))
    return path
