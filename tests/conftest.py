import os

import pytest
import torch

# Tests must not depend on third-party plugins installed in the developer's venv
# unless a test installs them itself.
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
