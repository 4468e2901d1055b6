"""One expanded cell made complete and checked: defaults, required fields, ranges,
plugins, training hyper-parameters, GMCN layouts and Gaussian counts against the data.

A task names the checks its cells get (:attr:`gmbench.tasks.Task.suite_checks`), in
order, from :data:`CHECKS`; the task's fields, required fields and plugin choices come
from its :class:`~gmbench.tasks.Task` too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Callable

from gmbench import plugins, tasks
from gmbench.errors import GmbenchError
from gmbench.layout import parse_layout
from gmbench.suite.checks import Context, check_fields, check_ranges, describe, short
from gmbench.suite.expansion import substitute
from gmbench.suite.plugin_checks import check_plugin
from gmbench.suite.schema import MAX_GAUSSIANS, RUNNER_TRAINING_FIELDS
from gmbench.suite.yaml_lines import line_of, plain
from gmbench.training import TrainConfig

# Placeholders a model parameter string may still hold after expansion (the runner fills it).
RUNNER_PLACEHOLDERS = ("num_classes",)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def resolve(ctx: Context, config: dict, cell_line: int) -> dict:
    """Fill defaults, check required fields, ranges, then the task's checks (plugins and
    their parameters, recursively; layouts; training)."""
    task = tasks.get(ctx.task)
    for key, field in task.fields.items():
        if key not in config:
            config[key] = copy.deepcopy(field.default)
    ctx.cell = describe(config)
    for key in task.required:
        if not config.get(key):
            raise ctx.fail(cell_line, f"every cell needs '{key}' (set it under 'cell:' or in a matrix axis); cell: {describe(config)}")
    check_fields(ctx, config, "cell")
    config["task"] = ctx.task  # part of the identity: run_cell dispatches on it
    check_ranges(ctx, config)
    infos: dict[str, plugins.PluginInfo] = {}  # filled by the "plugins" check, read by later ones
    for name in task.suite_checks:
        CHECKS[name](ctx, config, infos)
    return config


# A check of a resolved cell: (ctx, config, plugin infos by kind) -> None, raising ctx.fail.
Check = Callable[[Context, dict, dict], None]


def _check_plugins(ctx: Context, config: dict, infos: dict) -> None:
    """Every plugin choice of the task (:attr:`~gmbench.tasks.Task.plugin_fields`) exists and
    takes the cell's parameters."""
    for kind, name_key, params_key in tasks.get(ctx.task).plugin_fields:
        name_line = line_of(config, name_key, 1)
        infos[kind] = check_plugin(
            ctx, kind, config[name_key], name_line, config.get(params_key), line_of(config, params_key, name_line), params_key,
        )


def _check_layout_field(ctx: Context, config: dict, infos: dict) -> None:
    """The cell's ``layout`` field is a GMCN layout string."""
    try:
        parse_layout(config["layout"])
    except GmbenchError as error:
        raise ctx.fail(line_of(config, "layout", 1), f"layout: {error}") from None


def _resolve_model_params(ctx: Context, config: dict, infos: dict) -> None:
    """``{n_gaussians}`` filled in; any other placeholder left must be one the runner fills."""
    params = config["model_params"]
    if "in_features" in params:
        raise ctx.fail(line_of(params, "in_features", 1), "model_params.in_features is set by the runner from 'input'; remove it")
    config["model_params"] = substitute(params, {"n_gaussians": config["n_gaussians"]})
    _check_placeholders(ctx, config["model_params"], "model_params", line_of(config, "model_params", 1))


def _check_model_input(ctx: Context, config: dict, infos: dict) -> None:
    if config["input"] == "points" and "in_features" not in {p.name for p in infos["model"].parameters}:
        raise ctx.fail(
            line_of(config, "input", 1),
            f"model '{config['model']}' takes mixtures, not points (it has no 'in_features' parameter); use input: gm",
        )


def _check_training_field(ctx: Context, config: dict, infos: dict) -> None:
    check_training(ctx, config["training"], config["seed"], line_of(config, "training", 1))


def _check_placeholders(ctx: Context, value: Any, field: str, line: int) -> None:
    """A ``{name}`` left in a model parameter after expansion must be one the runner fills."""
    if isinstance(value, str):
        unknown = [name for name in _PLACEHOLDER.findall(value) if name not in RUNNER_PLACEHOLDERS]
        if unknown:
            raise ctx.fail(
                line, f"{field}: unknown placeholder '{{{unknown[0]}}}' in {value!r}; use {{n_gaussians}} or {{num_classes}}",
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_placeholders(ctx, item, f"{field}.{key}", line_of(value, key, line))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_placeholders(ctx, item, f"{field}[{index}]", line_of(value, index, line))


def _check_layout(ctx: Context, config: dict, infos: dict) -> None:
    """A model whose ``layout`` parameter is a GMCN layout string (gmcn): every cell's layout
    parses, starts with the one input channel and with the cell's ``n_gaussians``."""
    model = infos["model"]
    parameter = next((p for p in model.parameters if p.name == "layout"), None)
    if parameter is None or not _is_layout(parameter.default):
        return
    params = config["model_params"]
    text = params.get("layout", parameter.default)
    # The line that set the layout, else the model_params or model line (a default layout).
    lines = getattr(config, "lines", {})
    line = line_of(params, "layout", lines.get("model_params") or lines.get("model") or 1)
    if not isinstance(text, str):
        raise ctx.fail(line, f"model_params.layout must be a string such as '1/128->8/64->16/32->10', got {short(text)}")
    stand_in = "2"  # for {num_classes}, known once the data set is loaded
    try:
        layout = parse_layout(text.replace("{num_classes}", stand_in))
    except GmbenchError as error:
        message = str(error).replace(text.replace("{num_classes}", stand_in), text)
        raise ctx.fail(line, f"model_params.layout: {message}") from None
    first = layout.layers[0]
    if first.in_channels != 1:
        raise ctx.fail(line, f"model_params.layout '{text}' must start with 1 channel ('1/N'), the input mixture")
    largest = max(layer.in_gaussians for layer in layout.layers)
    if largest > MAX_GAUSSIANS:
        raise ctx.fail(line, f"model_params.layout '{text}' has {largest:,} Gaussians in one entry, more than {MAX_GAUSSIANS:,}; lower it")
    if config["input"] == "gm" and first.in_gaussians != config["n_gaussians"]:
        raise ctx.fail(
            line,
            f"model_params.layout '{text}' starts with {first.in_gaussians} Gaussians but the cell fits "
            f"n_gaussians = {config['n_gaussians']}; start the layout with '1/{{n_gaussians}}' ({describe(config)})",
        )


def _is_layout(value: Any) -> bool:
    try:
        parse_layout(value)
    except GmbenchError:
        return False
    return True


def _check_point_count(ctx: Context, config: dict, infos: dict) -> None:
    """Fitting N Gaussians to a sample needs at least N of its points; a data set with an
    integer ``n_points`` parameter says how many each sample has."""
    dataset = infos["dataset"]
    if config["input"] != "gm":
        return
    parameter = next((p for p in dataset.parameters if p.name == "n_points"), None)
    if parameter is None:
        return
    n_points = config["dataset_params"].get("n_points", parameter.default)
    if not isinstance(n_points, int) or isinstance(n_points, bool) or config["n_gaussians"] <= n_points:
        return
    raise ctx.fail(
        line_of(config, "n_gaussians", 1),
        f"n_gaussians = {config['n_gaussians']:,} is more than the {n_points:,} points per sample of data set "
        f"'{config['dataset']}' (dataset_params.n_points); fitting needs a point per Gaussian: lower n_gaussians or raise n_points",
    )


def check_training(ctx: Context, training: dict, seed: int, line: int) -> None:
    """``training:`` fields: known :class:`~gmbench.training.TrainConfig` fields of the right
    type, finite, and in the ranges TrainConfig enforces."""
    hints = _train_config_types()
    allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNNER_TRAINING_FIELDS]
    for key, value in training.items():
        key_line = line_of(training, key, line)
        if key not in allowed:
            hint = " (set it with --device / it follows the terminal)" if key in RUNNER_TRAINING_FIELDS else ""
            raise ctx.fail(key_line, f"unknown training field '{key}'{hint}; allowed: {', '.join(allowed)}")
        if key == "seed":
            raise ctx.fail(key_line, "set the seed with the cell field 'seed', not training.seed")
        expected = _expected(value, hints.get(key, Any))
        if expected:
            raise ctx.fail(key_line, f"training field '{key}' must be {expected}, got {short(value)}")
    try:
        TrainConfig(**plain(training), seed=seed, device="cpu", progress=False)
    except GmbenchError as error:
        message = str(error)
        key = next((key for key in training if f"'{key}'" in message), None)
        key_line = line_of(training, key, line) if key else line
        if getattr(key_line, "option", None):  # set by --set, not in the file
            message = message.replace("fix it in the suite", "fix the option")
        raise ctx.fail(key_line, f"training.{key or ''}: {message}".replace(".: ", ": ")) from None


@functools.lru_cache(maxsize=1)
def _train_config_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _expected(value: Any, hint: Any) -> str:
    """What ``value`` should be when it does not fit ``hint`` (int, float, bool, str, unions
    with None); ``""`` when it fits or the type is not one of those."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    words = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    if not all(member in words for member in members):
        return ""
    for member in members:
        if member is type(None) and value is None:
            return ""
        if member is bool and isinstance(value, bool):
            return ""
        if member is str and isinstance(value, str):
            return ""
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return ""
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return ""
    return " or ".join(words[member] for member in members)


# The checks a task may name in Task.suite_checks.
CHECKS: dict[str, Check] = {
    "plugins": _check_plugins,
    "layout": _check_layout_field,
    "model_params_placeholders": _resolve_model_params,
    "model_input": _check_model_input,
    "gmcn_layout": _check_layout,
    "point_count": _check_point_count,
    "training": _check_training_field,
}
