"""Shared by the suite tests: run ``gmbench run`` in-process on a suite that must be rejected."""

from __future__ import annotations

from pathlib import Path

from gmbench import cli

PREFIX = "gmbench run: error: "


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
