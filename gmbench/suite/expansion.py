"""The matrix: axes -> cells, ``exclude``, deep merges and ``{placeholder}`` strings.

Values keep their lines through every copy and merge (:class:`LDict`), so an
error found in a resolved cell still points at the matrix entry that set it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

from gmbench import tasks
from gmbench.suite.checks import Context, check_fields, short
from gmbench.suite.schema import MAX_CELLS
from gmbench.suite.yaml_lines import LDict, LList, line_of, plain


def expand(ctx: Context, base: dict, block: dict, limit: int = MAX_CELLS) -> Iterator[LDict]:
    """Cartesian product of the block's axes applied over the base cell.

    An axis is a cell field (``seed: [0, 1]``), a dotted path into a mapping field
    (``model_params.reduction_params.T: [2, 4]``) or any other name whose values
    are mappings merged into the cell (``variant: [{label: a, model: gmcn}, ...]``).
    More than ``limit`` cells (what :data:`MAX_CELLS` leaves after the blocks before)
    is an error raised before any cell is built.
    """
    axes = []
    fields = tasks.get(ctx.task).fields
    for axis, values in block.items():
        line = line_of(block, axis, 1)
        if not isinstance(values, list) or not values:
            raise ctx.fail(line, f"matrix axis '{axis}' must be a non-empty list of values, got {short(values)}")
        head = axis.split(".")[0]
        if head not in fields:
            for index, value in enumerate(values):
                if not isinstance(value, dict):
                    raise ctx.fail(
                        line_of(values, index, line),
                        f"matrix axis '{axis}' is not a cell field, so its values must be mappings merged into the cell; "
                        f"cell fields are: {', '.join(fields)}",
                    )
                check_fields(ctx, value, f"matrix '{axis}'")
        elif "." not in axis:
            for index, value in enumerate(values):
                check_fields(ctx, _with_line(LDict({axis: value}), axis, line_of(values, index, line)), "matrix")
        elif not isinstance(fields[head].default, dict):
            mapping_fields = ", ".join(k for k, v in fields.items() if isinstance(v.default, dict))
            raise ctx.fail(line, f"matrix axis '{axis}': only mapping fields ({mapping_fields}) take dotted paths")
        axes.append((axis, values, line))
    count = math.prod(len(values) for _, values, _ in axes)
    if count > limit:
        raise ctx.fail(
            getattr(block, "line", 0) or 1,
            f"this matrix block expands to {count:,} cells, more than the {MAX_CELLS:,} a suite may have "
            f"({MAX_CELLS - limit:,} before it); split the study into several suites",
        )
    for combination in itertools.product(*(range(len(values)) for _, values, _ in axes)):
        config = deep_copy(base)
        for (axis, values, line), index in zip(axes, combination):
            value = values[index]
            if axis.split(".")[0] not in fields:
                merge(config, value)
            else:
                _set_path(config, axis.split("."), value, line_of(values, index, line))
        yield config


def excluded(ctx: Context, config: dict, exclude: list) -> bool:
    """Whether some ``exclude`` entry matches every one of its fields in ``config``."""
    return any(_matches(ctx, config, entry, line_of(exclude, index, 1)) for index, entry in enumerate(exclude))


def _matches(ctx: Context, config: dict, entry: Any, line: int) -> bool:
    if not isinstance(entry, dict):
        raise ctx.fail(line, "each 'exclude' entry must be a mapping of cell fields (or dotted paths) to values")
    fields = tasks.get(ctx.task).fields
    for key, value in entry.items():
        if key.split(".")[0] not in fields:
            raise ctx.fail(line_of(entry, key, line), f"exclude: unknown cell field '{key}'; allowed: {', '.join(fields)}")
        current: Any = config
        for part in key.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if plain(current) != plain(value):
            return False
    return True


def substitute(value: Any, names: dict[str, Any]) -> Any:
    """Replace ``{name}`` placeholders in strings; unknown placeholders stay for later."""
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace("{" + key + "}", str(replacement))
        return value
    if isinstance(value, LDict):
        result = LDict({key: substitute(item, names) for key, item in value.items()})
        result.lines, result.line = dict(value.lines), value.line
        return result
    if isinstance(value, dict):
        return {key: substitute(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, names) for item in value]
    return value


def substitute_placeholders(value: Any, **names: Any) -> Any:
    """Public form of the placeholder substitution (the runner fills ``{num_classes}``)."""
    return substitute(value, names)


def deep_copy(value: Any) -> Any:
    """Copy of nested dicts/lists as :class:`LDict`/:class:`LList`, keeping their lines."""
    if isinstance(value, LDict):
        result = LDict({key: deep_copy(item) for key, item in value.items()})
        result.lines, result.line = dict(value.lines), value.line
        return result
    if isinstance(value, dict):
        return LDict({key: deep_copy(item) for key, item in value.items()})
    if isinstance(value, LList):
        result = LList([deep_copy(item) for item in value])
        result.lines, result.line = list(value.lines), value.line
        return result
    if isinstance(value, list):
        return [deep_copy(item) for item in value]
    return value


def merge(target: dict, source: dict) -> None:
    """Deep-merge ``source`` into ``target``, keeping lines: non-empty mappings merge,
    everything else -- including an empty mapping ``{}``, which resets -- replaces."""
    for key, value in source.items():
        if isinstance(value, dict) and value and isinstance(target.get(key), dict):
            if not isinstance(target[key], LDict):
                target[key] = deep_copy(target[key])
            merge(target[key], value)
        else:
            target[key] = deep_copy(value)
        if isinstance(target, LDict):
            target.lines[key] = line_of(source, key, target.line)


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
            current[part] = deep_copy(current[part])
        current = current[part]
    if isinstance(value, dict) and isinstance(current.get(path[-1]), dict):
        merge(current[path[-1]], value)
    else:
        current[path[-1]] = deep_copy(value)
    if isinstance(current, LDict):
        current.lines[path[-1]] = line
