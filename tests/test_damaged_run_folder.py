"""Damaged run folders: ``gmbench report`` and ``gmbench run`` name the damaged file in one line,
rebuild what the cell folders allow, and lose no finished cell; never a traceback."""

from __future__ import annotations

import json
import logging
import shutil
import textwrap

import pandas as pd
import pytest
from suite_texts import blobs_suite

from gmbench.cli import main
from gmbench.run.cell import RunOptions
from gmbench.run.suite_runner import run_suite
from gmbench.suite import parse_suite

SUITE = blobs_suite("tiny", epochs=2, batch_size=20, matrix="matrix:\n  seed: [0, 1]\n")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-cell run folder (copied, then damaged, by each test) and its suite file."""
    root = tmp_path_factory.mktemp("finished")
    suite_file = root / "tiny.yaml"
    suite_file.write_text(SUITE)
    suite = parse_suite(textwrap.dedent(SUITE), str(suite_file))
    run_suite(suite, root / "run", RunOptions(), progress=False)
    return root / "run", suite_file, [cell.id for cell in suite.cells]


@pytest.fixture
def run_copy(finished, tmp_path):
    source, suite_file, ids = finished
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target, suite_file, ids


def _stamps(run_dir, ids) -> dict:
    return {cell: json.loads((run_dir / "cells" / cell / "metrics.json").read_text())["finished_at"] for cell in ids}


def _report(run_dir, capsys, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(["report", str(run_dir)])
    captured = capsys.readouterr()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return code, captured.err.strip().splitlines(), warnings


def _run(run_dir, suite_file, capsys, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(["run", str(suite_file), "--out", str(run_dir), "--no-report", "--no-progress"])
    captured = capsys.readouterr()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return code, captured.err.strip().splitlines(), warnings


def _one_line_naming(lines: list[str], name: str) -> str:
    assert len(lines) == 1, lines
    assert name in lines[0] and "Traceback" not in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- results.csv alone


def _results_only(run_dir):
    (run_dir / "run.json").unlink()
    shutil.rmtree(run_dir / "cells")


def test_a_corrupt_results_csv_without_run_json_is_one_line_naming_it(run_copy, capsys, caplog):
    run_dir, suite_file, _ = run_copy
    _results_only(run_dir)
    (run_dir / "results.csv").write_bytes(b'a,b\n"unterminated\n\x00\xff\xfe')
    code, err, _ = _report(run_dir, capsys, caplog)
    line = _one_line_naming(err, str(run_dir / "results.csv"))
    assert code == 2 and "cannot be read as CSV" in line and "run the suite again" in line
    code, err, _ = _run(run_dir, suite_file, capsys, caplog)
    line = _one_line_naming(err, str(run_dir))
    assert code == 2 and "not a gmbench run folder" in line
    assert (run_dir / "results.csv").read_bytes().startswith(b'a,b\n"unterminated')  # left as it was


def test_a_results_csv_without_a_status_column_is_one_line_naming_it(run_copy, capsys, caplog):
    run_dir, _, _ = run_copy
    _results_only(run_dir)
    frame = pd.read_csv(run_dir / "results.csv").drop(columns=["status"])
    frame.to_csv(run_dir / "results.csv", index=False)
    code, err, _ = _report(run_dir, capsys, caplog)
    line = _one_line_naming(err, str(run_dir / "results.csv"))
    assert code == 2 and "no 'status' column" in line


def test_a_results_csv_copied_alone_still_gives_a_report(run_copy, capsys, caplog):
    run_dir, _, _ = run_copy
    _results_only(run_dir)
    code, err, warnings = _report(run_dir, capsys, caplog)
    assert code == 0 and err == [] and warnings == []
    assert "2 ok" in (run_dir / "report" / "report.md").read_text()


# --------------------------------------------------------------------------- run.json


@pytest.mark.parametrize("damage", ["missing", "truncated", "a list"])
def test_a_damaged_run_json_is_rebuilt_from_the_cell_folders(run_copy, capsys, caplog, damage):
    run_dir, suite_file, ids = run_copy
    stamps = _stamps(run_dir, ids)
    run_file = run_dir / "run.json"
    if damage == "missing":
        run_file.unlink()
        (run_dir / "results.csv").write_bytes(b'"corrupt\n\x00')
    elif damage == "truncated":
        run_file.write_text(run_file.read_text()[:300])
    else:
        run_file.write_text("[1, 2]")
    code, err, warnings = _report(run_dir, capsys, caplog)
    assert code == 0 and err == []
    line = _one_line_naming(warnings, str(run_file))
    assert "rebuilt from the 2 cell folders" in line and "gmbench run" in line
    assert "2 ok" in (run_dir / "report" / "report.md").read_text()

    code, err, warnings = _run(run_dir, suite_file, capsys, caplog)
    assert code == 0 and not any("Traceback" in line for line in err)
    assert "written again" in _one_line_naming(warnings, str(run_file))
    assert json.loads(run_file.read_text())["name"] == "tiny"  # restored from the suite
    assert _stamps(run_dir, ids) == stamps  # nothing was run again
    frame = pd.read_csv(run_dir / "results.csv")
    assert len(frame) == 2 and (frame["status"] == "ok").all()


# --------------------------------------------------------------------------- metrics.json


@pytest.mark.parametrize("damage", ["a list", "truncated", "no status"])
def test_a_damaged_metrics_json_is_named_shown_as_damaged_and_rerun(run_copy, capsys, caplog, damage):
    run_dir, suite_file, ids = run_copy
    damaged, intact = ids
    stamps = _stamps(run_dir, ids)
    path = run_dir / "cells" / damaged / "metrics.json"
    epochs_before = (run_dir / "cells" / damaged / "epochs.jsonl").read_text()
    text = path.read_text()
    path.write_text({"a list": "[1, 2]", "truncated": text[:40], "no status": '{"test_accuracy": 0.5}'}[damage])

    code, err, warnings = _report(run_dir, capsys, caplog)
    assert code == 0 and err == []
    line = _one_line_naming(warnings, str(path))
    assert "runs it again" in line
    report = (run_dir / "report" / "report.md").read_text()
    summary = report.split("cells: ", 1)[1].split(".", 1)[0]
    assert sorted(summary.split(", ")) == ["1 damaged", "1 ok"] and "pending" not in report

    code, err, warnings = _run(run_dir, suite_file, capsys, caplog)
    assert code == 0 and not any("Traceback" in line for line in err)
    _one_line_naming(warnings, str(path))
    assert json.loads(path.read_text())["status"] == "ok"  # redone
    assert _stamps(run_dir, [intact]) == {intact: stamps[intact]}  # the intact cell was not run again
    # Redone from its checkpoint: the two finished epochs are not trained again.
    assert (run_dir / "cells" / damaged / "epochs.jsonl").read_text() == epochs_before
    assert (pd.read_csv(run_dir / "results.csv")["status"] == "ok").all()


# --------------------------------------------------------------------------- environment.json


def test_a_corrupt_environment_json_is_named_and_rewritten_by_the_next_run(run_copy, capsys, caplog):
    run_dir, suite_file, ids = run_copy
    path = run_dir / "environment.json"
    path.write_text(path.read_text()[:100])
    code, err, warnings = _report(run_dir, capsys, caplog)
    assert code == 0 and err == []
    assert "leaves the environment out" in _one_line_naming(warnings, str(path))
    code, _, _ = _run(run_dir, suite_file, capsys, caplog)
    assert code == 0 and "packages" in json.loads(path.read_text())
