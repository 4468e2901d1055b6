"""Every value that would fail in every cell is a suite error before anything runs:
training ranges, GMCN layouts, sizes that cannot work, plugin parameters by type and choice.

Each case goes through ``gmbench run`` (with and without ``--dry-run``): exit code 2, one
line ``file:line: field: ...`` on stderr, no traceback, no run folder.
"""

from __future__ import annotations

import pytest
from suite_cli import GMCN_DIGITS_BASE, rejected

from gmbench.errors import SuiteError
from gmbench.suite import parse_suite

BASE = GMCN_DIGITS_BASE  # 7 lines: what a case appends starts on line 8


def check(tmp_path, capsys, text: str, line: int, *parts: str, dry_run: bool = True) -> str:
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    message = rejected(suite, capsys, tmp_path, dry_run)
    assert message.startswith(f"{suite}:{line}: "), message
    for part in parts:
        assert part in message, message
    return message


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("training, field", [
    ("{lr: 0}", "lr"), ("{lr: -1.0e-3}", "lr"), ("{batch_size: 0}", "batch_size"), ("{batch_size: -21}", "batch_size"),
    ("{epochs: 0}", "epochs"), ("{epochs: 2.5}", "epochs"), ("{lr_factor: 1}", "lr_factor"), ("{lr_factor: 1.5}", "lr_factor"),
    ("{lr_factor: 0}", "lr_factor"), ("{lr_factor: -0.1}", "lr_factor"), ("{lr_patience: -1}", "lr_patience"),
    ("{lr_patience: 1.5}", "lr_patience"), ("{lr_cooldown: -1}", "lr_cooldown"), ("{grad_clip: 0}", "grad_clip"),
    ("{grad_clip: -1.0}", "grad_clip"), ("{eval_batch_size: 0}", "eval_batch_size"), ("{lr: .inf}", "lr"),
    ("{lr: .nan}", "lr"), ("{epochs: true}", "epochs"), ("{batch_size: many}", "batch_size"),
    ("{lr_schedule: linear}", "lr_schedule"), ("{lr_schedule: 3}", "lr_schedule"),
    ("{precise_bn_samples: 1}", "precise_bn_samples"), ("{precise_bn_samples: 2.5}", "precise_bn_samples"),
])
def test_training_field_out_of_range_or_of_the_wrong_type(tmp_path, capsys, training, field, dry_run):
    check(tmp_path, capsys, BASE + f"  training: {training}\n", 8, f"'{field}'", dry_run=dry_run)


def test_training_error_points_at_the_line_of_its_field(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "  training:\n    epochs: 3\n    lr: 0\n", 10, "training.lr", "must be positive")


def test_training_error_in_a_matrix_value_points_at_the_matrix_line(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "matrix:\n  training.lr: [1.0e-3, -1]\n", 9, "'lr'", "must be positive")


def test_training_fields_within_their_ranges_are_accepted():
    training = "{epochs: 1, batch_size: 1, lr: 1.0e6, lr_factor: 0.5, lr_patience: 0, lr_cooldown: 0, grad_clip: null, eval_batch_size: 7, precise_bn_samples: 500, lr_schedule: cosine}"
    config = parse_suite(BASE + f"  training: {training}\n", "s.yaml").cells[0].config
    assert config["training"]["lr"] == 1.0e6 and config["training"]["eval_batch_size"] == 7
    assert config["training"]["precise_bn_samples"] == 500


# ----------------------------------------------------------------- layouts


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("layout, parts", [
    ("banana", ["model_params.layout", "'banana'"]),
    ("'1/{n}->4/x->->{c}'", ["model_params.layout", "unknown placeholder '{n}'"]),
    ("'1/{n_gaussians}->8/8->{classes}'", ["unknown placeholder '{classes}'", "{num_classes}"]),
    ("'1/{n_gaussians}->0/8->{num_classes}'", ["model_params.layout", "'0/8'", ">= 1"]),
    ("'1/{n_gaussians}->8/8->0'", ["model_params.layout", "number of classes"]),
    ("'1/{n_gaussians}->4/x->{num_classes}'", ["model_params.layout", "'4/x'"]),
    ("5", ["model_params.layout", "must be a string", "got 5"]),
    ("'2/{n_gaussians}->8/8->{num_classes}'", ["must start with 1 channel"]),
    ("'1/32->8/8->{num_classes}'", ["starts with 32 Gaussians", "n_gaussians = 16"]),
    ("'1/{n_gaussians}->8/100000->{num_classes}'", ["100,000 Gaussians", "65,536"]),
])
def test_every_cells_layout_is_parsed_at_validation(tmp_path, capsys, layout, parts, dry_run):
    text = BASE.replace('    layout: "1/{n_gaussians}->8/8->{num_classes}"\n', f"    layout: {layout}\n")
    check(tmp_path, capsys, text, 7, *parts, dry_run=dry_run)


def test_a_bad_layout_in_one_matrix_value_names_the_matrix_line(tmp_path, capsys):
    text = BASE + "matrix:\n  model_params.layout:\n    - '1/{n_gaussians}->8/8->{num_classes}'\n    - '1/{n_gaussians}->->{num_classes}'\n"
    check(tmp_path, capsys, text, 11, "model_params.layout", "entry 2")


def test_the_default_layout_must_fit_the_cells_gaussian_count(tmp_path, capsys):
    # gmcn's default layout starts with 128 Gaussians; the cell fits 16.
    text = BASE.replace('  model_params:\n    layout: "1/{n_gaussians}->8/8->{num_classes}"\n', "")
    check(tmp_path, capsys, text, 4, "starts with 128 Gaussians", "n_gaussians = 16")


def test_unknown_placeholder_in_any_model_parameter_string(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "    reduction: '{reduction}'\n", 8, "model_params.reduction", "unknown placeholder '{reduction}'")


# ----------------------------------------------------------------- sizes


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("n", [10**6, 10**11])
def test_gaussian_counts_no_fitting_can_handle_are_rejected(tmp_path, capsys, n, smoke, dry_run):
    # --smoke would divide the count down to 16: the bound is checked before it shrinks anything.
    suite = tmp_path / "suite.yaml"
    suite.write_text(BASE.replace("n_gaussians: 16", f"n_gaussians: {n}"))
    out = tmp_path / "run-folder"
    from gmbench import cli

    args = ["run", str(suite), "--out", str(out), "--no-progress", "--no-report"] + ["--smoke"] * smoke + ["--dry-run"] * dry_run
    assert cli.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and not out.exists()
    assert err[0].startswith(f"gmbench run: error: {suite}:5: n_gaussians = {n:,} is more than 65,536")


def test_more_gaussians_than_the_data_sets_points_per_sample(tmp_path, capsys):
    text = BASE.replace("dataset: digits", "dataset: shapes3d\n  dataset_params: {n_points: 64}").replace("n_gaussians: 16", "n_gaussians: 128")
    check(tmp_path, capsys, text, 6, "n_gaussians = 128 is more than the 64 points per sample", "dataset_params.n_points")


def test_more_gaussians_than_the_default_point_count(tmp_path, capsys):
    text = BASE.replace("dataset: digits", "dataset: shapes3d").replace("n_gaussians: 16", "n_gaussians: 2048")
    check(tmp_path, capsys, text, 5, "more than the 1,024 points per sample of data set 'shapes3d'")


def test_point_inputs_need_no_fitting_so_the_point_count_does_not_bound_them():
    text = "name: t\ncell: {dataset: shapes3d, dataset_params: {n_points: 64}, model: pointnet, input: points, n_gaussians: 128}\n"
    assert parse_suite(text, "s.yaml").cells[0].config["n_gaussians"] == 128


def test_a_matrix_with_too_many_cells_is_rejected_before_expanding():
    axes = "".join(f"  model_params.x{i}: [{', '.join(map(str, range(10)))}]\n" for i in range(8))
    with pytest.raises(SuiteError, match=r"^s\.yaml:9: this matrix block expands to 100,000,000 cells, more than the 10,000"):
        parse_suite(BASE + "matrix:\n" + axes, "s.yaml")


def test_blocks_together_may_not_exceed_the_cell_bound():
    block = "  - {model_params.x: [%s], seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}\n" % ", ".join(map(str, range(400)))
    with pytest.raises(SuiteError, match=r"^s\.yaml:11: this matrix block expands to 4,000 cells, .* \(8,000 before it\)"):
        parse_suite(BASE + "matrix:\n" + block * 3, "s.yaml")


def test_seed_must_not_be_negative(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "  seed: -1\n", 8, "'seed' must be between 0 and")


# ----------------------------------------------------------------- plugin parameters


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("text, line, parts", [
    (BASE + "    reduction_params: {T: two}\n", 8,
     ["model_params.reduction_params.T:", "reduction plugin 'treehem'", "T must be an integer", "'two'"]),
    (BASE + "    transfer_fitting_params: {variant: bogus}\n", 8,
     ["model_params.transfer_fitting_params.variant:", "transfer_fitting plugin 'dense'", "'paper'", "'bogus'"]),
    ("name: t\ncell:\n  dataset: digits\n  model: pointnet\n  input: points\n  model_params: {dropout: high}\n", 6,
     ["model_params.dropout:", "model plugin 'pointnet'", "dropout must be a number", "'high'"]),
    ("name: t\ncell:\n  dataset: digits\n  dataset_params: {test_fraction: lots}\n  model: pointnet\n  input: points\n", 4,
     ["dataset_params.test_fraction:", "dataset plugin 'digits'", "test_fraction must be a number", "'lots'"]),
    (BASE + "  input_fitting_params: {iterations: many}\n", 8,
     ["input_fitting_params.iterations:", "input_fitting plugin 'kmeans'", "iterations must be an integer", "'many'"]),
    (BASE + "  input_fitting: kmeans\n  input_fitting_params:\n    init: kmeans++\n    covariance: diagonal\n", 11,
     ["input_fitting_params.covariance:", "'full'", "'diagonal'"]),
    ("backend: torch\nbackend_params: {cutoff: small}\n" + BASE, 2,
     ["backend_params.cutoff:", "backend plugin 'torch'", "'small'"]),
    ("name: t\ntask: transfer_fitting_timing\ncell:\n  transfer_fitting: dense\n  transfer_fitting_params: {variant: bogus}\n", 5,
     ["transfer_fitting_params.variant:", "transfer_fitting plugin 'dense'", "'bogus'"]),
    (BASE + "    reduction: mem\nmatrix:\n  model_params.reduction_params.kl_threshold: [1.0, high]\n", 10,
     ["model_params.reduction_params.kl_threshold:", "reduction plugin 'mem'", "'high'"]),
])
def test_plugin_parameter_of_the_wrong_type_or_choice(tmp_path, capsys, text, line, parts, dry_run):
    check(tmp_path, capsys, text, line, *parts, dry_run=dry_run)



# Ranges the plugins check in __init__, not in their annotations: found by building the
# plugin during validation, before any cell runs (with and without --dry-run).
@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("text, line, parts", [
    ("name: t\ncell:\n  dataset: digits\n  dataset_params: {test_fraction: 2.0}\n  model: pointnet\n  input: points\n", 4,
     ["dataset_params.test_fraction:", "dataset plugin 'digits'", "test_fraction must be in (0, 1), got 2.0"]),
    (BASE + "    reduction_params: {T: 3}\n", 8,
     ["model_params.reduction_params.T:", "reduction plugin 'treehem'", "power of two", "got 3"]),
    (BASE + "    transfer_fitting_params: {eps: -1.0}\n", 8,
     ["model_params.transfer_fitting_params.eps:", "transfer_fitting plugin 'dense'", "eps must be positive"]),
    (BASE + "  input_fitting_params: {reg_covar: -0.5}\n", 8,
     ["input_fitting_params.reg_covar:", "input_fitting plugin 'kmeans'", "reg_covar must be a positive number"]),
])
def test_plugin_parameter_out_of_the_range_its_constructor_checks(tmp_path, capsys, text, line, parts, dry_run):
    check(tmp_path, capsys, text, line, *parts, dry_run=dry_run)

def test_nested_plugin_name_of_the_wrong_type(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "    reduction: 3\n", 8, "'model_params.reduction' must be a plugin name")


def test_nested_plugin_parameters_must_be_a_mapping(tmp_path, capsys):
    check(tmp_path, capsys, BASE + "    reduction_params: [T, 2]\n", 8, "'model_params.reduction_params' must be a mapping")
