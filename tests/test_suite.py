"""Suite schema, validation messages (file:line + allowed values) and matrix expansion."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from suite_cli import GMCN_DIGITS_BASE

from gmbench.errors import SuiteError
from gmbench.suite import cell_id, load_suite, parse_suite, shrink_layout

SUITES = sorted((Path(__file__).resolve().parent.parent / "suites").glob("*.yaml"))

BASE = GMCN_DIGITS_BASE + """\
    reduction: treehem
    reduction_params: {T: 2}
"""


def parse(text: str, **kwargs):
    return parse_suite(textwrap.dedent(text), "s.yaml", **kwargs)


def error_of(text: str) -> str:
    with pytest.raises(SuiteError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------- expansion


def test_matrix_is_the_cartesian_product_of_its_axes():
    suite = parse(BASE + "matrix:\n  seed: [0, 1, 2]\n  n_gaussians: [16, 32]\n")
    assert len(suite.cells) == 6
    assert sorted((c.config["seed"], c.config["n_gaussians"]) for c in suite.cells) == [
        (s, n) for s in (0, 1, 2) for n in (16, 32)
    ]


def test_placeholders_n_gaussians_resolved_and_num_classes_kept_for_the_runner():
    suite = parse(BASE + "matrix:\n  n_gaussians: [16, 32]\n")
    layouts = [c.config["model_params"]["layout"] for c in suite.cells]
    assert layouts == ["1/16->8/8->{num_classes}", "1/32->8/8->{num_classes}"]


def test_dotted_axis_sets_a_nested_parameter_and_keeps_siblings():
    suite = parse(BASE + "matrix:\n  model_params.reduction_params.T: [2, 4]\n")
    params = [c.config["model_params"] for c in suite.cells]
    assert [p["reduction_params"]["T"] for p in params] == [2, 4]
    assert all(p["reduction"] == "treehem" and "layout" in p for p in params)


def test_mapping_axis_values_are_deep_merged_into_the_cell():
    suite = parse(BASE + """\
matrix:
  variant:
    - {label: tree4, model_params: {reduction_params: {T: 4}}}
    - {label: mem, model_params: {reduction: mem, reduction_params: {}}}
""")
    first, second = (c.config for c in suite.cells)
    assert first["label"] == "tree4" and first["model_params"]["reduction_params"] == {"T": 4}
    assert first["model_params"]["layout"] == "1/16->8/8->{num_classes}"
    assert second["model_params"]["reduction"] == "mem"


def test_matrix_blocks_are_concatenated_and_exclude_drops_matching_cells():
    suite = parse(BASE + """\
matrix:
  - {seed: [0, 1]}
  - {seed: [2], n_gaussians: [32]}
exclude:
  - {seed: 1}
""")
    assert sorted(c.config["seed"] for c in suite.cells) == [0, 2]


def test_cell_ids_are_stable_and_independent_of_key_order():
    one = parse(BASE + "matrix:\n  seed: [0, 1]\n")
    reordered = parse("""\
cell:
  model_params:
    reduction_params: {T: 2}
    reduction: treehem
    layout: "1/{n_gaussians}->8/8->{num_classes}"
  n_gaussians: 16
  model: gmcn
  dataset: digits
name: other-name
matrix:
  seed: [0, 1]
""")
    assert [c.id for c in one.cells] == [c.id for c in reordered.cells]
    assert len({c.id for c in one.cells}) == 2
    assert one.cells[0].id == cell_id(one.cells[0].config)
    assert all(len(c.id) == 10 for c in one.cells)


PINNED = BASE + """\
matrix:
  seed: [0, 1]
  variant:
    - {label: tree, training: {epochs: 3, lr: 1.0e-3}}
    - {label: points, model: pointnet, input: points, model_params: {}}
"""


@pytest.mark.parametrize("smoke, ids", [
    (False, ["d34460073b", "ff492eb23c", "024072df46", "65e819f4d8"]),
    (True, ["7f98b8e293", "086580a2b1", "a1c6f8d9ac", "9c90bac029"]),
])
def test_cell_ids_are_those_of_earlier_versions_so_old_run_folders_resume(smoke, ids):
    # Computed by the single-module suite.py that the suite package replaced.
    assert [c.id for c in parse(PINNED, smoke=smoke).cells] == ids


def test_changing_any_setting_changes_the_cell_id():
    a = parse(BASE).cells[0].id
    b = parse(BASE.replace("{T: 2}", "{T: 4}")).cells[0].id
    c = parse(BASE + "  training: {epochs: 3}\n").cells[0].id
    assert len({a, b, c}) == 3


def test_defaults_are_filled_into_the_resolved_cell():
    config = parse(BASE).cells[0].config
    assert config["task"] == "train" and config["seed"] == 0 and config["input"] == "gm"
    assert config["input_fitting"] == "kmeans" and config["training"] == {}


def test_smoke_shrinks_epochs_samples_and_gaussians_including_the_layout():
    text = BASE.replace("n_gaussians: 16", "n_gaussians: 128").replace("{n_gaussians}->8/8", "{n_gaussians}->8/64")
    config = parse(text + "  training: {epochs: 60}\n", smoke=True).cells[0].config
    assert config["training"]["epochs"] == 1
    assert config["train_samples"] == 48 and config["test_samples"] == 24
    assert config["n_gaussians"] == 16
    assert config["model_params"]["layout"] == "1/16->8/8->{num_classes}"


def test_smoke_divides_all_sizes_by_one_factor_so_they_stay_apart():
    # Table 1's columns (32 / 64 / 128 Gaussians) must stay three columns in a smoke run.
    text = BASE + "matrix:\n  n_gaussians: [32, 64, 128]\n"
    sizes = [cell.config["n_gaussians"] for cell in parse(text, smoke=True).cells]
    assert sizes == [4, 8, 16]
    layouts = [cell.config["model_params"]["layout"] for cell in parse(text, smoke=True).cells]
    assert layouts == ["1/4->8/2->{num_classes}", "1/8->8/2->{num_classes}", "1/16->8/2->{num_classes}"]


def test_shrink_layout_divides_every_gaussian_count_but_keeps_at_least_two():
    assert shrink_layout("1/128->8/64->16/32->32/16->64/8->10", 8) == "1/16->8/8->16/4->32/2->64/2->10"


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_shipped_suite_validates(path):
    suite = load_suite(path)
    assert suite.cells
    smoke = load_suite(path, smoke=True)
    # Shrunk input sizes may make cells identical; they run once, but every method stays.
    assert 1 <= len(smoke.cells) <= len(suite.cells)
    assert {c.config.get("label") for c in smoke.cells} == {c.config.get("label") for c in suite.cells}


def test_shipped_suites_include_every_ablation_of_the_paper():
    names = {p.stem for p in SUITES}
    assert {
        "quickstart", "modelnet10", "modelnet10-reduction", "modelnet10-input-fitting", "modelnet10-depth",
        "modelnet10-input-size", "mnist", "modelnet40", "transfer-fitting", "footprint",
    } <= names


# ----------------------------------------------------------------- errors


def test_unknown_top_level_key_names_the_line_and_the_allowed_keys():
    message = error_of(BASE + "matrixx:\n  seed: [0]\n")
    assert message.startswith("s.yaml:10:")
    assert "unknown top-level key 'matrixx'" in message and "matrix" in message


def test_unknown_cell_field_is_reported_with_its_line():
    message = error_of(BASE + "  epochs: 3\n")
    assert message.startswith("s.yaml:10:") and "unknown cell field 'epochs'" in message
    assert "training" in message  # the allowed fields are listed


def test_wrong_type_is_reported():
    message = error_of(BASE.replace("n_gaussians: 16", "n_gaussians: many"))
    assert message.startswith("s.yaml:5:") and "'n_gaussians' must be an integer" in message


def test_unknown_plugin_lists_the_available_ones():
    message = error_of(BASE.replace("model: gmcn", "model: gmnc"))
    assert message.startswith("s.yaml:4:")
    assert "unknown model plugin 'gmnc'" in message and "gmcn" in message and "pointnet" in message


def test_unknown_model_parameter_lists_the_accepted_ones():
    message = error_of(BASE + "    kernel_gausians: 5\n")
    assert message.startswith("s.yaml:10:")
    assert "model plugin 'gmcn' has no parameter 'kernel_gausians'" in message
    assert "kernel_gaussians: int = 5" in message


def test_nested_reduction_parameter_is_checked_against_the_reduction_plugin():
    message = error_of(BASE.replace("{T: 2}", "{Q: 2}"))
    assert message.startswith("s.yaml:9:")
    assert "reduction plugin 'treehem' has no parameter 'Q'" in message and "T: int = 2" in message


def test_nested_reduction_name_is_checked():
    message = error_of(BASE.replace("reduction: treehem", "reduction: treehemm"))
    assert message.startswith("s.yaml:8:")
    assert "unknown reduction plugin 'treehemm'" in message and "mem" in message


def test_nested_params_of_the_default_reduction_are_checked_too():
    message = error_of(BASE.replace("    reduction: treehem\n", "").replace("{T: 2}", "{virtual_pointz: 2}"))
    assert "reduction plugin 'treehem' has no parameter 'virtual_pointz'" in message


def test_error_in_a_matrix_value_points_at_the_matrix_line():
    message = error_of(BASE + "matrix:\n  model_params.reduction:\n    - treehem\n    - memm\n")
    assert message.startswith("s.yaml:13:") and "unknown reduction plugin 'memm'" in message


def test_unknown_training_field():
    message = error_of(BASE + "  training: {epoch: 3}\n")
    assert message.startswith("s.yaml:10:") and "unknown training field 'epoch'" in message and "epochs" in message


def test_mixture_model_cannot_take_points():
    message = error_of(BASE + "  input: points\n")
    assert message.startswith("s.yaml:10:") and "takes mixtures, not points" in message


def test_dataset_parameter_is_checked():
    message = error_of(BASE + "  dataset_params: {n_pointz: 3}\n")
    assert "dataset plugin 'digits' has no parameter 'n_pointz'" in message


def test_invalid_yaml_reports_the_line():
    message = error_of(BASE + "matrix: [unclosed\n")
    assert message.startswith("s.yaml:") and "not valid YAML" in message


def test_duplicate_keys_are_an_error_not_silently_overwritten():
    message = error_of(BASE + "  seed: 1\n  seed: 2\n")
    assert message.startswith("s.yaml:11:") and "duplicate key 'seed'" in message


def test_missing_required_field():
    message = error_of("name: t\ncell: {model: gmcn}\n")
    assert "every cell needs 'dataset'" in message


def test_unknown_task_lists_the_tasks():
    message = error_of("name: t\ntask: fly\n")
    assert message.startswith("s.yaml:2:") and "footprint" in message and "transfer_fitting_timing" in message


def test_unimportable_plugin_module_is_reported():
    message = error_of("name: t\nplugins: [no_such_module_xyz]\ncell: {dataset: digits, model: gmcn}\n")
    assert message.startswith("s.yaml:2:") and "no_such_module_xyz" in message


def test_missing_suite_file_is_a_user_error(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(tmp_path / "nope.yaml")


def test_report_tables_are_validated_with_lines():
    message = error_of(BASE + "report:\n  tables:\n    - {name: t1, paper: table99}\n")
    assert message.startswith("s.yaml:12:") and "unknown paper table 'table99'" in message and "table1" in message
    message = error_of(BASE + "report:\n  tables:\n    - {name: t1, colums: n_gaussians}\n")
    assert "unknown report table key 'colums'" in message and "columns" in message


def test_backend_params_are_checked_against_the_backend_plugin():
    message = error_of("backend: torch\nbackend_params: {cutof: 1.0e-5}\n" + BASE)
    assert message.startswith("s.yaml:2:") and "no parameter 'cutof'" in message and "cutoff" in message


def test_backend_params_reach_the_suite():
    suite = parse("backend_params: {cutoff: 1.0e-5}\n" + BASE)
    assert suite.backend_params == {"cutoff": 1.0e-5}


@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_input_fitting_cells_fit_their_gaussian_count(smoke):
    # Plugin parameters that only fail at fitting time (Eckart's per_node ** levels must not
    # exceed n_gaussians) must hold for the shipped suites, shrunk by --smoke too.
    import torch

    from gmbench import plugins

    points = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(0))
    checked = 0
    for path in SUITES:
        for cell in load_suite(path, smoke=smoke).cells:
            config = cell.config
            if config.get("task") != "train" or config.get("input_fitting") != "eckart":
                continue
            fitting = plugins.create("input_fitting", "eckart", **config["input_fitting_params"])
            fitted = fitting.fit(points, config["n_gaussians"])
            assert fitted.shape[-2] == config["n_gaussians"]
            checked += 1
    assert checked


def test_smoke_shrinks_the_gaussian_counts_report_tables_filter_on():
    text = BASE + (
        "matrix:\n  n_gaussians: [64, 128]\n"
        "report:\n  tables:\n"
        "    - {name: t64, title: a, where: {n_gaussians: 64}, rows: [label]}\n"
        "    - {name: both, title: b, where: {n_gaussians: [64, 128]}, rows: [label]}\n"
    )
    full, smoke = parse(text), parse(text, smoke=True)
    assert [t["where"] for t in full.report["tables"]] == [{"n_gaussians": 64}, {"n_gaussians": [64, 128]}]
    assert [c.config["n_gaussians"] for c in smoke.cells] == [8, 16]
    assert [t["where"] for t in smoke.report["tables"]] == [{"n_gaussians": 8}, {"n_gaussians": [8, 16]}]
