import os

import pytest
import torch

# Tests must not depend on third-party plugins installed in the developer's venv
# unless a test installs them itself.
os.environ.setdefault("MPLBACKEND", "Agg")
# Triton decides at its first import whether kernels compile for CUDA or run in its CPU
# interpreter; without CUDA the fused-backend tests need the interpreter (issue 8).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_active_backend():
    """A test that calls ``backends.use(...)`` as a plain call must not change the backend of
    the tests after it."""
    from gmbench import backends

    saved_global = backends._global["backend"]
    saved_local = getattr(backends._state, "backend", None)
    yield
    backends._global["backend"] = saved_global
    backends._state.backend = saved_local
