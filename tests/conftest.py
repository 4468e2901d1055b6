import os

import pytest
import torch

# Tests see only gmbench's built-in plugins, not the third-party ones installed in the
# developer's environment: entry points are ignored (gmbench.plugins reads this when it
# builds its manager).  The tests of entry-point discovery unset it themselves.
os.environ["GMBENCH_DISABLE_ENTRYPOINTS"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# Triton decides at its first import whether kernels compile for CUDA or run in its CPU
# interpreter; without CUDA the fused-backend tests need the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
