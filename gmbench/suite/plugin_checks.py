"""Plugin choices of a suite: names, and every parameter mapping -- nested ones too.

The parameters themselves are judged by :func:`gmbench.plugins.check_parameters`
(names, required ones, values against the plugin's annotations); this module
walks every ``<kind>`` / ``<kind>_params`` pair of a cell, recursively (a
model's ``reduction`` + ``reduction_params``), and puts ``file:line`` and the
field path in front of what ``check_parameters`` says.

Value ranges a plugin checks in its ``__init__`` (``test_fraction`` in (0, 1),
``T`` a power of two, ...) are not in the annotations, so the plugins of the
kinds in :data:`BUILT_WHEN_CHECKED` are also built once per distinct parameter
mapping: their constructors only store and check arguments. Models (weights),
backends (kernels) and loggers (files) are not built before a cell runs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gmbench import plugins
from gmbench.errors import GmbenchError
from gmbench.suite.checks import Context, short
from gmbench.suite.yaml_lines import LDict, line_of, plain

# Plugin kinds whose constructors are cheap and free of side effects, and the stand-ins
# for the parameters the framework passes them when a cell runs.
BUILT_WHEN_CHECKED = {"dataset": {"data_root": None, "seed": 0}, "transfer_fitting": {}, "reduction": {}, "input_fitting": {}}


def check_plugin(
    ctx: Context, kind: str, name: Any, name_line: int, params: Any, params_line: int, field: str,
) -> plugins.PluginInfo:
    """Check plugin ``name`` of ``kind`` and its ``params`` (the mapping at ``field``,
    e.g. ``model_params``), then every nested plugin choice inside ``params``."""
    if params is None:
        params = LDict()
    try:
        key = (kind, name, json.dumps(plain(params), sort_keys=True))
    except (TypeError, ValueError):  # not JSON data (a date, say): checked every time
        key = None
    if key in ctx.checked:
        return ctx.checked[key]
    if not isinstance(params, dict):
        raise ctx.fail(params_line, f"'{field}' must be a mapping of {kind} parameters, got {short(params)}")
    if not isinstance(name, str):
        raise ctx.fail(name_line, f"the {kind} plugin must be named by a string, got {short(name)}")
    registry = plugins.registry(kind)
    if name not in registry:
        raise ctx.fail(name_line, f"unknown {kind} plugin '{name}'; available: {', '.join(registry) or '(none registered)'}")
    info = registry[name]
    accepted = {p.name: p for p in info.parameters}
    # Nested choices first, so an error inside them names the innermost mapping.
    for nested_kind in plugins.KINDS:
        if nested_kind not in accepted:
            continue
        nested_key = f"{nested_kind}_params"
        nested_name = params.get(nested_kind, accepted[nested_kind].default)
        if not isinstance(nested_name, str):
            if nested_kind in params:
                raise ctx.fail(line_of(params, nested_kind, params_line), f"'{field}.{nested_kind}' must be a plugin name (string), got {short(nested_name)}")
            continue  # no choice made: a required parameter left to the framework, or None
        check_plugin(
            ctx, nested_kind, nested_name, line_of(params, nested_kind, params_line),
            params.get(nested_key), line_of(params, nested_key, params_line), f"{field}.{nested_key}",
        )
    try:
        plugins.check_parameters(kind, name, plain(params))
    except GmbenchError as error:
        line, path = _locate(error, params, params_line)
        message = f"{'.'.join([field, *path])}: {error}"
        if getattr(line, "option", None) and ctx.cell:  # a --set value that suits some cells only
            message += f" (cell {ctx.cell}: --set gives every cell the value; to change only some cells, edit the suite)"
        raise ctx.fail(line, message) from None
    if kind in BUILT_WHEN_CHECKED:
        try:
            plugins.create(kind, name, **{**BUILT_WHEN_CHECKED[kind], **plain(params)})
        except GmbenchError as error:
            line, path = _locate(error, params, params_line)
            raise ctx.fail(line, f"{'.'.join([field, *path])}: {error}") from None
    if key is not None:
        ctx.checked[key] = info
    return info


def _locate(error: GmbenchError, params: dict, params_line: int) -> tuple[int, list[str]]:
    """Line and key path (inside ``params``) of the parameter an error is about."""
    path = getattr(error, "path", None)  # PluginParameterError: the keys leading to the parameter
    if not isinstance(path, (tuple, list)) or not path:
        message = str(error)
        path = next(
            ([key] for key in params if f"'{key}'" in message or re.search(rf"(^|[\s:]){re.escape(str(key))} must\b", message)),
            [],
        )
    line, current, found = params_line, params, []
    for key in path:
        if not isinstance(current, dict) or key not in current:
            break
        line = line_of(current, key, line)
        current = current[key]
        found.append(str(key))
    return line, found
