"""``gmbench fit --param/--dataset-param KEY=VALUE``: values read as a suite reads them and
checked like a suite's plugin parameters, before any data are loaded or fitted."""

from __future__ import annotations

import pytest

from gmbench import cli
from gmbench.commands.fit import parse_assignments
from gmbench.errors import GmbenchError


def fit_error(capsys, tmp_path, *args: str) -> str:
    cache = tmp_path / "cache"
    code = cli.main(["fit", "digits", "--cache-dir", str(cache), "--no-progress", *args])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == "" and not cache.exists()  # nothing fitted, nothing cached
    assert lines[0].startswith("gmbench fit: error: ")
    return lines[0][len("gmbench fit: error: "):]


def test_param_of_the_wrong_type_names_option_plugin_parameter_and_type(capsys, tmp_path):
    message = fit_error(capsys, tmp_path, "-n", "4", "--param", "iterations=abc")
    assert message.startswith("--param iterations: input_fitting plugin 'kmeans': iterations must be an integer, got 'abc'")


def test_param_outside_the_documented_choices(capsys, tmp_path):
    message = fit_error(capsys, tmp_path, "-n", "4", "--param", "init=random")
    assert message.startswith("--param init: input_fitting plugin 'kmeans': init must be one of 'kmeans++', 'fps'")


def test_unknown_param_lists_the_accepted_ones(capsys, tmp_path):
    message = fit_error(capsys, tmp_path, "-n", "4", "--param", "iteration=3")
    assert "has no parameter 'iteration'" in message and "iterations" in message


def test_dataset_param_of_the_wrong_type(capsys, tmp_path):
    message = fit_error(capsys, tmp_path, "-n", "4", "--dataset-param", "test_fraction=lots")
    assert message.startswith("--dataset-param test_fraction: dataset plugin 'digits': test_fraction must be a number")


def test_a_yaml_tag_in_a_param_is_rejected(capsys, tmp_path):
    marker = tmp_path / "executed"
    message = fit_error(capsys, tmp_path, "-n", "4", "--param", f"x=!!python/object/apply:os.system ['touch {marker}']")
    assert message.startswith("--param x: YAML tag '!!python/object/apply:os.system' is not allowed")
    assert not marker.exists()


@pytest.mark.parametrize("n", ["0", "1000000", "100000000000"])
def test_gaussian_counts_outside_the_bound(capsys, tmp_path, n):
    message = fit_error(capsys, tmp_path, "-n", n)
    assert message.startswith("--gaussians must be between 1 and 65,536")


def test_values_are_read_like_a_suite_reads_them():
    params = parse_assignments(["tolerance=1e-3", "iterations=5", "init=fps", "reg_covar=1.0e6", "levels=null"], "--param")
    assert params == {"tolerance": 1e-3, "iterations": 5, "init": "fps", "reg_covar": 1.0e6, "levels": None}
    assert type(params["tolerance"]) is float


def test_invalid_yaml_value_is_one_line():
    with pytest.raises(GmbenchError, match=r"^--param x: not valid YAML"):
        parse_assignments(["x=[unclosed"], "--param")
