"""Shared by the run tests: the text of tiny suite files, and the environment of a ``gmbench``
subprocess that must find the test plugins (``runner_plugins``) next to this file."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# The cell of a --smoke-sized digits run (the lines under ``cell:``): small enough for a test.
DIGITS_SMOKE_CELL = """\
  dataset: digits
  n_gaussians: 4
  train_samples: 42
  test_samples: 21
  training: {epochs: 2, batch_size: 21}
"""


def blobs_suite(name: str, *, epochs: int, batch_size: int, sleep_s: float | None = None, matrix: str = "") -> str:
    """A suite of ``test_meanpool`` cells on ``test_blobs`` (``runner_plugins``); ``sleep_s`` slows
    every batch down, ``matrix`` is appended verbatim (its ``matrix:`` line included)."""
    slowed = f"  model_params: {{sleep_s: {sleep_s}}}\n" if sleep_s is not None else ""
    return (
        f"name: {name}\n"
        "plugins: [runner_plugins]\n"
        "cell:\n"
        "  dataset: test_blobs\n"
        "  model: test_meanpool\n"
        "  input: points\n"
        "  n_gaussians: 8\n"
        f"{slowed}"
        f"  training: {{epochs: {epochs}, batch_size: {batch_size}}}\n"
        f"{matrix}"
    )


def subprocess_env(**extra: str) -> dict:
    """The environment of a ``python -m gmbench`` child: the test plugins importable, one thread."""
    return dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", **extra)
