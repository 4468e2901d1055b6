"""The `gmbench` command line: version, help on every command, one-line user errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmbench import __version__, cli
from gmbench.errors import GmbenchError


def run_gmbench(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "gmbench", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gmbench {__version__}"


def test_console_script_version_matches_the_package():
    # The installed console script next to this interpreter (pyproject [project.scripts]).
    script = Path(sys.executable).with_name("gmbench")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"gmbench {__version__}"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gmbench {command}")
    assert "--help" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: gmbench")


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plugins", "--kind", "nope"], "gmbench plugins: error: unknown plugin kind 'nope'; kinds are: "),
        (["plugins", "--load", "no_such_gmbench_module"], "gmbench plugins: error: cannot import plugin module 'no_such_gmbench_module'"),
        (["footprint", "1/128->8/x->10"], "gmbench footprint: error: layout '1/128->8/x->10': entry 2 '8/x'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message, capsys):
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_debug_raises_user_errors_with_their_traceback():
    with pytest.raises(GmbenchError, match="entry 2 '8/x'"):
        cli.main(["--debug", "footprint", "1/128->8/x->10"])


def test_user_error_in_a_real_process_has_no_traceback_unless_debug():
    plain = run_gmbench("footprint", "1/128->8/x->10")
    assert plain.returncode == 2
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("gmbench footprint: error: layout '1/128->8/x->10'")

    debug = run_gmbench("--debug", "footprint", "1/128->8/x->10")
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "gmbench.layout.LayoutError: layout '1/128->8/x->10'" in debug.stderr
