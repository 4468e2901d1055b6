"""``report.md`` of a run folder: header, tables, figures, comparison, failed cells.

``write_report(run_dir, out_dir)`` writes ``report.md`` (GitHub-readable),
``tables/<name>.{md,csv,tex}`` (:mod:`gmbench.report.tables`) and
``figures/<name>.{png,pdf}`` (:mod:`gmbench.report.figures`), from the run folder's
results only.  The paper's numbers live in ``gmbench/report/paper_results.yaml``
with the table they come from (:mod:`gmbench.report.paper`).
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

from gmbench import io
from gmbench.errors import GmbenchError
from gmbench.paper_numbers import PAPER_RESULTS
from gmbench.report import paper as paper_numbers
from gmbench.report.paper import load_paper_results
from gmbench.report.tables import build_diagnostics_table, build_table, compare_runs, default_tables, main_task, to_latex, to_markdown
from gmbench.run.folder import RESULTS_CSV, new_command, read_environment, read_run
from gmbench.run.results import load_results

DEFAULT_TEMPLATE = "$header\n$tables\n$figures\n$compare\n$failed\n$cells\n"
TEMPLATE_FIELDS = ("title", "description", "summary", "environment", "legend", "header", "tables", "figures", "compare", "failed", "cells")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, compare: str | Path | None = None, template: str | Path | None = None) -> Path:
    """Write tables, figures and ``report.md`` for ``run_dir``; return the path of report.md.

    ``template``: a Markdown file with ``$header``, ``$tables``, ``$figures``, ``$compare``,
    ``$failed``, ``$cells`` (and ``$title``, ``$description``, ``$summary``,
    ``$environment``, ``$legend``) fields; default :data:`DEFAULT_TEMPLATE`.
    """
    from gmbench.report import figures as report_figures  # matplotlib: only when figures are drawn

    new_command()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GmbenchError(f"run folder '{run_dir}' does not exist; pass the --out folder of 'gmbench run'")
    frame = load_results(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    run = read_run(run_dir) or {"name": run_dir.name, "report": {}}
    task = run.get("task") or main_task(frame)
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
        "the *paper* columns are the numbers of Celarek et al. (ICLR 2022) from `gmbench/report/paper_results.yaml`."
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
            display, tidy = build_table(*paper_numbers.with_epoch_columns(run_dir, frame, spec), paper)
        title = spec.get("title", name)
        if paper and paper.get("source"):
            title += f" (paper: {paper['source']})"
        note = paper_numbers.paper_note(paper)
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
