"""Compute backends, imported as ``gmbench.backends``.

A backend is a plugin of kind ``backend`` (see :mod:`gmbench.hookspecs`).  The
active one is held in a :class:`contextvars.ContextVar`: every mixture
operation of :mod:`gmbench.mixture` asks :func:`active` for it, and
:class:`use` sets it for the current context only::

    with gmbench.backends.use("fused", cutoff=1e-5):   # inside the block only
        ...
    gmbench.backends.check("fused")        # can it run here? raises, switches nothing
    gmbench.backends.set_active("torch", compute_dtype="float64")   # a script or notebook

Outside any ``use`` block the ``torch`` backend with its defaults is active.
A context variable is per thread and per ``asyncio`` task, so concurrent cells
in one process do not see each other's choice (a new thread starts with the
default).  The runner chooses the backend of every cell, with the suite's
``backend_params``, through :func:`gmbench.cell_environment.cell_environment`.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

from gmbench import plugins
from gmbench.errors import PluginError

_active: contextvars.ContextVar[Any] = contextvars.ContextVar("gmbench_backend", default=None)


@functools.lru_cache(maxsize=1)
def _default():
    """The ``torch`` backend with its defaults, built once: a constant, never a choice."""
    return plugins.create("backend", "torch")


def active():
    """The backend instance in use in this context (``torch`` unless chosen otherwise)."""
    backend = _active.get()
    return _default() if backend is None else backend


def check(name: str, **params: Any):
    """Raise a :class:`gmbench.GmbenchError` unless backend ``name`` with ``params`` can run here.

    Checks the name, the parameters (as suites are checked) and the backend's
    ``unavailable_reason()``; builds nothing and changes no state.  Returns the
    plugin's :class:`gmbench.plugins.PluginInfo`.
    """
    info = plugins.check_parameters("backend", name, params, framework=True)
    reason = info.cls.unavailable_reason() if hasattr(info.cls, "unavailable_reason") else None
    if reason:
        raise PluginError(f"backend '{name}' cannot run here: {reason}")
    return info


def create(name: str, **params: Any):
    """A new instance of backend ``name`` after :func:`check`; it is not made active."""
    check(name, **params)
    return plugins.create("backend", name, **params)


class use:
    """Context manager: backend ``name`` (with ``params``) is active inside the block.

    The backend is checked and built when ``use(...)`` is called, so a backend
    that cannot run here, or a bad parameter, raises a one-line
    :class:`gmbench.GmbenchError` before the block starts.  Entering sets it in
    the current context only and leaving restores the previous one; calling
    ``use(...)`` without ``with`` changes nothing (see :func:`set_active`).
    """

    def __init__(self, name: str, **params: Any):
        self.backend = create(name, **params)
        self._tokens: list[contextvars.Token] = []

    def __enter__(self):
        self._tokens.append(_active.set(self.backend))
        return self.backend

    def __exit__(self, *exc_info):
        _active.reset(self._tokens.pop())
        return False


def set_active(name: str, **params: Any):
    """Make backend ``name`` active in the current context from now on; return it.

    For scripts and notebooks; library code and tests use ``with use(...)``.
    """
    backend = create(name, **params)
    _active.set(backend)
    return backend
