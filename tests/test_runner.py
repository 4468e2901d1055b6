"""The runner: cell folders, failure handling, resume, changed suites, results, executors."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import pytest
import torch
from suite_texts import blobs_suite

from gmbench import mixture
from gmbench.run.executors import LocalExecutor, create_executor
from gmbench.footprint import footprint
from gmbench.run.results import COLUMNS, RESULTS_CSV, RESULTS_PARQUET
from gmbench.run.cell import RunOptions, run_cell
from gmbench.run.folder import cell_dir, read_metrics
from gmbench.run.prepare import SuiteChanged
from gmbench.run.suite_runner import run_suite
from gmbench.tasks.transfer_fitting_timing import random_test_mixtures
from gmbench.suite import parse_suite

TINY = blobs_suite("tiny", epochs=2, batch_size=10, matrix="""\
matrix:
  variant:
    - {label: good}
    - {label: broken, model_params: {fail: true}}
    - {label: nan, model_params: {diverge: true}}
""")


def tiny_suite(text: str = TINY):
    return parse_suite(textwrap.dedent(text), "tiny.yaml")


def by_label(suite):
    return {cell.config["label"]: cell for cell in suite.cells}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    suite = tiny_suite()
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    summary = run_suite(suite, run_dir, RunOptions(), progress=False)
    return suite, run_dir, summary


def test_a_cell_folder_holds_config_epoch_log_checkpoint_and_metrics(finished_run):
    suite, run_dir, _ = finished_run
    folder = cell_dir(run_dir, by_label(suite)["good"].id)
    assert json.loads((folder / "config.json").read_text()) == by_label(suite)["good"].config
    epochs = [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs] == [1, 2]
    assert (folder / "checkpoint.pt").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs"] == 2
    assert metrics["test_accuracy"] == pytest.approx(epochs[-1]["test_accuracy"])
    assert metrics["n_points"] == 24  # footprint-matched: 8 Gaussians x 6 floats / 2 coordinates


def test_failing_cells_are_recorded_and_the_others_still_run(finished_run):
    suite, run_dir, summary = finished_run
    cells = by_label(suite)
    assert read_metrics(run_dir, cells["good"].id)["status"] == "ok"
    broken = read_metrics(run_dir, cells["broken"].id)
    assert broken["status"] == "failed" and "fails on purpose" in broken["error"]
    assert "Traceback" in (cell_dir(run_dir, cells["broken"].id) / "error.txt").read_text()
    nan = read_metrics(run_dir, cells["nan"].id)
    assert nan["status"] == "diverged" and "TrainingDiverged" in nan["error"]
    frame = pd.read_csv(run_dir / RESULTS_CSV, keep_default_na=False).set_index("label")
    assert frame.loc["nan", "epochs"] == 0 and frame.loc["good", "epochs"] == 2  # epochs finished
    assert sorted(summary.failed) == sorted([cells["broken"].id, cells["nan"].id])


def test_results_have_one_row_per_cell_with_the_standard_columns(finished_run):
    suite, run_dir, _ = finished_run
    frame = pd.read_csv(run_dir / RESULTS_CSV)
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    assert sorted(frame["cell_id"]) == sorted(cell.id for cell in suite.cells)
    good = frame[frame["label"] == "good"].iloc[0]
    metrics = read_metrics(run_dir, by_label(suite)["good"].id)
    assert good["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert good["suite"] == "tiny" and good["dataset"] == "test_blobs" and good["input"] == "points"
    assert good["params"] == metrics["params"] > 0
    parquet = pd.read_parquet(run_dir / RESULTS_PARQUET)
    assert list(parquet["cell_id"]) == list(frame["cell_id"])


def test_rerun_skips_finished_cells_and_retries_failed_ones(finished_run):
    suite, run_dir, _ = finished_run
    good = by_label(suite)["good"].id
    before = read_metrics(run_dir, good)["finished_at"]
    summary = run_suite(suite, run_dir, RunOptions(), progress=False)
    assert summary.skipped == 1 and summary.ran == 2
    assert read_metrics(run_dir, good)["finished_at"] == before


def test_a_changed_suite_is_refused_with_an_explanation(finished_run, tmp_path):
    _, run_dir, _ = finished_run
    changed = tiny_suite(TINY.replace("epochs: 2", "epochs: 3"))
    with pytest.raises(SuiteChanged) as info:
        run_suite(changed, run_dir, RunOptions(), progress=False)
    message = str(info.value)
    assert "3 new cell(s)" in message and "3 cell(s) no longer in the suite" in message
    assert "training.epochs" in message and "--update" in message


def test_update_runs_only_the_new_cells(tmp_path):
    run_dir = tmp_path / "run"
    first = tiny_suite(TINY.replace("    - {label: broken, model_params: {fail: true}}\n    - {label: nan, model_params: {diverge: true}}\n", ""))
    run_suite(first, run_dir, RunOptions(), progress=False)
    grown = tiny_suite(TINY.replace("    - {label: good}\n", "    - {label: good}\n    - {label: wide, model_params: {hidden: 8}}\n").replace("    - {label: broken, model_params: {fail: true}}\n    - {label: nan, model_params: {diverge: true}}\n", ""))
    summary = run_suite(grown, run_dir, RunOptions(), progress=False, update=True)
    assert summary.skipped == 1 and summary.ran == 1 and not summary.failed
    frame = pd.read_csv(run_dir / RESULTS_CSV)
    assert sorted(frame["label"]) == ["good", "wide"]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SuiteChanged, match="not a gmbench run folder"):
        run_suite(tiny_suite(), tmp_path, RunOptions(), progress=False)


@pytest.mark.slow  # spawns fresh worker processes that import torch
def test_worker_processes_give_the_same_results_as_in_process(finished_run, tmp_path):
    suite, run_dir, _ = finished_run
    good_only = tiny_suite(TINY.replace("    - {label: broken, model_params: {fail: true}}\n", ""))
    summary = run_suite(good_only, tmp_path / "pool", RunOptions(), executor=LocalExecutor(jobs=2), progress=False)
    assert summary.ran == 2
    here = read_metrics(run_dir, by_label(suite)["good"].id)
    there = read_metrics(tmp_path / "pool", by_label(good_only)["good"].id)
    assert there["status"] == "ok" and there["test_accuracy"] == here["test_accuracy"]
    assert read_metrics(tmp_path / "pool", by_label(good_only)["nan"].id)["status"] == "diverged"


def test_unknown_executor_is_a_user_error():
    from gmbench.errors import GmbenchError

    with pytest.raises(GmbenchError, match="available: local"):
        create_executor("slurm")


def test_footprint_cell_reports_eq10_totals(tmp_path):
    suite = parse_suite("name: f\ntask: footprint\ncell: {layout: '1/128->8/64->16/32->32/16->64/8->10', batch: 32, integrated: true, dims: 3}\n")
    metrics = run_cell(suite.cells[0].config, tmp_path / "c", RunOptions())
    assert metrics["status"] == "ok"
    expected = footprint("1/128->8/64->16/32->32/16->64/8->10", batch=32, integrated=True)
    assert metrics["total_gaussians"] == expected.total_G == 434256  # paper Appendix A
    assert metrics["memory_mb"] == pytest.approx(16.57, abs=0.01)


def test_transfer_fitting_timing_cell_times_and_scores_the_method(tmp_path):
    suite = parse_suite("name: t\ntask: transfer_fitting_timing\ncell: {transfer_fitting: dense, n_mixtures: 4, n_gaussians: 16, rmse_samples: 3000, repeats: 2}\n")
    metrics = run_cell(suite.cells[0].config, tmp_path / "c", RunOptions())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["time_ms"] > 0 and metrics["time_ms_min"] <= metrics["time_ms"]
    # The fit must beat fitting nothing at all: RMSE of the zero mixture is the RMS of relu(m).
    m = random_test_mixtures(4, 16, 2, seed=0)
    generator = torch.Generator().manual_seed(0)
    points = torch.rand((3000, 2), generator=generator) * 12 - 6
    zero_rmse = float(torch.relu(mixture.evaluate(m, points)).pow(2).mean().sqrt())
    assert 0 < metrics["rmse"] < zero_rmse


def test_run_cell_records_a_missing_plugin_as_a_failed_cell(tmp_path):
    config = tiny_suite().cells[0].config | {"model": "no_such_model"}
    metrics = run_cell(config, tmp_path / "c", RunOptions(plugins=("runner_plugins",)))
    assert metrics["status"] == "failed" and "no_such_model" in metrics["error"]
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["status"] == "failed"


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    from gmbench.errors import GmbenchError
    from gmbench.run.folder import LOCK_FILE
    from gmbench.run.lock import run_lock

    suite = tiny_suite(TINY.replace("    - {label: broken, model_params: {fail: true}}\n    - {label: nan, model_params: {diverge: true}}\n", ""))
    run_dir = tmp_path / "run"
    run_suite(suite, run_dir, RunOptions(), progress=False)
    with run_lock(run_dir):
        with pytest.raises(GmbenchError, match="in use by another gmbench run"):
            run_suite(suite, run_dir, RunOptions(), progress=False)
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from gmbench.run.folder import LOCK_FILE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    suite = tiny_suite(TINY.replace("    - {label: broken, model_params: {fail: true}}\n    - {label: nan, model_params: {diverge: true}}\n", ""))
    run_dir = tmp_path / "run"
    run_suite(suite, run_dir, RunOptions(), progress=False)
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "then"}))
    summary = run_suite(suite, run_dir, RunOptions(), progress=False)
    assert summary.skipped == 1 and not (run_dir / LOCK_FILE).exists()
