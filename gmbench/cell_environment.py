"""The environment one cell trains in, set up the same way on every path that runs a cell.

:func:`gmbench.run.cell.run_cell` (in-process, worker processes, Ray) and every
data-parallel rank of :mod:`gmbench.run.launcher` enter :func:`cell_environment`
around the cell's task, so that rank 0 and the other ranks cannot drift apart
(they once did: the ranks above 0 chose the backend without the suite's
``backend_params``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from gmbench import backends, plugins
from gmbench.errors import GmbenchError


@contextlib.contextmanager
def cell_environment(options, seed: int | None = None) -> Iterator[None]:
    """Inside: the suite's plugin modules loaded, the backend ``options.backend`` (default
    ``torch``) active with ``options.backend_params``, ``options.device`` the current
    device, and with a ``seed`` the global ``random``, NumPy and torch generators seeded.

    ``options`` is a :class:`gmbench.run.cell.RunOptions`.  The backend is set in the
    current context only and the generators' states are restored on exit, so the
    calling process is unchanged afterwards.  Raises :class:`GmbenchError` for a
    backend or device that cannot be used.
    """
    plugins.load_modules(list(options.plugins), source="suite plugins:")
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GmbenchError(f"device '{options.device}' requested but CUDA is not available; use --device cpu")
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(backends.use(options.backend or "torch", **(options.backend_params or {})))
        if device.type == "cuda" and device.index is not None:
            stack.enter_context(torch.cuda.device(device.index))
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(_restored_python_and_numpy_generators())
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _restored_python_and_numpy_generators() -> Iterator[None]:
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
