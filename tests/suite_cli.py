"""Shared by the suite tests: a base suite text, and ``gmbench run`` in-process on a suite that must be rejected."""

from __future__ import annotations

from pathlib import Path

from gmbench import cli

PREFIX = "gmbench run: error: "

# A GMCN cell on digits, 7 lines: the suite tests append their case (the validation tests
# count on it starting on line 8).
GMCN_DIGITS_BASE = """\
name: t
cell:
  dataset: digits
  model: gmcn
  n_gaussians: 16
  model_params:
    layout: "1/{n_gaussians}->8/8->{num_classes}"
"""


def rejected(suite: Path, capsys, tmp_path: Path, dry_run: bool) -> str:
    """Run ``gmbench run SUITE [--dry-run]`` and assert a user error: exit code 2, exactly one
    line on stderr and no traceback, nothing listed or run, no run folder.  Returns the message."""
    out = tmp_path / "run-folder"
    args = ["run", str(suite), "--out", str(out), "--no-progress", "--no-report"] + (["--dry-run"] if dry_run else [])
    code = cli.main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert lines[0].startswith(PREFIX)
    assert captured.out == ""  # not even the cell list of --dry-run
    assert not out.exists()
    return lines[0][len(PREFIX):]
