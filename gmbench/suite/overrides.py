"""Command-line overrides: ``gmbench run SUITE --set PATH=VALUE`` (repeatable).

``PATH`` is a cell field of the suite's task or a dotted path into a mapping field
(``training.epochs``, ``model_params.reduction_params.T``); ``VALUE`` is read by
the suite's own YAML reader (:func:`~gmbench.suite.yaml_lines.load_yaml_with_lines`:
plain data only, bounded, YAML 1.2 floats such as ``1e-3``).

An override gives *every* cell that value: it is applied to each cell after the
matrix, so it also replaces a matrix axis on the same path (the axis collapses to
the one value, and cells that become identical run once) and what a variant sets
there.  A mapping value merges into the field like the matrix merges (``{}``
resets it).  Overrides apply in order (a later one wins), before ``exclude``,
the range checks and ``--smoke`` -- the suite is then treated exactly like a file
with those values: the same checks, the same cell ids.

Values an override sets carry an :class:`OverrideLine` instead of a line number,
so an error about them names the option (``--set training.epochs=0: ...``); any
other error in an overridden suite says which overrides were given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gmbench import tasks
from gmbench.errors import SuiteError
from gmbench.suite.checks import Context, check_fields, describe, short
from gmbench.suite.expansion import deep_copy, merge
from gmbench.suite.schema import TOP_LEVEL_KEYS
from gmbench.suite.yaml_lines import LDict, LList, load_yaml_with_lines

OPTION = "--set"


class OverrideLine(int):
    """Stands where a line number would for a value set on the command line: it is
    truthy (so ``line_of`` keeps it) and :meth:`Context.fail` names ``option`` instead."""

    option: str

    def __new__(cls, option: str) -> "OverrideLine":
        line = super().__new__(cls, 1)
        line.option = option
        return line


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``--set PATH=VALUE``: ``path`` split at the dots, ``value`` as plain YAML data
    (mappings as :class:`LDict` whose lines are ``line``), ``text`` as given."""

    path: tuple[str, ...]
    value: Any
    text: str
    line: OverrideLine


def parse_overrides(ctx: Context, items: list[str] | tuple[str, ...]) -> list[Override]:
    """``PATH=VALUE`` items checked against the task's cell fields (unknown field, a dotted
    path into a field that is not a mapping, a value of the wrong type) and read as YAML."""
    fields = tasks.get(ctx.task).fields
    overrides = []
    for item in items:
        raw_path, sep, text = item.partition("=")
        path = tuple(part.strip() for part in raw_path.split("."))
        option = f"{OPTION} {item.strip()}"
        if not sep or not all(path):
            raise SuiteError(f"{OPTION} '{item}' must look like PATH=VALUE with a dotted PATH, e.g. {OPTION} training.epochs=5")
        head = path[0]
        if head not in fields:
            raise SuiteError(f"{option}: {_unknown_field(ctx, head)}")
        if len(path) > 1 and not isinstance(fields[head].default, dict):
            mapping_fields = ", ".join(k for k, v in fields.items() if isinstance(v.default, dict))
            raise SuiteError(f"{option}: '{head}' is not a mapping, so '{'.'.join(path)}' is no path into the cell; only mapping fields ({mapping_fields}) take dotted paths")
        line = OverrideLine(option)
        value = _with_lines(_read_value(text, option), line)
        if len(path) == 1:
            single = LDict({head: value})
            single.lines[head], single.line = line, line
            try:
                check_fields(ctx, single, "cell")
            except SuiteError as error:
                if isinstance(value, list):
                    raise SuiteError(f"{error}; {OPTION} gives every cell this one value: to run several, make '{head}' a matrix axis of the suite") from None
                raise
        overrides.append(Override(path, value, f"{'.'.join(path)}={text.strip()}", line))
    return overrides


def apply_overrides(ctx: Context, config: LDict, overrides: list[Override]) -> None:
    """Set every override's path in one expanded cell, in order."""
    for override in overrides:
        current = config
        for depth, part in enumerate(override.path[:-1]):
            child = current.get(part)
            if child is None:
                child = LDict()
                child.line = override.line
                current[part] = child
                current.lines[part] = override.line
            elif not isinstance(child, dict):
                where = ".".join(override.path[: depth + 1])
                raise ctx.fail(override.line, f"'{where}' is {short(child)} in this cell, not a mapping to set '{override.path[depth + 1]}' in ({describe(config)})")
            elif not isinstance(child, LDict):
                child = current[part] = deep_copy(child)
            current = child
        leaf = override.path[-1]
        if isinstance(override.value, dict) and override.value and isinstance(current.get(leaf), dict):
            if not isinstance(current[leaf], LDict):
                current[leaf] = deep_copy(current[leaf])
            merge(current[leaf], override.value)
        else:
            current[leaf] = deep_copy(override.value)
        current.lines[leaf] = override.line


def recorded_text(text: str, overrides: list[Override]) -> str:
    """The suite file's text as a run folder's ``suite.yaml`` records it: with overrides,
    preceded by comment lines that name them (the resolved cells are in ``run.json``)."""
    if not overrides:
        return text
    lines = [f"#   {OPTION} {override.text}".replace("\n", "\\n") for override in overrides]
    header = "# Run with command-line overrides, applied to every cell after the matrix (docs/suites.md):\n"
    return header + "\n".join(lines) + "\n" + text


def _read_value(text: str, option: str) -> Any:
    try:
        return load_yaml_with_lines(text, option)
    except SuiteError as error:
        # The location is the option, not a line of a file: "--set x=1:1: ..." -> "--set x=1: ..."
        raise SuiteError(str(error).replace(f"{option}:1:", f"{option}:", 1)) from None


def _with_lines(value: Any, line: OverrideLine) -> Any:
    """Every mapping and list inside ``value`` remembers ``line`` for each entry."""
    if isinstance(value, LDict):
        value.line = line
        for key, item in value.items():
            value.lines[key] = line
            _with_lines(item, line)
    elif isinstance(value, LList):
        value.line = line
        value.lines = [line] * len(value)
        for item in value:
            _with_lines(item, line)
    return value


def _unknown_field(ctx: Context, head: str) -> str:
    fields = ", ".join(tasks.get(ctx.task).fields)
    if head in TOP_LEVEL_KEYS:
        where = {"backend": " (use --backend)", "matrix": " (edit the matrix in the suite file; --set of a cell field replaces an axis on it)"}.get(head, "")
        return f"'{head}' is a top-level suite key, not a cell field; {OPTION} sets cell fields only{where}: {fields}"
    return f"unknown cell field '{head}' for task '{ctx.task}'; {OPTION} takes a cell field or a dotted path into one: {fields}"
