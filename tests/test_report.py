"""Reports: paper-style tables (mean ± std over seeds, paper columns), LaTeX/Markdown, figures, compare."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gmbench.report import build_table, compare_runs, load_paper_results, to_latex, to_markdown, write_report
from gmbench.run.results import COLUMNS

SUITES = sorted((Path(__file__).resolve().parent.parent / "suites").glob("*.yaml"))


def results(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    frame["status"] = frame["status"].fillna("ok")
    return frame


def table1_like() -> pd.DataFrame:
    rows = []
    for seed, accuracy in enumerate([0.90, 0.92, 0.94]):
        rows.append({"label": "GMCN", "input": "gm", "n_gaussians": 32, "seed": seed, "test_accuracy": accuracy, "params": 1000})
    rows.append({"label": "GMCN", "input": "gm", "n_gaussians": 64, "seed": 0, "test_accuracy": 0.95, "params": 1000})
    rows.append({"label": "PointNet", "input": "points", "n_gaussians": 32, "seed": 0, "test_accuracy": 0.5, "params": 3000})
    rows.append({"label": "PointNet", "input": "points", "n_gaussians": 64, "seed": 0, "test_accuracy": None, "status": "failed", "params": None})
    return results(rows)


def test_table_aggregates_seeds_as_mean_and_sample_std_in_percent():
    display, tidy = build_table(table1_like(), {"rows": ["label", "input"], "columns": "n_gaussians", "value": "test_accuracy", "extra": ["params"]})
    gmcn = display[display["label"] == "GMCN"].iloc[0]
    assert gmcn["n_gaussians=32"] == "92.0 ± 2.0"  # mean 92, sample std 2 over 3 seeds
    assert gmcn["n_gaussians=64"] == "95.0"  # one seed: no ±
    assert gmcn["#params"] == "1,000"
    pointnet = display[display["label"] == "PointNet"].iloc[0]
    assert pointnet["n_gaussians=32"] == "50.0" and pointnet["n_gaussians=64"] == ""  # failed cells are left out
    row = tidy[(tidy["label"] == "GMCN") & (tidy["n_gaussians"] == 32)].iloc[0]
    assert row["test_accuracy_mean"] == pytest.approx(92.0) and row["test_accuracy_std"] == pytest.approx(2.0) and row["n"] == 3


def test_paper_columns_sit_beside_the_measured_ones():
    display, tidy = build_table(table1_like(), {"rows": ["input", "label"], "columns": "n_gaussians", "value": "test_accuracy"}, load_paper_results()["table1"])
    gmcn = display[display["label"] == "GMCN"].iloc[0]
    assert gmcn["n_gaussians=32 paper"] == "92.1" and gmcn["n_gaussians=64 paper"] == "92.3"
    # Table 1's #params column is not measured by this table: it still appears (every number the paper prints).
    assert list(display.columns) == ["input", "label", "n_gaussians=32", "n_gaussians=32 paper", "n_gaussians=64", "n_gaussians=64 paper", "paper: params"]
    assert gmcn["paper: params"] == "215K"
    assert tidy[(tidy["label"] == "PointNet") & (tidy["n_gaussians"] == 32)]["paper"].iloc[0] == 91.3


def test_where_filters_the_rows_of_a_table():
    display, _ = build_table(table1_like(), {"rows": ["label"], "value": "test_accuracy", "where": {"n_gaussians": 64}})
    assert list(display["label"]) == ["GMCN"]


def test_paper_results_hold_the_papers_numbers():
    tables = load_paper_results()
    table1 = {(r["label"], r["input"], r["n_gaussians"]): r["value"] for r in tables["table1"]["records"]}
    assert len(table1) == 15
    assert table1[("PointNet++", "points", 128)] == 93.9 and table1[("GMCN", "gm", 128)] == 93.3 and table1[("PointNet", "gm", 32)] == 90.7
    assert [r["value"] for r in tables["table2"]["records"]] == [72.5, 89.4, 91.2, 92.0, 92.6, 92.3]
    assert {r["label"]: r["value"] for r in tables["table4"]["records"]} == {"k-means": 93.3, "k-means+EM": 92.1, "rand+EM": 92.8, "Eckart": 91.0}
    assert sum(r["value"] for r in tables["table8_params"]["records"]) == 651 + 5721 + 19241 + 62921 + 216841 + 790921
    assert len(tables["table9"]["records"]) == 7 and len(tables["table10"]["records"]) == 27 and len(tables["table11"]["records"]) == 24
    assert {r["batch_size"]: r["value"] for r in tables["table13"]["records"]} == {14: 87.62, 21: 87.01}
    assert all(table.get("source") for table in tables.values())  # every table cites where it is from


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suite_report_tables_refer_to_known_paper_tables(path):
    spec = yaml.safe_load(path.read_text()).get("report", {})
    known = load_paper_results()
    for table in spec.get("tables", []):
        if table.get("paper"):
            assert table["paper"] in known, f"{path.name}: {table['paper']}"
            metric = known[table["paper"]]["metric"]
            assert table.get("value", "rmse" if table.get("source") == "diagnostics" else "test_accuracy") == metric


def test_markdown_and_latex_writers_escape_what_they_must():
    table = pd.DataFrame([{"layout": "1/16->8/8->10", "acc %": "92.0 ± 2.0", "a|b": "x_y"}])
    markdown = to_markdown(table)
    assert "| 1/16->8/8->10 | 92.0 ± 2.0 | x_y |" in markdown and "| a\\|b |" in markdown.splitlines()[0]
    latex = to_latex(table, "Table 1 & more")
    assert r"1/16$\rightarrow$8/8$\rightarrow$10" in latex and r"92.0 $\pm$ 2.0" in latex and r"acc \%" in latex
    assert r"x\_y" in latex and r"\caption{Table 1 \& more}" in latex


def test_compare_matches_cells_by_id_and_computes_deltas():
    this = results([{"cell_id": "a", "label": "GMCN", "test_accuracy": 0.9, "train_time_s": 10.0}, {"cell_id": "b", "label": "X", "test_accuracy": 0.5}])
    other = results([{"cell_id": "a", "label": "GMCN", "test_accuracy": 0.85, "train_time_s": 20.0}])
    table = compare_runs(this, other)
    assert list(table["cell_id"]) == ["a"]
    assert table["test_accuracy delta"].iloc[0] == pytest.approx(5.0)
    assert table["train_time_s delta"].iloc[0] == pytest.approx(-10.0)


def _fake_run(folder: Path, accuracies: list[float]) -> None:
    """A run folder as the runner writes it, with per-epoch logs."""
    cells = []
    for seed, accuracy in enumerate(accuracies):
        cell_id = f"c{seed}"
        config = {"task": "train", "label": "GMCN", "dataset": "digits", "model": "gmcn", "input": "gm", "n_gaussians": 16, "seed": seed, "training": {"epochs": 2}, "model_params": {"layout": "1/16->10"}}
        cells.append({"id": cell_id, "config": config})
        cell = folder / "cells" / cell_id
        cell.mkdir(parents=True)
        (cell / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "test_accuracy": accuracy * e / 2}) + "\n" for e in (1, 2)))
        (cell / "metrics.json").write_text(json.dumps({"status": "ok", "test_accuracy": accuracy, "train_time_s": 3.0, "peak_memory_mb": 100.0, "params": 651, "epochs": 2}))
    (folder / "run.json").write_text(json.dumps({"name": "fake", "task": "train", "cells": cells, "report": {}}))


def test_write_report_links_tables_and_figures_and_contains_the_numbers(tmp_path):
    _fake_run(tmp_path / "run", [0.8, 0.9])
    path = write_report(tmp_path / "run")
    text = path.read_text()
    assert "85.0 ± 7.1" in text  # mean and std of 80% and 90%
    assert "![Training curves](figures/training_curves.png)" in text
    for stem in ("training_curves", "memory_and_time"):
        assert (path.parent / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (path.parent / "figures" / f"{stem}.pdf").is_file()
    assert (path.parent / "tables" / "results.csv").is_file() and (path.parent / "tables" / "results.tex").is_file()


def test_report_of_a_missing_folder_is_a_user_error(tmp_path):
    from gmbench.errors import GmbenchError

    with pytest.raises(GmbenchError, match="does not exist"):
        write_report(tmp_path / "missing")


def test_a_template_places_the_sections_where_it_says(tmp_path):
    _fake_run(tmp_path / "run", [0.8, 0.9])
    template = tmp_path / "t.md"
    template.write_text("# Custom $title\n\nIntro.\n\n$tables\n\nEnd: $summary\n")
    text = write_report(tmp_path / "run", template=template).read_text()
    assert text.startswith("# Custom Report: fake\n\nIntro.\n")
    assert "85.0 ± 7.1" in text and text.rstrip().endswith("2 ok.")
    assert "![Training curves]" not in text  # $figures was not in the template


def test_shipped_report_template_uses_only_known_fields():
    import re
    import string

    from gmbench.report import TEMPLATE_FIELDS

    text = (Path(__file__).resolve().parent.parent / "reports" / "paper-comparison.md").read_text()
    fields = set(re.findall(r"\$(\w+)", text))
    assert fields and fields <= set(TEMPLATE_FIELDS)
    string.Template(text).substitute({name: "" for name in TEMPLATE_FIELDS})


def test_diagnostics_table_averages_seeds_per_layer_and_method_with_paper_values(tmp_path):
    from gmbench.report import build_diagnostics_table

    run = tmp_path / "run"
    _fake_run(run, [0.8, 0.9])
    for seed, offset in ((0, 0.0), (1, 0.2)):
        rows = [{"layer": "1->8", "method": "dense+mem", "metric": metric, "value": value + offset} for metric, value in (("all", 0.4), ("relu", 0.1), ("reduction", 0.3))]
        pd.DataFrame(rows).to_csv(run / "cells" / f"c{seed}" / "diagnostics.csv", index=False)
    frame = results([{"cell_id": "c0", "label": "MEM", "n_gaussians": 64}, {"cell_id": "c1", "label": "MEM", "n_gaussians": 64}])
    display, _ = build_diagnostics_table(run, frame, {"rows": ["layer", "label"], "columns": "metric"}, load_paper_results()["table10"])
    row = display.iloc[0]
    assert row["layer"] == "1->8" and row["label"] == "MEM"
    assert row["metric=all"] == "0.500 ± 0.141" and row["metric=all paper"] == "0.4457"  # paper Table 10, as printed
    assert [c for c in display.columns if not c.endswith("paper")][2:] == ["metric=all", "metric=relu", "metric=reduction"]
