"""A suite's ``loggers:`` list: experiment trackers fed during the run (see docs/tracking.md).

Each entry names a logger plugin, alone or with its parameters::

    loggers: [tensorboard]
    loggers:
      - tensorboard
      - mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment: my-study}

Loggers are not part of a cell's identity: adding one to a suite keeps its run
folder (the cells already finished are not logged again).
"""

from __future__ import annotations

from typing import Any

from gmbench.suite.checks import Context, short
from gmbench.suite.plugin_checks import check_plugin
from gmbench.suite.yaml_lines import LDict, line_of, plain


def check_loggers(ctx: Context, entries: list, line: int) -> list[dict]:
    """``[{"name": ..., "params": {...}}, ...]`` for the entries, each checked against its plugin."""
    loggers: list[dict] = []
    for index, entry in enumerate(entries):
        entry_line = line_of(entries, index, line)
        name: Any
        if isinstance(entry, str):
            name, params = entry, LDict()
        elif isinstance(entry, dict) and len(entry) == 1:
            name, params = next(iter(entry.items()))
            params = LDict() if params is None else params
        else:
            raise ctx.fail(entry_line, f"each 'loggers' entry must be a logger name or {{name: {{parameters}}}}, got {short(entry)}")
        check_plugin(ctx, "logger", name, entry_line, params, line_of(entry, name, entry_line) if isinstance(entry, dict) else entry_line, f"loggers.{name}")
        if any(existing["name"] == name for existing in loggers):
            raise ctx.fail(entry_line, f"logger '{name}' is listed twice in 'loggers'; keep one")
        loggers.append({"name": name, "params": plain(params)})
    return loggers
