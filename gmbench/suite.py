"""Suites: YAML files that name a data set, shared settings and a matrix of cells.

A suite is data, not a script.  It is read with ``yaml.safe_load`` semantics
(through :func:`yaml.compose`, so that every value keeps its line number),
validated completely before anything runs, and expanded into *cells*: one
resolved configuration per experiment, identified by a short hash of that
configuration (:func:`cell_id`).  Schema (see ``docs/suites.md``)::

    name: quickstart                 # required; used in the default run folder
    description: ...                 # free text
    task: train                      # train | footprint | transfer_fitting_timing
    plugins: [my_package.plugin]     # extra plugin modules to import
    backend: torch                   # compute backend (overridden by --backend)
    backend_params: {cutoff: 1.0e-5} # the backend's parameters (gmbench plugins --kind backend)
    cell:                            # settings shared by every cell (the task's fields)
      dataset: digits
      n_gaussians: 16
      training: {epochs: 8}
    matrix:                          # a mapping, or a list of mappings (blocks)
      seed: [0, 1]                   # axis = a cell field or a dotted path: list of values
      model_params.reduction_params.T: [2, 4]
      variant:                       # any other axis name: mappings merged into the cell
        - {label: GMCN, model: gmcn}
        - {label: PointNet, model: pointnet, input: points}
    exclude:                         # cells matching every field of an entry are dropped
      - {label: PointNet, seed: 1}
    smoke: {training: {epochs: 1}}   # extra overrides under --smoke
    report: {tables: [...]}          # report layout (see gmbench.report)

Every string inside ``model_params`` may use the placeholders ``{n_gaussians}``
(resolved at expansion) and ``{num_classes}`` (resolved by the runner once the
data set is loaded), so one layout string serves several input sizes (Table 9).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from gmbench import plugins
from gmbench.errors import GmbenchError, SuiteError

TASKS = ("train", "footprint", "transfer_fitting_timing")
TOP_LEVEL_KEYS = ("name", "description", "task", "plugins", "backend", "backend_params", "cell", "matrix", "exclude", "smoke", "report")

# TrainConfig fields a suite may set (device and progress come from the command line).
RUNNER_TRAINING_FIELDS = ("device", "progress")

# Per task: field -> (types, default).  ``None`` in types means "may be null".
_DICT = (dict,)
CELL_FIELDS: dict[str, dict[str, tuple[tuple, Any]]] = {
    "train": {
        "label": ((str, type(None)), None),
        "dataset": ((str,), None),
        "dataset_params": (_DICT, {}),
        "model": ((str,), None),
        "model_params": (_DICT, {}),
        "input": ((str,), "gm"),
        "input_fitting": ((str,), "kmeans"),
        "input_fitting_params": (_DICT, {}),
        "n_gaussians": ((int,), 64),
        "n_points": ((int, type(None)), None),
        "seed": ((int,), 0),
        "training": (_DICT, {}),
        "train_samples": ((int, type(None)), None),
        "test_samples": ((int, type(None)), None),
        "diagnostics": ((bool,), False),
        "diagnostics_samples": ((int,), 16),
        "diagnostics_points": ((int,), 100_000),
    },
    "footprint": {
        "label": ((str, type(None)), None),
        "layout": ((str,), None),
        "batch": ((int,), 32),
        "kernel_gaussians": ((int,), 5),
        "integrated": ((bool,), False),
        "dims": ((int,), 3),
        "seed": ((int,), 0),
    },
    "transfer_fitting_timing": {
        "label": ((str, type(None)), None),
        "transfer_fitting": ((str,), None),
        "transfer_fitting_params": (_DICT, {}),
        "n_mixtures": ((int,), 800),
        "n_gaussians": ((int,), 256),
        "dims": ((int,), 2),
        "repeats": ((int,), 3),
        "rmse_samples": ((int,), 20000),
        "seed": ((int,), 0),
    },
}
REQUIRED_FIELDS = {
    "train": ("dataset", "model"),
    "footprint": ("layout",),
    "transfer_fitting_timing": ("transfer_fitting",),
}
INPUTS = ("gm", "points")
REPORT_TABLE_KEYS = ("name", "title", "rows", "columns", "value", "extra", "where", "paper", "source", "epochs")
POSITIVE_FIELDS = (
    "n_gaussians", "n_points", "train_samples", "test_samples", "diagnostics_samples", "diagnostics_points",
    "batch", "kernel_gaussians", "n_mixtures", "repeats", "rmse_samples",
)

# Under --smoke every training cell shrinks to this (suite ``smoke:`` overrides come on top).
SMOKE_TRAIN_SAMPLES = 48
SMOKE_TEST_SAMPLES = 24
SMOKE_MAX_GAUSSIANS = 16


# --------------------------------------------------------------------------- YAML with lines


class LDict(dict):
    """A dict that remembers the line of each key (``lines``) and its own ``line``."""

    line: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}


class LList(list):
    """A list that remembers the line of each item (``lines``) and its own ``line``."""

    line: int = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.lines: list[int] = []


def _build(node: yaml.Node, loader: yaml.SafeLoader, where: str) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor), as safe_load does
        result = LDict()
        result.line = line
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise SuiteError(f"{where}:{key_line}: key {key!r} must be a string; quote it")
            if key in result:
                raise SuiteError(f"{where}:{key_line}: duplicate key '{key}'; remove one of them")
            result[key] = _build(value_node, loader, where)
            result.lines[key] = key_line
        return result
    if isinstance(node, yaml.SequenceNode):
        result = LList()
        result.line = line
        for item in node.value:
            result.append(_build(item, loader, where))
            result.lines.append(item.start_mark.line + 1)
        return result
    return loader.construct_object(node, deep=True)


def load_yaml_with_lines(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` whose mappings/lists are :class:`LDict`/:class:`LList`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _build(node, loader, where)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SuiteError(f"{where}{line}: not valid YAML ({problem}); fix the syntax") from None
    finally:
        loader.dispose()


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts/lists (for JSON, hashing and pickling)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _line_of(container: Any, key: Any, default: int) -> int:
    """Line of ``container[key]`` in the suite file (``default`` when unknown)."""
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key, getattr(container, "line", 0) or default)
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return getattr(container, "line", 0) or default


# --------------------------------------------------------------------------- the suite


@dataclasses.dataclass
class Cell:
    """One resolved experiment: ``config`` (plain JSON data) and its stable ``id``."""

    id: str
    config: dict
    index: int = 0

    @property
    def title(self) -> str:
        c = self.config
        label = c.get("label") or c.get("model") or c.get("transfer_fitting") or c.get("layout")
        parts = [str(label)]
        layout = (c.get("model_params") or {}).get("layout") if c.get("task") == "train" else None
        if not c.get("label") and layout:
            parts.append(str(layout))
        if c.get("task") == "footprint":
            parts.append(f"integrated={c.get('integrated')} dims={c.get('dims')}")
        for key in ("dataset", "n_gaussians", "seed"):
            if key in c:
                parts.append(f"{key}={c[key]}" if key != "dataset" else str(c[key]))
        return " ".join(parts)


@dataclasses.dataclass
class Suite:
    """A validated suite: its source, settings and expanded cells."""

    name: str
    path: str
    text: str
    task: str
    plugins: list[str]
    backend: str | None
    description: str
    cells: list[Cell]
    report: dict
    smoke: bool = False
    backend_params: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "task": self.task,
            "plugins": self.plugins,
            "backend": self.backend,
            "backend_params": self.backend_params,
            "description": self.description,
            "smoke": self.smoke,
            "report": self.report,
            "cells": [{"id": cell.id, "config": cell.config} for cell in self.cells],
        }


def cell_id(config: dict) -> str:
    """Stable id of a resolved cell: the first 10 hex digits of SHA-256 of its canonical JSON."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def load_suite(path: str | Path, smoke: bool = False) -> Suite:
    """Read, validate and expand the suite at ``path`` (raises :class:`SuiteError`)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file '{path}' does not exist; pass the path of a YAML suite such as suites/quickstart.yaml")
    return parse_suite(path.read_text(), str(path), smoke=smoke)


def parse_suite(text: str, where: str = "<suite>", smoke: bool = False) -> Suite:
    data = load_yaml_with_lines(text, where)
    if not isinstance(data, dict):
        raise SuiteError(f"{where}:1: a suite must be a mapping with at least 'name' and 'cell'; see docs/suites.md")
    return _Validator(data, where, smoke).suite(text)


class _Validator:
    def __init__(self, data: LDict, where: str, smoke: bool):
        self.data = data
        self.where = where
        self.smoke = smoke

    def fail(self, line: int, message: str) -> SuiteError:
        return SuiteError(f"{self.where}:{line}: {message}")

    def top(self, key: str, types: tuple, default: Any) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise self.fail(
                self.data.lines[key],
                f"'{key}' must be {_type_names(types)}, got {type(value).__name__} {_short(value)}",
            )
        return value

    def suite(self, text: str) -> Suite:
        for key in self.data:
            if key not in TOP_LEVEL_KEYS:
                raise self.fail(
                    self.data.lines[key],
                    f"unknown top-level key '{key}'; allowed: {', '.join(TOP_LEVEL_KEYS)}",
                )
        name = self.top("name", (str,), None)
        if not name:
            raise self.fail(1, "the suite needs a 'name:' (used for the run folder and reports)")
        task = self.top("task", (str,), "train")
        if task not in TASKS:
            raise self.fail(self.data.lines["task"], f"unknown task '{task}'; allowed: {', '.join(TASKS)}")
        self.task = task
        modules = self.top("plugins", (list,), [])
        for index, module in enumerate(modules):
            if not isinstance(module, str):
                raise self.fail(_line_of(modules, index, 1), "'plugins' must list importable module names (strings)")
        try:
            plugins.load_modules(list(modules), source=f"{self.where} plugins:")
        except GmbenchError as error:
            raise self.fail(self.data.lines["plugins"], str(error)) from None
        backend = self.top("backend", (str,), None)
        if backend is not None and backend not in plugins.available("backend"):
            raise self.fail(
                self.data.lines["backend"],
                f"unknown backend '{backend}'; available: {', '.join(plugins.available('backend'))}",
            )
        backend_params = self.top("backend_params", (dict,), LDict())
        if backend_params:
            try:
                plugins.check_parameters("backend", backend or "torch", _plain(backend_params))
            except GmbenchError as error:
                raise self.fail(self.data.lines["backend_params"], str(error)) from None
        base = self.top("cell", (dict,), LDict())
        self.check_fields(base, "cell")
        blocks = self.top("matrix", (dict, list), LDict())
        if isinstance(blocks, dict):
            blocks = [blocks]
        exclude = self.top("exclude", (list,), [])
        smoke_overrides = self.top("smoke", (dict,), LDict())
        self.check_fields(smoke_overrides, "smoke")
        report = self.top("report", (dict,), {})
        self.check_report(report)

        expanded = []
        for block_index, block in enumerate(blocks):
            if not isinstance(block, dict):
                raise self.fail(_line_of(blocks, block_index, self.data.lines["matrix"]), "each matrix block must be a mapping of axis -> list of values")
            for config in self.expand(base, block):
                if not any(self.matches(config, entry, i, exclude) for i, entry in enumerate(exclude)):
                    expanded.append(config)
        factor = smoke_factor(expanded) if self.smoke and self.task == "train" else 1
        if factor > 1:
            shrink_report_filters(report, factor)
        cells: list[Cell] = []
        seen: dict[str, int] = {}
        for config in expanded:
            if self.smoke:
                config = self.apply_smoke(config, smoke_overrides, factor)
            config = self.resolve(config)
            plain = _plain(config)
            identifier = cell_id(plain)
            if identifier in seen:
                continue  # the same experiment from two blocks runs once
            seen[identifier] = len(cells)
            cells.append(Cell(identifier, plain, index=len(cells)))
        if not cells:
            raise self.fail(self.data.line or 1, "the matrix expands to no cells (everything excluded?)")
        return Suite(
            name=name, path=self.where, text=text, task=task, plugins=list(modules), backend=backend,
            description=self.top("description", (str,), ""), cells=cells, report=_plain(report),
            smoke=self.smoke, backend_params=_plain(backend_params),
        )

    # ----------------------------------------------------------------- report

    def check_report(self, report: dict) -> None:
        """``report: tables:`` entries: known keys and paper tables (see gmbench.report)."""
        for key in report:
            if key != "tables":
                raise self.fail(_line_of(report, key, 1), f"unknown report key '{key}'; allowed: tables")
        tables = report.get("tables") or []
        if not isinstance(tables, list):
            raise self.fail(_line_of(report, "tables", 1), "'report.tables' must be a list of table mappings")
        from gmbench.report import load_paper_results

        paper = load_paper_results()
        for index, table in enumerate(tables):
            line = _line_of(tables, index, 1)
            if not isinstance(table, dict):
                raise self.fail(line, "each report table must be a mapping (name, title, rows, columns, value, ...)")
            for key in table:
                if key not in REPORT_TABLE_KEYS:
                    raise self.fail(_line_of(table, key, line), f"unknown report table key '{key}'; allowed: {', '.join(REPORT_TABLE_KEYS)}")
            if table.get("paper") is not None and table["paper"] not in paper:
                raise self.fail(_line_of(table, "paper", line), f"unknown paper table '{table['paper']}'; known: {', '.join(paper)}")
            if table.get("source") not in (None, "results", "diagnostics"):
                raise self.fail(_line_of(table, "source", line), "report table 'source' must be results or diagnostics")
            epochs = table.get("epochs", [])
            if not isinstance(epochs, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
                raise self.fail(_line_of(table, "epochs", line), f"report table 'epochs' must be a list of epoch numbers >= 1, got {_short(epochs)}")

    # ----------------------------------------------------------------- fields

    def check_fields(self, mapping: dict, what: str) -> None:
        fields = CELL_FIELDS[self.task]
        for key, value in mapping.items():
            line = _line_of(mapping, key, 1)
            if key not in fields:
                raise self.fail(line, f"unknown {what} field '{key}' for task '{self.task}'; allowed: {', '.join(fields)}")
            types, _ = fields[key]
            if value is None and type(None) in types:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise self.fail(line, f"{what} field '{key}' must be {_type_names(types)}, got {type(value).__name__} {_short(value)}")

    def axis_line(self, block: dict, axis: str) -> int:
        return _line_of(block, axis, 1)

    def expand(self, base: dict, block: dict):
        """Cartesian product of the block's axes applied over the base cell."""
        axes = []
        fields = CELL_FIELDS[self.task]
        for axis, values in block.items():
            line = self.axis_line(block, axis)
            if not isinstance(values, list) or not values:
                raise self.fail(line, f"matrix axis '{axis}' must be a non-empty list of values, got {_short(values)}")
            head = axis.split(".")[0]
            if head not in fields:
                for index, value in enumerate(values):
                    if not isinstance(value, dict):
                        raise self.fail(
                            _line_of(values, index, line),
                            f"matrix axis '{axis}' is not a cell field, so its values must be mappings merged into the cell; "
                            f"cell fields are: {', '.join(fields)}",
                        )
                    self.check_fields(value, f"matrix '{axis}'")
            elif "." not in axis:
                for index, value in enumerate(values):
                    self.check_fields(_with_line(LDict({axis: value}), axis, _line_of(values, index, line)), "matrix")
            else:
                if not isinstance(fields[head][1], dict):
                    raise self.fail(line, f"matrix axis '{axis}': only mapping fields ({', '.join(k for k, v in fields.items() if isinstance(v[1], dict))}) take dotted paths")
            axes.append((axis, values, line))
        for combination in itertools.product(*(range(len(values)) for _, values, _ in axes)):
            config = _deep_copy(base)
            for (axis, values, line), index in zip(axes, combination):
                value = values[index]
                value_line = _line_of(values, index, line)
                head = axis.split(".")[0]
                if head not in fields:
                    _merge(config, value)
                else:
                    _set_path(config, axis.split("."), value, value_line)
            yield config

    def matches(self, config: dict, entry: Any, index: int, exclude: list) -> bool:
        line = _line_of(exclude, index, 1)
        if not isinstance(entry, dict):
            raise self.fail(line, "each 'exclude' entry must be a mapping of cell fields (or dotted paths) to values")
        for key, value in entry.items():
            if key.split(".")[0] not in CELL_FIELDS[self.task]:
                raise self.fail(_line_of(entry, key, line), f"exclude: unknown cell field '{key}'; allowed: {', '.join(CELL_FIELDS[self.task])}")
            current: Any = config
            for part in key.split("."):
                current = current.get(part) if isinstance(current, dict) else None
            if _plain(current) != _plain(value):
                return False
        return True

    def apply_smoke(self, config: dict, overrides: dict, factor: int) -> dict:
        if self.task == "train":
            training = config.setdefault("training", LDict())
            training["epochs"] = 1
            config["train_samples"] = min(config.get("train_samples") or SMOKE_TRAIN_SAMPLES, SMOKE_TRAIN_SAMPLES)
            config["test_samples"] = min(config.get("test_samples") or SMOKE_TEST_SAMPLES, SMOKE_TEST_SAMPLES)
            config["diagnostics_samples"] = min(config.get("diagnostics_samples", 4), 4)
            config["diagnostics_points"] = min(config.get("diagnostics_points", 2000), 2000)
            n = config.get("n_gaussians", CELL_FIELDS["train"]["n_gaussians"][1])
            if factor > 1 and isinstance(n, int) and not isinstance(n, bool):
                config["n_gaussians"] = max(2, n // factor)
                if config.get("n_points"):
                    config["n_points"] = max(8, config["n_points"] // factor)
                params = config.get("model_params") or {}
                layout = params.get("layout")
                if isinstance(layout, str):
                    params["layout"] = shrink_layout(layout.replace("{n_gaussians}", str(n)), factor)
        elif self.task == "transfer_fitting_timing":
            config["n_mixtures"] = min(config.get("n_mixtures", 800), 16)
            config["n_gaussians"] = min(config.get("n_gaussians", 256), 32)
            config["repeats"] = 1
            config["rmse_samples"] = min(config.get("rmse_samples", 20000), 2000)
        _merge(config, overrides)
        return config

    # ----------------------------------------------------------------- resolution

    def resolve(self, config: dict) -> dict:
        """Fill defaults, check required fields and plugin parameters (recursively)."""
        fields = CELL_FIELDS[self.task]
        for key, (_, default) in fields.items():
            if key not in config:
                config[key] = copy.deepcopy(default)
        for key in REQUIRED_FIELDS[self.task]:
            if not config.get(key):
                raise self.fail(
                    self.data.lines.get("cell", 1),
                    f"every cell needs '{key}' (set it under 'cell:' or in a matrix axis); cell: {_describe(config)}",
                )
        self.check_fields(config, "cell")
        config["task"] = self.task  # part of the identity: run_cell dispatches on it
        for key in POSITIVE_FIELDS:
            if key in config and config[key] is not None and config[key] < 1:
                raise self.fail(_line_of(config, key, 1), f"'{key}' must be >= 1, got {config[key]} ({_describe(config)})")
        if self.task == "train":
            self.resolve_train(config)
        elif self.task == "footprint":
            if config["dims"] not in (2, 3):
                raise self.fail(_line_of(config, "dims", 1), f"'dims' must be 2 or 3, got {config['dims']}")
            from gmbench.layout import parse_layout

            try:
                parse_layout(config["layout"])
            except GmbenchError as error:
                raise self.fail(_line_of(config, "layout", 1), str(error)) from None
        elif self.task == "transfer_fitting_timing":
            if config["dims"] not in (2, 3):
                raise self.fail(_line_of(config, "dims", 1), f"'dims' must be 2 or 3, got {config['dims']}")
            self.check_plugin(config, "transfer_fitting", "transfer_fitting_params")
        return config

    def resolve_train(self, config: dict) -> None:
        if config["input"] not in INPUTS:
            raise self.fail(_line_of(config, "input", 1), f"'input' must be one of {', '.join(INPUTS)}, got '{config['input']}'")
        self.check_plugin(config, "dataset", "dataset_params")
        self.check_plugin(config, "input_fitting", "input_fitting_params")
        info = self.check_plugin(config, "model", "model_params", framework_extra=("in_features",))
        takes_points = "in_features" in {p.name for p in info.parameters}
        if "in_features" in config["model_params"]:
            raise self.fail(
                _line_of(config["model_params"], "in_features", 1),
                "model_params.in_features is set by the runner from 'input'; remove it",
            )
        if config["input"] == "points" and not takes_points:
            raise self.fail(
                _line_of(config, "input", 1),
                f"model '{config['model']}' takes mixtures, not points (it has no 'in_features' parameter); use input: gm",
            )
        config["model_params"] = _substitute(config["model_params"], {"n_gaussians": config["n_gaussians"]})
        self.check_training(config["training"])

    def check_training(self, training: dict) -> None:
        try:
            from gmbench.training import TrainConfig

            allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNNER_TRAINING_FIELDS]
        except ImportError:  # the trainer is not installed yet: accept the contract's fields
            allowed = ["epochs", "batch_size", "lr", "seed", "lr_factor", "lr_patience", "lr_cooldown", "grad_clip", "eval_batch_size"]
        for key, value in training.items():
            line = _line_of(training, key, 1)
            if key not in allowed:
                hint = " (set it with --device / it follows the terminal)" if key in RUNNER_TRAINING_FIELDS else ""
                raise self.fail(line, f"unknown training field '{key}'{hint}; allowed: {', '.join(allowed)}")
            if key == "seed":
                raise self.fail(line, "set the seed with the cell field 'seed', not training.seed")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise self.fail(line, f"training field '{key}' must be a number, got {_short(value)}")

    def check_plugin(self, config: dict, kind: str, params_key: str, framework_extra: tuple = ()) -> plugins.PluginInfo:
        name = config[kind]
        params = config.get(params_key) or {}
        if not isinstance(params, dict):
            raise self.fail(_line_of(config, params_key, 1), f"'{params_key}' must be a mapping, got {_short(params)}")
        registry = plugins.registry(kind)
        if name not in registry:
            raise self.fail(
                _line_of(config, kind, 1),
                f"unknown {kind} plugin '{name}'; available: {', '.join(registry) or '(none registered)'}",
            )
        info = registry[name]
        accepted = {p.name: p for p in info.parameters}
        if not info.accepts_any_parameter:
            for key in params:
                if key not in accepted or key in framework_extra:
                    if key in framework_extra:
                        continue
                    listing = ", ".join(p.describe() for p in info.parameters if p.name not in framework_extra) or "(no parameters)"
                    raise self.fail(
                        _line_of(params, key, _line_of(config, params_key, 1)),
                        f"{kind} plugin '{name}' has no parameter '{key}'; accepted: {listing}",
                    )
        framework = set(plugins.FRAMEWORK_PARAMETERS.get(kind, ())) | set(framework_extra)
        if kind == "dataset":
            framework |= {"data_root", "seed"}
        for parameter in info.parameters:
            if parameter.required and parameter.name not in params and parameter.name not in framework:
                raise self.fail(
                    _line_of(config, params_key, _line_of(config, kind, 1)),
                    f"{kind} plugin '{name}' needs parameter '{parameter.name}' in '{params_key}'",
                )
        # Nested plugin choices: a parameter named after a plugin kind plus '<kind>_params'.
        for nested_kind in plugins.KINDS:
            if nested_kind not in accepted:
                continue
            nested_name = params.get(nested_kind, accepted[nested_kind].default)
            if not isinstance(nested_name, str):
                if nested_kind in params:
                    raise self.fail(_line_of(params, nested_kind, 1), f"'{nested_kind}' must be a plugin name (string), got {_short(nested_name)}")
                continue
            nested = {nested_kind: nested_name, f"{nested_kind}_params": params.get(f"{nested_kind}_params") or {}}
            nested = _NestedView(nested, params)
            try:
                self.check_plugin(nested, nested_kind, f"{nested_kind}_params")
            except SuiteError as error:
                raise SuiteError(str(error).replace(f"{nested_kind}_params'", f"{params_key}.{nested_kind}_params'")) from None
        return info


class _NestedView(dict):
    """A nested ``<kind>``/``<kind>_params`` pair that reports the lines of its parent mapping."""

    def __init__(self, values: dict, parent: dict):
        super().__init__(values)
        self.parent = parent

    @property
    def line(self) -> int:
        return getattr(self.parent, "line", 0)

    @property
    def lines(self) -> dict:
        return getattr(self.parent, "lines", {})


# --------------------------------------------------------------------------- helpers


def smoke_factor(configs: list[dict]) -> int:
    """The power of two that brings the suite's largest Gaussian count to at most 16.

    One factor for the whole suite keeps its sizes apart (32 / 64 / 128 -> 4 / 8 / 16),
    so a smoke run's tables have the same columns as the full run's.
    """
    default = CELL_FIELDS["train"]["n_gaussians"][1]
    counts = [c.get("n_gaussians", default) for c in configs]
    largest = max((n for n in counts if isinstance(n, int) and not isinstance(n, bool)), default=0)
    factor = 1
    while largest // factor > SMOKE_MAX_GAUSSIANS:
        factor *= 2
    return factor


def shrink_report_filters(report: dict, factor: int) -> None:
    """Divide the Gaussian counts that report tables filter on (``where: {n_gaussians: 64}``)
    like the cells' under --smoke, so those tables are not empty in a smoke run."""
    for table in report.get("tables") or []:
        where = table.get("where") if isinstance(table, dict) else None
        if not isinstance(where, dict) or "n_gaussians" not in where:
            continue
        wanted = where["n_gaussians"]
        shrink = lambda n: max(2, n // factor) if isinstance(n, int) and not isinstance(n, bool) else n  # noqa: E731
        where["n_gaussians"] = [shrink(n) for n in wanted] if isinstance(wanted, list) else shrink(wanted)


def shrink_layout(layout: str, factor: int) -> str:
    """Divide every Gaussian count of a layout string by ``factor`` (at least 2 each), for --smoke."""
    parts = layout.split("->")
    shrunk = []
    for part in parts[:-1]:
        if "/" in part and part.split("/")[1].strip().isdigit():
            channels, gaussians = part.split("/")
            shrunk.append(f"{channels.strip()}/{max(2, int(gaussians) // factor)}")
        else:
            shrunk.append(part)
    return "->".join([*shrunk, parts[-1]])


def _substitute(value: Any, names: dict[str, Any]) -> Any:
    """Replace ``{name}`` placeholders in strings; unknown placeholders stay for later."""
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace("{" + key + "}", str(replacement))
        return value
    if isinstance(value, LDict):
        result = LDict({key: _substitute(item, names) for key, item in value.items()})
        result.lines, result.line = dict(value.lines), value.line
        return result
    if isinstance(value, dict):
        return {key: _substitute(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, names) for item in value]
    return value


def substitute_placeholders(value: Any, **names: Any) -> Any:
    """Public form of the placeholder substitution (the runner fills ``{num_classes}``)."""
    return _substitute(value, names)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, LDict):
        result = LDict({key: _deep_copy(item) for key, item in value.items()})
        result.lines, result.line = dict(value.lines), value.line
        return result
    if isinstance(value, dict):
        result = LDict({key: _deep_copy(item) for key, item in value.items()})
        return result
    if isinstance(value, LList):
        result = LList([_deep_copy(item) for item in value])
        result.lines, result.line = list(value.lines), value.line
        return result
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


def _merge(target: dict, source: dict) -> None:
    """Deep-merge ``source`` into ``target``, keeping lines: non-empty mappings merge,
    everything else -- including an empty mapping ``{}``, which resets -- replaces."""
    for key, value in source.items():
        if isinstance(value, dict) and value and isinstance(target.get(key), dict):
            if not isinstance(target[key], LDict):
                target[key] = _deep_copy(target[key])
            _merge(target[key], value)
        else:
            target[key] = _deep_copy(value)
        if isinstance(target, LDict):
            target.lines[key] = _line_of(source, key, target.line)


def _with_line(mapping: LDict, key: str, line: int) -> LDict:
    mapping.lines[key] = line
    mapping.line = line
    return mapping


def _set_path(config: dict, path: list[str], value: Any, line: int) -> None:
    current = config
    for part in path[:-1]:
        if not isinstance(current.get(part), dict):
            child = LDict()
            child.line = line
            current[part] = child
            if isinstance(current, LDict):
                current.lines[part] = line
        elif not isinstance(current[part], LDict):
            current[part] = _deep_copy(current[part])
        current = current[part]
    if isinstance(value, dict) and isinstance(current.get(path[-1]), dict):
        _merge(current[path[-1]], value)
    else:
        current[path[-1]] = _deep_copy(value)
    if isinstance(current, LDict):
        current.lines[path[-1]] = line


def _type_names(types: tuple) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(config: dict) -> str:
    keys = ("label", "dataset", "model", "input", "n_gaussians", "seed", "layout", "transfer_fitting")
    return ", ".join(f"{key}={config[key]}" for key in keys if config.get(key) is not None)
