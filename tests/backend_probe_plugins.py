"""A model plugin that records the backend it sees when built (tests/test_distributed.py).

Each process writes ``<record_dir>/rank<RANK>.json`` with the active backend's
name and settings, so a test can compare what the data-parallel ranks of one
cell train with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gmbench import backends
from gmbench.plugins import hookimpl
from runner_plugins import MeanPoolModel


class BackendProbeModel(MeanPoolModel):
    """The test mean-pool model, recording the active backend's configuration when built."""

    name = "test_backend_probe"

    def __init__(self, num_classes: int, dims: int, in_features: int = 0, record_dir: str = ""):
        super().__init__(num_classes, dims, in_features=in_features)
        backend = backends.active()
        settings = {key: repr(value) for key, value in sorted(vars(backend).items())}
        record = {"backend": backend.name, "settings": settings}
        Path(record_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


@hookimpl
def gmbench_model():
    return BackendProbeModel
