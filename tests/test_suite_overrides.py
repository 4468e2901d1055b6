"""``gmbench run SUITE --set PATH=VALUE``: overrides change the cells exactly like an edited
suite file would, are checked like the file, name themselves in errors, and are recorded
in (and compared against) the run folder."""

from __future__ import annotations

import json

import pytest

from gmbench import cli
from gmbench.errors import SuiteError
from gmbench.suite import parse_suite

# test_blobs / test_meanpool (tests/runner_plugins.py): a run takes about a second.
BLOBS = """\
name: blobs
plugins: [runner_plugins]
cell:
  dataset: test_blobs
  model: test_meanpool
  input: points
  n_gaussians: 4
  training: {epochs: 1, batch_size: 20}
matrix:
  seed: [0, 1, 2]
  variant:
    - {label: small, model_params: {hidden: 8}}
    - {label: large, model_params: {hidden: 32}, training: {lr: 0.01}}
exclude:
  - {label: large, seed: 2}
"""

GMCN = """\
name: gmcn
cell:
  dataset: digits
  n_gaussians: 8
  training: {epochs: 4, batch_size: 21}
matrix:
  variant:
    - {label: TreeHEM, model: gmcn, model_params: {layout: "1/{n_gaussians}->4/4->{num_classes}", reduction: treehem, reduction_params: {T: 2}}}
    - {label: MEM, model: gmcn, model_params: {layout: "1/{n_gaussians}->4/4->{num_classes}", reduction: mem}}
"""

PREFIX = "gmbench run: error: "


def configs(suite) -> dict:
    return {cell.id: cell.config for cell in suite.cells}


def edited(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# --------------------------------------------------------------------------- the cells


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize(
    "overrides, old, new",
    [
        (["training.epochs=5"], "training: {epochs: 1, batch_size: 20}", "training: {epochs: 5, batch_size: 20}"),
        (["n_gaussians=6"], "n_gaussians: 4", "n_gaussians: 6"),
        (["training.lr=1.0e-3"], "training: {epochs: 1, batch_size: 20}", "training: {epochs: 1, batch_size: 20, lr: 0.001}"),
        (["train_samples=30", "test_samples=15"], "  n_gaussians: 4\n", "  n_gaussians: 4\n  train_samples: 30\n  test_samples: 15\n"),
    ],
)
def test_an_override_of_a_cell_field_gives_the_cells_of_the_edited_file(overrides, old, new, smoke):
    if overrides == ["training.lr=1.0e-3"]:
        # The 'large' variant sets lr: the override wins there too, as if the variant said 0.001.
        new_text = edited(edited(BLOBS, old, new), "training: {lr: 0.01}", "training: {lr: 0.001}")
    else:
        new_text = edited(BLOBS, old, new)
    overridden = parse_suite(BLOBS, "blobs.yaml", smoke=smoke, overrides=overrides)
    assert configs(overridden) == configs(parse_suite(new_text, "blobs.yaml", smoke=smoke))
    if not smoke:  # (--smoke makes every cell one epoch, so there an epochs override changes nothing)
        assert set(configs(overridden)).isdisjoint(configs(parse_suite(BLOBS, "blobs.yaml")))


def test_an_override_is_applied_before_smoke_shrinks_the_cells():
    # --smoke makes every training cell one epoch, whatever the file or --set says.
    suite = parse_suite(BLOBS, "blobs.yaml", smoke=True, overrides=["training.epochs=5"])
    assert {cell.config["training"]["epochs"] for cell in suite.cells} == {1}


def test_an_override_of_a_matrix_axis_replaces_the_axis():
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=["seed=1"])
    assert configs(suite) == configs(parse_suite(edited(BLOBS, "seed: [0, 1, 2]", "seed: [1]"), "blobs.yaml"))
    assert sorted((c.config["label"], c.config["seed"]) for c in suite.cells) == [("large", 1), ("small", 1)]


def test_exclude_sees_the_overridden_values():
    # 'large' with seed 2 is excluded in the file; with --set seed=2 only 'small' is left.
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=["seed=2"])
    assert [(c.config["label"], c.config["seed"]) for c in suite.cells] == [("small", 2)]


def test_an_override_wins_over_what_a_variant_sets():
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=["model_params.hidden=12"])
    assert {cell.config["model_params"]["hidden"] for cell in suite.cells} == {12}
    assert len(suite.cells) == 5  # 3 seeds x 2 variants, less the excluded one: the labels (and lr) still differ


def test_a_dotted_path_reaches_nested_plugin_parameters():
    suite = parse_suite(GMCN, "gmcn.yaml", overrides=["model_params.reduction=treehem", "model_params.reduction_params.T=4"])
    expected = parse_suite(edited(edited(GMCN, "reduction_params: {T: 2}", "reduction_params: {T: 4}"), "reduction: mem}", "reduction: treehem, reduction_params: {T: 4}}"), "gmcn.yaml")
    assert configs(suite) == configs(expected)
    assert [cell.config["model_params"]["reduction_params"] for cell in suite.cells] == [{"T": 4}, {"T": 4}]


def test_overrides_apply_in_order_and_a_mapping_merges_or_resets():
    merged = parse_suite(BLOBS, "blobs.yaml", overrides=["training={epochs: 3}", "training.batch_size=10"])
    assert {json.dumps(c.config["training"], sort_keys=True) for c in merged.cells} == {
        '{"batch_size": 10, "epochs": 3}', '{"batch_size": 10, "epochs": 3, "lr": 0.01}',
    }
    later_wins = parse_suite(BLOBS, "blobs.yaml", overrides=["training.epochs=3", "training.epochs=2"])
    assert {c.config["training"]["epochs"] for c in later_wins.cells} == {2}
    reset = parse_suite(BLOBS, "blobs.yaml", overrides=["training={}"])
    assert {json.dumps(c.config["training"]) for c in reset.cells} == {"{}"}


@pytest.mark.parametrize(
    "item, value",
    [("training.lr=1.0e-3", 0.001), ("training.lr=1e-3", 0.001), ("training.lr=.5E-2", 0.005), ("training.lr = 2e-3", 0.002)],
)
def test_values_are_read_like_the_suite_reads_them(item, value):
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=[item])
    assert {cell.config["training"]["lr"] for cell in suite.cells} == {value}
    assert suite.overrides == [item.replace(" ", "")]


def test_a_quoted_value_stays_a_string():
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=['label="1e-3"'])
    assert {cell.config["label"] for cell in suite.cells} == {"1e-3"}
    with pytest.raises(SuiteError, match=r"^--set label=1e-3: cell field 'label' must be a string or null, got float 0.001$"):
        parse_suite(BLOBS, "blobs.yaml", overrides=["label=1e-3"])


def test_the_resolved_suite_records_the_overrides():
    suite = parse_suite(BLOBS, "blobs.yaml", overrides=["training.epochs=2", "seed=0"])
    assert suite.to_json()["overrides"] == ["training.epochs=2", "seed=0"]
    assert suite.text == (
        "# Run with command-line overrides, applied to every cell after the matrix (docs/suites.md):\n"
        "#   --set training.epochs=2\n#   --set seed=0\n" + BLOBS
    )
    plain = parse_suite(BLOBS, "blobs.yaml")
    assert plain.text == BLOBS and plain.to_json()["overrides"] == []


# --------------------------------------------------------------------------- errors


def run_cli(tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    suite = tmp_path / "blobs.yaml"
    if not suite.exists():
        suite.write_text(BLOBS)
    code = cli.main(["run", str(suite), "--no-progress", "--no-report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BILLION_LAUGHS = "training={" + ", ".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 10) + "]" for i in range(6)
) + "}"


@pytest.mark.parametrize(
    "item, message",
    [
        ("training.epochs=0", "--set training.epochs=0: training.epochs: training parameter 'epochs' = 0 must be at least 1; fix the option"),
        ("training.epochs=five", "--set training.epochs=five: training field 'epochs' must be an integer, got 'five'"),
        ("training.epoch=5", "--set training.epoch=5: unknown training field 'epoch'; allowed: epochs, "),
        ("n_gaussians=abc", "--set n_gaussians=abc: cell field 'n_gaussians' must be an integer, got str 'abc'"),
        ("n_gaussians=0", "--set n_gaussians=0: 'n_gaussians' must be between 1 and 65,536, got 0"),
        ("seed=[0, 1]", "--set seed=[0, 1]: cell field 'seed' must be an integer, got list [0, 1]; --set gives every cell this one value: to run several, make 'seed' a matrix axis"),
        ("gaussians=8", "--set gaussians=8: unknown cell field 'gaussians' for task 'train'; --set takes a cell field or a dotted path into one: label, "),
        ("matrix.seed=[0]", "--set matrix.seed=[0]: 'matrix' is a top-level suite key, not a cell field; --set sets cell fields only (edit the matrix"),
        ("backend=torch", "--set backend=torch: 'backend' is a top-level suite key, not a cell field; --set sets cell fields only (use --backend)"),
        ("seed.value=1", "--set seed.value=1: 'seed' is not a mapping, so 'seed.value' is no path into the cell; only mapping fields ("),
        ("model_params.hidden=wide", "--set model_params.hidden=wide: model_params.hidden: model plugin 'test_meanpool': hidden must be an integer, got 'wide'"),
        ("model_params.depth=3", "--set model_params.depth=3: model_params.depth: model plugin 'test_meanpool' has no parameter 'depth'"),
        ("seed=!!python/object/apply:os.system [ls]", "--set seed=!!python/object/apply:os.system [ls]: YAML tag '!!python/object/apply:os.system' is not allowed"),
        ("training={epochs: 2", "--set training={epochs: 2: not valid YAML ("),
        (BILLION_LAUGHS, f"--set {BILLION_LAUGHS}: with its aliases (*name) expanded the document has more than 100,000 values"),
        ("training.epochs", "--set 'training.epochs' must look like PATH=VALUE with a dotted PATH, e.g. --set training.epochs=5"),
        ("training..epochs=5", "--set 'training..epochs=5' must look like PATH=VALUE"),
        ("=5", "--set '=5' must look like PATH=VALUE"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_bad_override_exits_2_with_one_line_naming_it(tmp_path, capsys, item, message, dry_run):
    out = tmp_path / "run"
    code, printed, err = run_cli(tmp_path, capsys, "--set", "training.batch_size=10", "--set", item, "--out", str(out), *(["--dry-run"] if dry_run else []))
    assert code == 2, err
    assert printed == "" and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(PREFIX + message), line
    assert not out.exists()


def test_an_error_of_the_file_in_an_overridden_cell_names_the_file_line_and_the_overrides(tmp_path):
    # The layouts start with {n_gaussians}; a literal one no longer fits the overridden size.
    text = GMCN.replace('"1/{n_gaussians}->4/4->{num_classes}", reduction: mem', '"1/8->4/4->{num_classes}", reduction: mem')
    with pytest.raises(SuiteError) as info:
        parse_suite(text, "gmcn.yaml", overrides=["n_gaussians=4", "training.epochs=1"])
    message = str(info.value)
    assert message.startswith("gmcn.yaml:9: model_params.layout '1/8->4/4->{num_classes}' starts with 8 Gaussians but the cell fits n_gaussians = 4")
    assert message.endswith(" (with --set n_gaussians=4, --set training.epochs=1)")


def test_an_override_that_suits_only_some_cells_names_the_option_and_the_cell():
    with pytest.raises(SuiteError) as info:
        parse_suite(GMCN, "gmcn.yaml", overrides=["model_params.reduction_params.T=4"])
    message = str(info.value)
    assert message.startswith("--set model_params.reduction_params.T=4: model_params.reduction_params.T: reduction plugin 'mem' has no parameter 'T'")
    assert message.endswith("(cell label=MEM, dataset=digits, model=gmcn, input=gm, n_gaussians=8, seed=0: --set gives every cell the value; to change only some cells, edit the suite)")


# --------------------------------------------------------------------------- the CLI and the run folder


def test_dry_run_lists_the_overridden_cells(tmp_path, capsys):
    code, printed, _ = run_cli(tmp_path, capsys, "--dry-run", "--set", "seed=1", "--set", "training.epochs=2", "--out", str(tmp_path / "run"))
    assert code == 0
    expected = parse_suite(edited(edited(BLOBS, "seed: [0, 1, 2]", "seed: [1]"), "epochs: 1", "epochs: 2"), "blobs.yaml")
    lines = printed.splitlines()
    assert lines[0] == f"suite blobs --set seed=1 --set training.epochs=2: 2 cells -> {tmp_path / 'run'}"
    assert [line.split()[0] for line in lines[1:]] == [cell.id for cell in expected.cells]
    assert not (tmp_path / "run").exists()


def test_help_describes_set(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--set PATH=VALUE give every cell this value (repeatable)" in text
    assert "replaces an axis on PATH" in text


def test_the_run_folder_records_the_overrides_and_a_changed_one_needs_update(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["--out", str(out), "--set", "training.epochs=1", "--set", "seed=0"]
    code, printed, err = run_cli(tmp_path, capsys, *first)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["overrides"] == ["training.epochs=1", "seed=0"]
    assert sorted((c["config"]["label"], c["config"]["seed"]) for c in run["cells"]) == [("large", 0), ("small", 0)]
    recorded = (out / "suite.yaml").read_text()
    assert recorded.startswith("# Run with command-line overrides") and "#   --set seed=0\n" in recorded
    assert recorded.endswith(BLOBS)
    finished = {c["id"]: (out / "cells" / c["id"] / "metrics.json").stat().st_mtime_ns for c in run["cells"]}

    code, printed, _ = run_cli(tmp_path, capsys, *first)  # the same overrides resume: nothing to run
    assert code == 0 and "2 cells: 2 already done, 0 run" in printed

    changed = ["--out", str(out), "--set", "training.epochs=2", "--set", "seed=0"]
    code, printed, err = run_cli(tmp_path, capsys, *changed)
    assert code == 2
    (line,) = err.splitlines()
    assert "was started from a different version of suite 'blobs'" in line and "training.epochs" in line and "--update" in line
    assert json.loads((out / "run.json").read_text())["overrides"] == ["training.epochs=1", "seed=0"]  # untouched

    code, printed, err = run_cli(tmp_path, capsys, *changed, "--update")
    assert code == 0, err
    assert "2 cells: 0 already done, 2 run" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["overrides"] == ["training.epochs=2", "seed=0"]
    assert {c["config"]["training"]["epochs"] for c in run["cells"]} == {2}
    for cell_id, mtime in finished.items():  # the old cells' folders stay as they were
        assert (out / "cells" / cell_id / "metrics.json").stat().st_mtime_ns == mtime


def test_an_override_to_the_same_cells_is_not_a_change(tmp_path, capsys):
    # seed 0 is the default: --set seed=0 on a file without a seed axis gives the same cells.
    suite = tmp_path / "blobs.yaml"
    suite.write_text(BLOBS.replace("  seed: [0, 1, 2]\n", ""))
    out = ["--out", str(tmp_path / "run")]
    assert run_cli(tmp_path, capsys, *out)[0] == 0
    code, printed, err = run_cli(tmp_path, capsys, *out, "--set", "seed=0")
    assert code == 0, err
    assert "2 cells: 2 already done, 0 run" in printed
