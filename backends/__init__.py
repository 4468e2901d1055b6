"""Compute backends, imported as ``gmbench.backends``.

A backend is a plugin of kind ``backend`` (see :mod:`gmbench.hookspecs`).  The
active one is process-wide; choose it with ``gmbench.backends.use(name)``,
which works as a plain call and as a context manager::

    gmbench.backends.use("torch")              # from now on
    with gmbench.backends.use("fused"):        # inside the block only
        ...
"""

from __future__ import annotations

import threading
from typing import Any

_state = threading.local()
_global: dict[str, Any] = {"backend": None}


def active():
    """The backend instance in use (the ``torch`` backend unless chosen otherwise)."""
    backend = getattr(_state, "backend", None) or _global["backend"]
    if backend is None:
        from gmbench import plugins

        backend = plugins.create("backend", "torch")
        _global["backend"] = backend
    return backend


class use:
    """Select the active backend by plugin name (and its parameters).

    As a plain call the choice stays; as a context manager it is undone on exit.
    A backend that cannot run here (``available()`` false) raises a
    :class:`gmbench.GmbenchError` saying why.
    """

    def __init__(self, name: str, **params: Any):
        from gmbench import plugins
        from gmbench.errors import PluginError

        info = plugins.get("backend", name)
        reason = info.cls.unavailable_reason() if hasattr(info.cls, "unavailable_reason") else None
        if reason:
            raise PluginError(f"backend '{name}' cannot run here: {reason}")
        self.backend = plugins.create("backend", name, **params)
        self._previous_local = getattr(_state, "backend", None)
        self._previous_global = _global["backend"]
        _global["backend"] = self.backend

    def __enter__(self):
        _state.backend = self.backend
        return self.backend

    def __exit__(self, *exc_info):
        _state.backend = self._previous_local
        _global["backend"] = self._previous_global
        return False
