"""The run folder's format version: new files carry it, today's unversioned folders still
resume and report, a newer version is refused in one line, and a failed cell's record."""

from __future__ import annotations

import json

import pytest

from gmbench.errors import GmbenchError
from gmbench.report import write_report
from gmbench.run import folder
from gmbench.run.cell import RunOptions
from gmbench.run.results import load_results
from gmbench.run.suite_runner import run_suite
from gmbench.suite import parse_suite

# Two quick cells (no training): Table 5's footprint for two batch sizes.
SUITE = """\
name: fmt
task: footprint
cell: {layout: '1/16->8/8->10', integrated: true, dims: 3}
matrix:
  batch: [8, 16]
"""


def test_new_run_json_and_metrics_json_carry_the_format_version_which_readers_drop(tmp_path):
    suite = parse_suite(SUITE, "fmt.yaml")
    run_suite(suite, tmp_path / "run", RunOptions(), progress=False)
    run = json.loads((tmp_path / "run" / folder.RUN_FILE).read_text())
    assert run[folder.FORMAT_FIELD] == folder.FORMAT_VERSION
    for cell in suite.cells:
        written = json.loads((folder.cell_dir(tmp_path / "run", cell.id) / folder.METRICS_FILE).read_text())
        assert written[folder.FORMAT_FIELD] == folder.FORMAT_VERSION
        read = folder.read_metrics(tmp_path / "run", cell.id)
        assert read["status"] == "ok" and folder.FORMAT_FIELD not in read
    assert folder.FORMAT_FIELD not in folder.read_run(tmp_path / "run")
    assert folder.FORMAT_FIELD not in load_results(tmp_path / "run").columns


def _strip_versions(run_dir):
    """Turn a run folder into one written before format_version existed (version 1)."""
    paths = [run_dir / folder.RUN_FILE, *(run_dir / folder.CELLS_DIR).glob(f"*/{folder.METRICS_FILE}")]
    for path in paths:
        record = json.loads(path.read_text())
        del record[folder.FORMAT_FIELD]
        path.write_text(json.dumps(record, indent=2))


def test_an_unversioned_run_folder_resumes_and_reports(tmp_path):
    suite = parse_suite(SUITE, "fmt.yaml")
    run_dir = tmp_path / "run"
    run_suite(suite, run_dir, RunOptions(), progress=False)
    _strip_versions(run_dir)
    unfinished = suite.cells[1]
    (folder.cell_dir(run_dir, unfinished.id) / folder.METRICS_FILE).unlink()

    summary = run_suite(suite, run_dir, RunOptions(), progress=False)

    assert (summary.skipped, summary.ran, summary.failed) == (1, 1, [])
    finished = folder.cell_dir(run_dir, suite.cells[0].id) / folder.METRICS_FILE
    assert folder.FORMAT_FIELD not in json.loads(finished.read_text())  # a skipped cell is not rewritten
    frame = load_results(run_dir)
    assert list(frame["status"]) == ["ok", "ok"]
    assert frame.set_index("batch")["memory_mb"].loc[16] > frame.set_index("batch")["memory_mb"].loc[8]
    report = write_report(run_dir)
    assert "memory (MiB)" in report.read_text()


def test_a_newer_format_version_is_refused_in_one_line(tmp_path):
    suite = parse_suite(SUITE, "fmt.yaml")
    run_dir = tmp_path / "run"
    run_suite(suite, run_dir, RunOptions(), progress=False)
    path = run_dir / folder.RUN_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), folder.FORMAT_FIELD: folder.FORMAT_VERSION + 1}))
    with pytest.raises(GmbenchError) as error:
        load_results(run_dir)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "upgrade gmbench" in message
    with pytest.raises(GmbenchError, match="upgrade gmbench"):
        run_suite(suite, run_dir, RunOptions(), progress=False)


def test_a_failure_record_has_status_one_line_error_and_time(tmp_path):
    cell = tmp_path / "cells" / "abc"
    metrics = folder.write_failure(cell, "oom", "CUDA out of memory\nsecond line", wall_time_s=1.5)
    assert metrics["cell_id"] == "abc" and metrics["status"] == "oom"
    assert metrics["error"] == "CUDA out of memory" and metrics["wall_time_s"] == 1.5
    assert metrics["finished_at"].endswith("Z")
    assert folder.read_metrics(tmp_path, "abc") == metrics
