"""Plugin parameter values checked against the plugins' ``__init__`` annotations (`gmbench.parameters`)."""

from typing import Annotated, Any, Literal

import pytest

from gmbench import plugins
from gmbench.errors import GmbenchError, PluginError
from gmbench.parameters import PluginParameterError, matches, plugin_parameters


def rejected(kind, name, params, **kwargs) -> PluginParameterError:
    with pytest.raises(PluginParameterError) as info:
        plugins.check_parameters(kind, name, params, **kwargs)
    return info.value


# Values as YAML gives them for a wrong suite entry: what was seen failing in every cell.
@pytest.mark.parametrize(
    "kind, name, params, parameter, expected",
    [
        ("reduction", "treehem", {"T": "two"}, "T", "an integer"),
        ("transfer_fitting", "dense", {"variant": "bogus"}, "variant", "one of 'paper', 'smoothed'"),
        ("model", "pointnet", {"dropout": "high"}, "dropout", "a number"),
        ("dataset", "digits", {"test_fraction": "lots"}, "test_fraction", "a number"),
        ("input_fitting", "kmeans", {"iterations": "many"}, "iterations", "an integer"),
    ],
)
def test_a_value_of_the_wrong_type_names_plugin_parameter_and_expected_type(kind, name, params, parameter, expected):
    error = rejected(kind, name, params)
    value = params[parameter]
    assert (error.kind, error.plugin, error.parameter, error.problem) == (kind, name, parameter, "value")
    assert error.path == (parameter,) and error.value == value and error.expected == expected
    description = next(p.description for p in plugins.get(kind, name).parameters if p.name == parameter)
    assert str(error) == (
        f"{kind} plugin '{name}': {parameter} must be {expected}, got {value!r} (a string)"
        + (f"; {parameter}: {description}" if description else "")
    )
    assert isinstance(error, PluginError) and isinstance(error, GmbenchError)


def test_a_nested_plugin_value_is_checked_and_its_path_given():
    error = rejected("model", "gmcn", {"reduction": "treehem", "reduction_params": {"T": "two"}})
    assert (error.kind, error.plugin, error.parameter) == ("reduction", "treehem", "T")
    assert error.path == ("reduction_params", "T")
    assert str(error).startswith("reduction plugin 'treehem': T must be an integer, got 'two'")


def test_a_nested_plugin_is_checked_with_its_default_name():
    # gmcn's default transfer_fitting is dense: its parameters are dense's.
    error = rejected("model", "gmcn", {"transfer_fitting_params": {"variant": "bogus"}})
    assert (error.plugin, error.path) == ("dense", ("transfer_fitting_params", "variant"))


def test_an_unknown_nested_plugin_lists_the_registered_ones():
    error = rejected("model", "gmcn", {"reduction": "nope"})
    assert error.parameter == "reduction" and error.path == ("reduction",)
    assert str(error) == (
        f"model plugin 'gmcn': reduction must be one of the reduction plugins "
        f"{', '.join(plugins.available('reduction'))}, got 'nope'"
    )


def test_located_prefixes_the_message_and_keeps_the_fields():
    error = rejected("reduction", "treehem", {"T": "two"}).located("suite.yaml:12")
    assert str(error).startswith("suite.yaml:12: reduction plugin 'treehem': T must be an integer")
    assert (error.parameter, error.path, error.expected) == ("T", ("T",), "an integer")


def test_quoted_exponent_number_is_explained():
    # Suites read 1e-5 as a number; the string '1e-5' comes from a quoted value ("1e-5").
    error = rejected("backend", "torch", {"cutoff": "1e-5"})
    assert "must be a number or null, got '1e-5' (a string, not a number: it was quoted; write 1e-5 without quotes)" in str(error)


@pytest.mark.parametrize(
    "kind, name, params",
    [
        ("reduction", "treehem", {"T": 4, "kl_threshold": None, "virtual_points": 4}),  # int for float
        ("transfer_fitting", "dense", {"variant": "smoothed"}),
        ("model", "pointnet2", {"ratios": [0.5, 0.25], "max_neighbors": (16, 32)}),  # YAML lists for tuples
        ("input_fitting", "kmeans", {"reg_covar": "auto", "device": None}),
        ("input_fitting", "kmeans", {"reg_covar": 0.01}),
        ("model", "gmcn", {"reduction": "mem", "reduction_params": {"virtual_points": 10}}),
    ],
)
def test_values_of_the_annotated_types_pass(kind, name, params):
    assert plugins.check_parameters(kind, name, params).name == name


def test_required_framework_parameters_count_as_given_for_suites_only():
    plugins.check_parameters("model", "pointnet", {})
    error = rejected("model", "pointnet", {}, framework=True)
    assert (error.problem, error.parameter) == ("missing", "num_classes")
    assert str(error).startswith("model plugin 'pointnet' needs parameter 'num_classes'")
    assert str(error).endswith(": an integer")


def test_unknown_parameter_error_is_structured():
    error = rejected("reduction", "treehem", {"Q": 1})
    assert (error.problem, error.parameter, error.path) == ("unknown", "Q", ("Q",))
    assert str(error).startswith("reduction plugin 'treehem' has no parameter 'Q'; accepted: T: int = 2")


def test_create_checks_values_before_building():
    with pytest.raises(PluginParameterError, match="iterations must be an integer, got 'abc'"):
        plugins.create("input_fitting", "kmeans", iterations="abc")


@pytest.mark.parametrize(
    "value, hint, ok",
    [
        (3, int, True), (True, int, False), (3.0, int, False), (3, float, True), (True, float, False),
        (False, bool, True), (0, bool, False), ("a", str, True), (None, str, False), (None, int | None, True),
        ("x", Literal["x", "y"], True), ("z", Literal["x", "y"], False), (True, Literal[1], False),
        ([1, 2], tuple[int, int], True), ([1], tuple[int, int], False), ([1, 2, 3], tuple[int, ...], True),
        ([1, "a"], list[int], False), ({"a": 1}, dict, True), ([], dict, False), ("anything", Any, True),
        (2, Annotated[int, "doc"], True), ("auto", float | str, True), ([0.5, 1], tuple[float, float], True),
    ],
)
def test_matches(value, hint, ok):
    assert matches(value, hint) is ok


class _Documented:
    name = "documented"

    def __init__(
        self,
        size: Annotated[int, "how many"] = 1,
        mode: Annotated[Literal["a", "b"] | None, "which mode"] = None,
        legacy="x",
        missing_type: "NoSuchName" = 0,  # noqa: F821 - an annotation that cannot be resolved
    ):
        pass


def test_descriptions_and_choices_come_from_annotated():
    size, mode, legacy, missing_type = plugin_parameters(_Documented)
    assert (size.annotation, size.description, size.describe()) == ("int", "how many", "size: int = 1")
    assert mode.annotation == "'a' | 'b' | None" and mode.choices == ("a", "b", None)
    assert mode.expected() == "one of 'a', 'b' or null"
    assert (legacy.annotation, legacy.description, legacy.accepts(object())) == ("", "", True)
    assert missing_type.annotation == "NoSuchName" and missing_type.accepts("unchecked")


def test_a_plugin_without_init_accepts_no_parameter():
    # weight_relu has no __init__: object.__init__'s (*args, **kwargs) must not read as "anything goes".
    error = rejected("transfer_fitting", "weight_relu", {"eps": 0.1})
    assert str(error) == "transfer_fitting plugin 'weight_relu' has no parameter 'eps'; accepted: (no parameters)"
