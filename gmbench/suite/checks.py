"""Field-level checks of a suite: types, ranges, report tables; one-line errors with file:line."""

from __future__ import annotations

import dataclasses
from typing import Any

from gmbench import tasks
from gmbench.errors import SuiteError
from gmbench.paper_numbers import load_paper_results
from gmbench.suite.schema import MAX_GAUSSIANS, REPORT_TABLE_KEYS
from gmbench.suite.yaml_lines import line_of, plain


@dataclasses.dataclass
class Context:
    """Where errors point (the suite's path) and the task whose fields apply."""

    where: str
    task: str = tasks.DEFAULT_TASK
    # (kind, plugin, canonical parameters) -> PluginInfo of the plugin choices found valid:
    # the cells of a matrix mostly repeat them, and each is checked once per suite.
    checked: dict = dataclasses.field(default_factory=dict)
    # The --set options given ("--set a=1, --set b=2"), named by an error about a cell.
    overrides: str = ""
    cell: str = ""  # describe() of the cell being resolved

    def fail(self, line: int, message: str) -> SuiteError:
        option = getattr(line, "option", None)  # a value a --set option gave (gmbench.suite.overrides.OverrideLine)
        if option:
            return SuiteError(f"{option}: {message}")
        given = f" (with {self.overrides})" if self.overrides else ""
        return SuiteError(f"{self.where}:{line}: {message}{given}")


def check_fields(ctx: Context, mapping: dict, what: str) -> None:
    """Every key of ``mapping`` is a cell field of the task, of an allowed type."""
    fields = tasks.get(ctx.task).fields
    for key, value in mapping.items():
        line = line_of(mapping, key, 1)
        if key not in fields:
            raise ctx.fail(line, f"unknown {what} field '{key}' for task '{ctx.task}'; allowed: {', '.join(fields)}")
        types = fields[key].types
        if value is None and type(None) in types:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ctx.fail(line, f"{what} field '{key}' must be {type_names(types)}, got {kind_of(value)} {short(value)}")


def check_ranges(ctx: Context, config: dict) -> None:
    """Every set field of an expanded cell lies in its range (:class:`~gmbench.suite.schema.Field`)."""
    fields = tasks.get(ctx.task).fields
    for key, value in config.items():
        field = fields.get(key)
        if field is None or field.in_range(value):
            continue
        line = line_of(config, key, 1)
        if key == "n_gaussians" and value > MAX_GAUSSIANS:
            raise ctx.fail(
                line,
                f"n_gaussians = {value:,} is more than {MAX_GAUSSIANS:,}, the most Gaussians gmbench fits per sample "
                f"(no data set has that many points per sample; fitting would take hours); lower it ({describe(config)})",
            )
        raise ctx.fail(line, f"'{key}' must be {field.range_text()}, got {value!r} ({describe(config)})")


def check_report(ctx: Context, report: dict) -> None:
    """``report: tables:`` entries: known keys and paper tables (see gmbench.report)."""
    for key in report:
        if key != "tables":
            raise ctx.fail(line_of(report, key, 1), f"unknown report key '{key}'; allowed: tables")
    tables = report.get("tables") or []
    if not isinstance(tables, list):
        raise ctx.fail(line_of(report, "tables", 1), "'report.tables' must be a list of table mappings")
    paper = None
    for index, table in enumerate(tables):
        line = line_of(tables, index, 1)
        if not isinstance(table, dict):
            raise ctx.fail(line, "each report table must be a mapping (name, title, rows, columns, value, ...)")
        for key in table:
            if key not in REPORT_TABLE_KEYS:
                raise ctx.fail(line_of(table, key, line), f"unknown report table key '{key}'; allowed: {', '.join(REPORT_TABLE_KEYS)}")
        if table.get("paper") is not None:
            if paper is None:
                paper = load_paper_results()
            if table["paper"] not in paper:
                raise ctx.fail(line_of(table, "paper", line), f"unknown paper table '{table['paper']}'; known: {', '.join(paper)}")
        if table.get("source") not in (None, "results", "diagnostics"):
            raise ctx.fail(line_of(table, "source", line), "report table 'source' must be results or diagnostics")
        epochs = table.get("epochs", [])
        if not isinstance(epochs, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
            raise ctx.fail(line_of(table, "epochs", line), f"report table 'epochs' must be a list of epoch numbers >= 1, got {short(epochs)}")


def type_names(types: tuple) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def kind_of(value: Any) -> str:
    """The type of a suite value as YAML data ("list", not the line-keeping LList)."""
    return "dict" if isinstance(value, dict) else "list" if isinstance(value, list) else type(value).__name__


def short(value: Any) -> str:
    text = repr(plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


def describe(config: dict) -> str:
    """The fields that tell a cell apart, for messages about one cell of a matrix."""
    keys = ("label", "dataset", "model", "input", "n_gaussians", "seed", "layout", "transfer_fitting")
    return ", ".join(f"{key}={config[key]}" for key in keys if config.get(key) is not None)
