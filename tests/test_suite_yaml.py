"""Reading a suite file: plain YAML data only, bounded aliases, YAML 1.2 floats, file errors."""

from __future__ import annotations

import pytest
from suite_cli import rejected

from gmbench.errors import SuiteError
from gmbench.suite import MAX_NODES, load_suite, load_yaml_with_lines, parse_suite
from gmbench.suite import yaml_lines

SUITE = """\
name: t
cell:
  dataset: digits
  model: gmcn
  n_gaussians: 16
  model_params: {layout: "1/{n_gaussians}->8/8->{num_classes}"}
"""

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- tags


@pytest.mark.parametrize("dry_run", [True, False])
def test_python_tag_on_a_list_valued_axis_is_rejected_and_never_executed(tmp_path, capsys, dry_run):
    marker = tmp_path / "executed"
    suite = write(tmp_path, SUITE + f'matrix:\n  seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    message = rejected(suite, capsys, tmp_path, dry_run)
    assert message.startswith(f"{suite}:8: YAML tag '!!python/object/apply:os.system' is not allowed")
    assert not marker.exists()


@pytest.mark.parametrize("tagged, line", [
    ("cell: !!python/object:collections.OrderedDict\n  dataset: digits\n", 2),  # on a mapping
    ("description: !!python/name:os.system\n", 2),  # on a scalar
    ("description: !!binary aGVsbG8=\n", 2),  # standard YAML, but not plain data
    ("plugins: !!set {a, b}\n", 2),
    ("description: !local value\n", 2),  # an application tag
    ("cell:\n  seed: !!python/int 3\n", 3),
])
def test_every_tag_that_is_not_plain_data_is_rejected_with_its_line(tagged, line):
    with pytest.raises(SuiteError) as info:
        parse_suite("name: t\n" + tagged, "s.yaml")
    assert str(info.value).startswith(f"s.yaml:{line}: YAML tag ")
    assert "not allowed" in str(info.value)


def test_standard_tags_of_plain_data_are_accepted():
    suite = parse_suite(SUITE + "  seed: !!int 3\n  label: !!str 42\n", "s.yaml")
    assert suite.cells[0].config["seed"] == 3 and suite.cells[0].config["label"] == "42"


# ----------------------------------------------------------------- aliases


@pytest.mark.parametrize("dry_run", [True, False])
def test_billion_laughs_is_rejected_naming_the_line_where_it_exceeds_the_bound(tmp_path, capsys, dry_run):
    suite = write(tmp_path, BILLION_LAUGHS)
    message = rejected(suite, capsys, tmp_path, dry_run)
    # 9**6 values under 'f' is the first node past MAX_NODES (9**5 < 100,000 < 9**6).
    assert message.startswith(f"{suite}:6: with its aliases (*name) expanded the document has more than {MAX_NODES:,} values")


def test_alias_bound_is_checked_before_any_python_object_is_built(monkeypatch):
    def no_build(*args):
        raise AssertionError("the expanded document was built")

    monkeypatch.setattr(yaml_lines, "_build", no_build)
    with pytest.raises(SuiteError, match="more than 100,000 values"):
        load_yaml_with_lines(BILLION_LAUGHS, "s.yaml")


def test_a_recursive_alias_is_rejected():
    with pytest.raises(SuiteError, match=r"^s\.yaml:2: an alias refers to a node that contains it"):
        parse_suite("name: t\ncell: &c {dataset: digits, model: gmcn, x: *c}\n", "s.yaml")


def test_aliases_and_merge_keys_within_the_bound_still_work():
    suite = parse_suite(
        "name: t\n"
        "cell: &shared {dataset: digits, model: gmcn, n_gaussians: 16,\n"
        "  model_params: {layout: '1/{n_gaussians}->8/8->{num_classes}'}}\n"
        "matrix:\n  variant:\n    - {<<: *shared, label: a}\n    - {label: b, seed: 1}\n",
        "s.yaml",
    )
    assert [c.config["label"] for c in suite.cells] == ["a", "b"]


def test_deeply_nested_yaml_is_one_line_error():
    with pytest.raises(SuiteError, match="nested too deeply"):
        parse_suite("name: t\ncell: " + "[" * 5000 + "]" * 5000 + "\n", "s.yaml")


# ----------------------------------------------------------------- numbers


@pytest.mark.parametrize("written, value", [
    ("1.0e6", 1.0e6), ("1e-3", 1e-3), ("-2.5E+2", -250.0), (".5e1", 5.0), ("1.0e-6", 1e-6), ("3", 3), ("1_000", 1000),
])
def test_numbers_are_read_as_yaml_1_2_writes_them(written, value):
    read = load_yaml_with_lines(f"x: {written}\n", "s.yaml")["x"]
    assert read == value and type(read) is type(value)


def test_quoted_exponent_stays_a_string():
    assert load_yaml_with_lines('x: "1e-3"\n', "s.yaml")["x"] == "1e-3"


def test_learning_rate_in_e_notation_is_a_number_in_the_cell():
    suite = parse_suite(SUITE + "  training: {lr: 1.0e6, grad_clip: 1e1}\n", "s.yaml")
    assert suite.cells[0].config["training"] == {"lr": 1.0e6, "grad_clip": 10.0}


# ----------------------------------------------------------------- the file itself


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, capsys, dry_run):
    suite = tmp_path / "latin1.yaml"
    suite.write_bytes("name: t\ncell:\n  label: caf\u00e9\n".encode("latin-1"))
    message = rejected(suite, capsys, tmp_path, dry_run)
    assert message == f"{suite}:3: the file is not UTF-8 text (byte 0xe9); save it as UTF-8"


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_directory_as_the_suite_path_says_it_is_a_directory(tmp_path, capsys, dry_run):
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "a.yaml").write_text(SUITE)
    message = rejected(folder, capsys, tmp_path, dry_run)
    assert message == f"suite path '{folder}' is a directory (it holds a.yaml); pass the path of one YAML suite file"


def test_a_control_character_names_its_line():
    with pytest.raises(SuiteError, match=r"^s\.yaml:2: not valid YAML \(character U\+0000 is not allowed in YAML\)"):
        parse_suite("name: t\ndescription: a\x00b\n", "s.yaml")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + SUITE.encode())
    assert load_suite(path).name == "t"


def test_console_run_of_a_tagged_suite_prints_one_line_and_nothing_else(tmp_path):
    # The whole console path (interpreter start, plugin loading, logging): still one line.
    import os
    import subprocess
    import sys

    marker = tmp_path / "executed"
    suite = write(tmp_path, SUITE + f'matrix:\n  seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "gmbench", "run", str(suite), "--dry-run", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"gmbench run: error: {suite}:8: YAML tag '!!python/object/apply:os.system' is not allowed: only plain data "
        "(mappings, lists, strings, numbers, true/false, null); remove the tag"
    ]
    assert not marker.exists() and not (tmp_path / "out").exists()
