"""A model plugin for the executor tests that kills its own worker process mid-cell.

Loaded by test suites through ``plugins: [runner_plugins, executor_test_plugins]``
(``tests/`` is on ``sys.path`` under pytest and is handed to Ray workers).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from runner_plugins import MeanPoolModel

from gmbench.plugins import hookimpl


class WorkerKillingModel(MeanPoolModel):
    """``test_meanpool`` that SIGKILLs its process at training step ``kill_at_step`` (counted
    per process, from 1).  With ``marker`` it does so once: it creates the file first and
    does not kill when the file exists; without it, it kills every process that trains it.
    ``steps_file``: every training step appends the process id there (to tell a resumed
    run, which trains only the remaining epochs, from one that started over)."""

    name = "test_worker_killing"

    def __init__(self, num_classes: int, dims: int, in_features: int = 0, hidden: int = 16, kill_at_step: int = 1, marker: str | None = None, steps_file: str | None = None):
        super().__init__(num_classes=num_classes, dims=dims, in_features=in_features, hidden=hidden)
        self.kill_at_step = kill_at_step
        self.marker = marker
        self.steps_file = steps_file
        self.steps = 0

    def forward(self, x):
        if self.training:
            self.steps += 1
            if self.steps_file:
                with open(self.steps_file, "a") as log:
                    log.write(f"{os.getpid()}\n")
            if self.steps == self.kill_at_step and not (self.marker and Path(self.marker).exists()):
                if self.marker:
                    Path(self.marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


@hookimpl
def gmbench_model():
    return WorkerKillingModel
