"""Every number the paper prints appears beside the measured one (gmbench.report.paper)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gmbench.report import write_report
from gmbench.report.paper import format_paper_number, smoothed_accuracy_at


def debiased_ema(values, weight=0.9):
    return [
        sum((1 - weight) * weight ** (t - k) * v for k, v in enumerate(values[:t], start=1)) / (1 - weight**t)
        for t in range(1, len(values) + 1)
    ]


HISTORIES = {  # 60 epochs each: a rising curve with a wobble
    "1/128->10": [0.5 + 0.2 * (1 - 0.9**e) + (0.01 if e % 2 else -0.01) for e in range(1, 61)],
    "1/128->8/64->10": [0.6 + 0.3 * (1 - 0.93**e) + (0.02 if e % 3 else -0.02) for e in range(1, 61)],
}
TABLES = [
    {"name": "table8", "title": "Table 8", "rows": ["layout"], "value": "smoothed_test_accuracy", "epochs": [50],
     "extra": ["kernels", "peak_memory_mb", "train_time_s"], "paper": "table8"},
    {"name": "table2", "title": "Table 2", "rows": ["layout"], "value": "smoothed_test_accuracy", "paper": "table2"},
    {"name": "table4", "title": "Table 4", "rows": ["label"], "value": "smoothed_test_accuracy", "paper": "table4"},
]


def fake_depth_run(folder: Path) -> None:
    cells = []
    for index, (layout, history) in enumerate(HISTORIES.items()):
        cell_id = f"c{index}"
        config = {"task": "train", "label": "GMCN", "dataset": "modelnet10", "model": "gmcn", "input": "gm",
                  "n_gaussians": 128, "seed": 0, "training": {"epochs": 60, "batch_size": 14}, "model_params": {"layout": layout}}
        cells.append({"id": cell_id, "config": config})
        cell = folder / "cells" / cell_id
        cell.mkdir(parents=True)
        (cell / "epochs.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "test_accuracy": a}) + "\n" for e, a in enumerate(history, start=1)))
        (cell / "metrics.json").write_text(json.dumps({
            "status": "ok", "test_accuracy": history[-1], "smoothed_test_accuracy": debiased_ema(history)[-1],
            "train_time_s": 1000.0 + index, "peak_memory_mb": 300.0, "params": 651, "kernels": [10, 88][index], "epochs": 60,
        }))
    (folder / "run.json").write_text(json.dumps({"name": "depth", "task": "train", "cells": cells, "report": {"tables": TABLES}}))


def test_epoch_columns_are_the_smoothed_accuracy_at_that_epoch_beside_the_papers(tmp_path):
    fake_depth_run(tmp_path / "run")
    write_report(tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / "report" / "tables" / "table8.csv")
    assert list(table["layout"]) == list(HISTORIES)
    text = (tmp_path / "run" / "report" / "tables" / "table8.md").read_text()
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert header == [
        "layout", "test accuracy, smoothed 0.9 (%)", "test accuracy, smoothed 0.9 (%) paper",
        "epoch 50, smoothed (%)", "epoch 50, smoothed (%) paper", "#kernels", "#kernels paper",
        "peak memory (MiB)", "peak memory (MiB) paper", "training time (s)", "training time (s) paper",
    ]
    first = [c.strip() for c in text.splitlines()[4].strip("|").split("|")]
    expected_50 = debiased_ema(HISTORIES["1/128->10"])[49] * 100
    expected_60 = debiased_ema(HISTORIES["1/128->10"])[59] * 100
    assert first == ["1/128->10", f"{expected_60:.1f}", "72.45", f"{expected_50:.1f}", "74.73", "10", "10", "300.0", "307", "1000.0", "2,160"]


def test_paper_fields_nothing_measures_get_their_own_columns_and_notes_are_printed(tmp_path):
    fake_depth_run(tmp_path / "run")
    report = write_report(tmp_path / "run").read_text()
    table2 = (tmp_path / "run" / "report" / "tables" / "table2.md").read_text()
    assert "paper: train_time_s" in table2 and "1,800" in table2  # Table 2's 0.5 h, not measured by that table
    # Table 4's conflict with Table 12 is stated where the input-fitting report prints them.
    assert "Table 4 gives k-means+EM 92.1 and rand+EM 92.8, Table 12" in report
    assert "Note on the paper's numbers" in (tmp_path / "run" / "report" / "tables" / "table4.md").read_text()


def test_smoothed_accuracy_at_epochs_beyond_the_run_is_missing():
    values = smoothed_accuracy_at([0.5, 1.0], [1, 2, 5])
    assert values["smoothed_test_accuracy_epoch_1"] == 0.5
    assert abs(values["smoothed_test_accuracy_epoch_2"] - 0.145 / 0.19) < 1e-15
    assert values["smoothed_test_accuracy_epoch_5"] != values["smoothed_test_accuracy_epoch_5"]  # nan


def test_paper_numbers_keep_the_digits_the_paper_prints():
    assert format_paper_number(92.61) == "92.61"
    assert format_paper_number(0.4457) == "0.4457"
    assert format_paper_number(216841) == "216,841"
    assert format_paper_number(10200) == "10,200"
    assert format_paper_number(3.8) == "3.8"
    assert format_paper_number("n/a (OOM)") == "n/a (OOM)"
    assert format_paper_number(None) == "" and format_paper_number(float("nan")) == ""


def test_a_report_table_with_bad_epochs_is_rejected_with_its_line():
    import pytest

    from gmbench.errors import GmbenchError
    from gmbench.suite import parse_suite

    text = (
        "name: s\ntask: footprint\ncell: {layout: '1/8->4'}\nmatrix: {dims: [2]}\n"
        "report:\n  tables:\n    - {name: t, rows: [dims], value: memory_mb, epochs: [0, 50]}\n"
    )
    with pytest.raises(GmbenchError, match=r"s\.yaml:7:.*'epochs' must be a list of epoch numbers >= 1"):
        parse_suite(text, "s.yaml")
