"""``gmbench run`` / ``gmbench report`` end to end: real plugins on digits, exit codes, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from suite_texts import DIGITS_SMOKE_CELL, TESTS, blobs_suite, subprocess_env

from gmbench.cli import main
from gmbench.run.results import COLUMNS

DIGITS_SUITE = "name: digits-e2e\ncell:\n" + DIGITS_SMOKE_CELL + """\
matrix:
  variant:
    - {label: GMCN, model: gmcn, input: gm, model_params: {layout: "1/{n_gaussians}->4/2->{num_classes}", kernel_gaussians: 2}}
    - {label: PointNet++, model: pointnet2, input: points}
report:
  tables:
    - {name: accuracy, title: accuracy, rows: [label, input], value: test_accuracy, extra: [params]}
"""

SLOW_SUITE = blobs_suite("slow", epochs=4, batch_size=10, sleep_s=0.15, matrix="matrix:\n  seed: [0, 1, 2]\n")


@pytest.mark.slow
def test_run_and_report_on_digits_end_to_end(tmp_path, capsys):
    suite = tmp_path / "digits.yaml"
    suite.write_text(DIGITS_SUITE)
    out = tmp_path / "run"
    code = main(["run", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    assert list(frame["status"]) == ["ok", "ok"]
    assert set(frame["label"]) == {"GMCN", "PointNet++"}
    gmcn = frame[frame["label"] == "GMCN"].iloc[0]
    assert gmcn["layout"] == "1/4->4/2->10" and gmcn["reduction"] == "treehem" and gmcn["n_gaussians"] == 4
    assert frame[frame["label"] == "PointNet++"].iloc[0]["n_points"] == 12  # 4 Gaussians x 6 floats / 2
    assert (out / "environment.json").is_file() and (out / "suite.yaml").read_text() == DIGITS_SUITE

    assert main(["report", str(out), "--compare", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    for _, row in frame.iterrows():
        assert f"{100 * row['test_accuracy']:.1f}" in report  # the measured numbers are in the report
    assert (out / "report" / "tables" / "accuracy.tex").is_file()
    assert (out / "report" / "figures" / "training_curves.png").stat().st_size > 1000
    assert (out / "report" / "figures" / "training_curves.pdf").is_file()
    compare = pd.read_csv(out / "report" / "tables" / "compare.csv")
    assert (compare["test_accuracy delta"] == 0).all()


def test_invalid_suite_exits_2_with_file_and_line(tmp_path, capsys):
    suite = tmp_path / "bad.yaml"
    suite.write_text("name: bad\ncell:\n  dataset: digits\n  model: gmcn\n  model_params: {reduction_params: {Q: 1}}\n")
    assert main(["run", str(suite), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("gmbench run: error: ") and f"{suite}:5:" in error and "has no parameter 'Q'" in error
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_failing_cell_gives_exit_code_1_and_the_others_finish(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    suite = tmp_path / "s.yaml"
    suite.write_text(SLOW_SUITE.replace("sleep_s: 0.15", "sleep_s: 0").replace("seed: [0, 1, 2]", "model_params.fail: [true, false]"))
    assert main(["run", str(suite), "--out", str(tmp_path / "run"), "--no-report", "--no-progress"]) == 1
    frame = pd.read_csv(tmp_path / "run" / "results.csv")
    assert sorted(frame["status"]) == ["failed", "ok"]
    assert "failed" in capsys.readouterr().out


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    assert main(["run", str(TESTS.parent / "suites" / "footprint.yaml"), "--dry-run", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.count("integrated=") == 4
    assert not (tmp_path / "r").exists()


def _cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "gmbench", *args], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _epochs(folder: Path) -> list[int]:
    path = folder / "epochs.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_resume_after_the_process_is_killed_mid_run(tmp_path):
    suite = tmp_path / "slow.yaml"
    suite.write_text(SLOW_SUITE)
    out = tmp_path / "run"
    process = _cli(["run", str(suite), "--out", str(out), "--no-report", "--no-progress"], start_new_session=True)
    deadline = time.time() + 240
    # Kill once the first cell is finished and the second has finished at least one epoch.
    while time.time() < deadline:
        folders = sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []
        done = [f for f in folders if (f / "metrics.json").is_file()]
        partial = [f for f in folders if not (f / "metrics.json").is_file() and 1 <= len(_epochs(f)) < 4]
        if done and partial:
            break
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    else:
        pytest.fail("the run never reached the state to kill it in")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {f.name: json.loads((f / "metrics.json").read_text())["finished_at"] for f in done}
    interrupted = partial[0]
    epochs_before = _epochs(interrupted)

    rerun = _cli(["run", str(suite), "--out", str(out), "--no-report", "--no-progress"])
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert f"resuming after epoch {epochs_before[-1]}" in output
    for name, stamp in finished.items():  # finished cells were not run again
        assert json.loads((out / "cells" / name / "metrics.json").read_text())["finished_at"] == stamp
    assert _epochs(interrupted) == [1, 2, 3, 4]  # resumed from the checkpoint, no epoch twice
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 3 and (frame["status"] == "ok").all() and (frame["epochs"] == 4).all()


def test_missing_data_folder_stops_the_run_before_any_cell(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GMBENCH_DATA", raising=False)
    suite = tmp_path / "mn.yaml"
    suite.write_text(
        "name: mn\ncell:\n  dataset: modelnet10\n  model: pointnet\n  input: points\n  n_gaussians: 8\n"
    )
    out = tmp_path / "run"
    code = main(["run", str(suite), "--out", str(out), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in error and "modelnet10" in error and "--data-root" in error
    assert not [p for p in out.iterdir() if p.is_dir()]  # no cell folder: nothing ran


MODELNET_SUITE = """\
name: mn-e2e
cell:
  dataset: modelnet10
  dataset_params: {n_points: 128}
  input_fitting: kmeans
  n_gaussians: 4
  training: {epochs: 1, batch_size: 4}
matrix:
  variant:
    - {label: GMCN, model: gmcn, input: gm, model_params: {layout: "1/{n_gaussians}->4/2->{num_classes}", kernel_gaussians: 2}}
    - {label: PointNet++, model: pointnet2, input: points}
"""


@pytest.mark.slow
def test_modelnet_run_with_data_root_and_its_report_end_to_end(tmp_path, capsys, monkeypatch):
    # The user path of Table 1 on Princeton OFF files the test writes: --data-root reaches
    # the cells and the report (which draws the fitted input mixtures from the same files).
    from test_data_modelnet import make_princeton

    monkeypatch.delenv("GMBENCH_DATA", raising=False)
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "cache"))
    make_princeton(tmp_path / "data")
    suite = tmp_path / "mn.yaml"
    suite.write_text(MODELNET_SUITE)
    out = tmp_path / "run"
    code = main(["run", str(suite), "--out", str(out), "--data-root", str(tmp_path / "data"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 2 and (frame["status"] == "ok").all()
    assert (frame["dataset"] == "modelnet10").all()
    assert json.loads((out / "environment.json").read_text())["data_root"] == str((tmp_path / "data").resolve())
    assert (out / "report" / "figures" / "input_modelnet10_kmeans_4.png").is_file()
    # The report alone, later, finds the data through the run folder too.
    (out / "report" / "figures" / "input_modelnet10_kmeans_4.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "figures" / "input_modelnet10_kmeans_4.png").is_file()


def test_footprint_suite_runs_and_prints_its_summary(tmp_path, capsys):
    # Non-training tasks leave nullable columns (pandas NA) in the results; the summary
    # printed at the end of the run must not trip over them.
    out = tmp_path / "run"
    code = main(["run", str(TESTS.parent / "suites" / "footprint.yaml"), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "781.37 MiB" in printed and "16.57 MiB" in printed  # paper Tables 5 and 6, 3D
    assert "4 cells: 0 already done, 4 run, 0 failed" in printed
