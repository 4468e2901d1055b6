"""Read a suite file, check its top level, expand, shrink (``--smoke``) and resolve its cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmbench import plugins, tasks
from gmbench.errors import GmbenchError, SuiteError
from gmbench.suite.cell_checks import resolve
from gmbench.suite.checks import Context, check_fields, check_ranges, check_report, kind_of, short, type_names
from gmbench.suite.expansion import excluded, expand
from gmbench.suite.logger_checks import check_loggers
from gmbench.suite.overrides import apply_overrides, parse_overrides, recorded_text
from gmbench.suite.plugin_checks import check_plugin
from gmbench.suite.schema import MAX_CELLS, TOP_LEVEL_KEYS, Cell, Suite, cell_id
from gmbench.suite.smoke import apply_smoke, shrink_report_filters, smoke_factor
from gmbench.suite.yaml_lines import LDict, line_of, load_yaml_with_lines, plain, read_suite_text


def load_suite(path: str | Path, smoke: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Read, validate and expand the suite at ``path`` (raises :class:`SuiteError`);
    ``overrides``: ``PATH=VALUE`` items of ``--set`` (:mod:`gmbench.suite.overrides`)."""
    path = Path(path)
    return parse_suite(read_suite_text(path), str(path), smoke=smoke, overrides=overrides)


def parse_suite(text: str, where: str = "<suite>", smoke: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Validate and expand suite ``text`` with ``--set`` ``overrides``; errors name ``where`` and the line."""
    data = load_yaml_with_lines(text, where)
    if not isinstance(data, dict):
        raise SuiteError(f"{where}:1: a suite must be a mapping with at least 'name' and 'cell'; see docs/suites.md")
    ctx = Context(where)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ctx.fail(data.lines[key], f"unknown top-level key '{key}'; allowed: {', '.join(TOP_LEVEL_KEYS)}")

    def top(key: str, types: tuple, default: Any) -> Any:
        if data.get(key) is None:
            return default
        value = data[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ctx.fail(data.lines[key], f"'{key}' must be {type_names(types)}, got {kind_of(value)} {short(value)}")
        return value

    name = top("name", (str,), None)
    if not name:
        raise ctx.fail(1, "the suite needs a 'name:' (used for the run folder and reports)")
    ctx.task = top("task", (str,), tasks.DEFAULT_TASK)
    if ctx.task not in tasks.TASKS:
        raise ctx.fail(data.lines["task"], f"unknown task '{ctx.task}'; allowed: {', '.join(tasks.TASKS)}")
    modules = top("plugins", (list,), [])
    for index, module in enumerate(modules):
        if not isinstance(module, str):
            raise ctx.fail(line_of(modules, index, 1), "'plugins' must list importable module names (strings)")
    try:
        plugins.load_modules(list(modules), source=f"{where} plugins:")
    except GmbenchError as error:
        raise ctx.fail(data.lines["plugins"], str(error)) from None
    backend = top("backend", (str,), None)
    backend_params = top("backend_params", (dict,), LDict())
    if backend is not None or backend_params:
        backend_line = data.lines.get("backend", data.lines.get("backend_params", 1))
        check_plugin(ctx, "backend", backend or "torch", backend_line, backend_params, data.lines.get("backend_params", backend_line), "backend_params")
    base = top("cell", (dict,), LDict())
    check_fields(ctx, base, "cell")
    blocks = top("matrix", (dict, list), LDict())
    if isinstance(blocks, dict):
        blocks = [blocks]
    exclude = top("exclude", (list,), [])
    smoke_overrides = top("smoke", (dict,), LDict())
    check_fields(ctx, smoke_overrides, "smoke")
    report = top("report", (dict,), {})
    check_report(ctx, report)
    loggers = check_loggers(ctx, top("loggers", (list,), []), data.lines.get("loggers", 1))

    given = parse_overrides(ctx, overrides)
    ctx.overrides = ", ".join(f"--set {override.text}" for override in given)  # named by the cells' errors
    expanded = []
    produced = 0  # cells before 'exclude', for the bound MAX_CELLS
    for index, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise ctx.fail(line_of(blocks, index, data.lines["matrix"]), "each matrix block must be a mapping of axis -> list of values")
        for config in expand(ctx, base, block, limit=MAX_CELLS - produced):
            apply_overrides(ctx, config, given)
            produced += 1
            if not excluded(ctx, config, exclude):
                check_ranges(ctx, config)  # before --smoke shrinks a size that cannot work
                expanded.append(config)
    factor = smoke_factor(expanded, ctx.task) if smoke and tasks.get(ctx.task).smoke_divides_gaussians else 1
    if factor > 1:
        shrink_report_filters(report, factor)
    cells: list[Cell] = []
    seen: set[str] = set()
    for config in expanded:
        if smoke:
            config = apply_smoke(ctx.task, config, smoke_overrides, factor)
        config = resolve(ctx, config, data.lines.get("cell", 1))
        resolved = plain(config)
        identifier = cell_id(resolved)
        if identifier in seen:
            continue  # the same experiment from two blocks runs once
        seen.add(identifier)
        cells.append(Cell(identifier, resolved, index=len(cells)))
    if not cells:
        raise ctx.fail(data.line or 1, "the matrix expands to no cells (everything excluded?)")
    return Suite(
        name=name, path=where, text=recorded_text(text, given), task=ctx.task, plugins=list(modules), backend=backend,
        description=top("description", (str,), ""), cells=cells, report=plain(report),
        smoke=smoke, overrides=[override.text for override in given], backend_params=plain(backend_params), loggers=loggers,
    )
