"""Plugins for the runner tests: a tiny blob data set and a mean-pooling point-set model.

Loaded by test suites through their ``plugins:`` list (``tests/`` is on
``sys.path`` under pytest; subprocess tests set ``PYTHONPATH``).  They make
runner tests fast and let them provoke failures on purpose (an exception, a
NaN loss, a slow epoch to kill the process in).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from gmbench.data.records import PointSetSplit
from gmbench.plugins import hookimpl


class BlobsDataset:
    """Point sets drawn around a class-specific centre (separable; trains in a few epochs)."""

    name = "test_blobs"

    def __init__(self, n_train: int = 60, n_test: int = 30, n_classes: int = 3, points: int = 24, dims: int = 2, seed: int = 0, data_root: str | None = None):
        self.sizes = {"train": n_train, "test": n_test}
        self.n_classes, self.points, self.dims, self.seed = n_classes, points, dims, seed

    def load(self, split: str) -> PointSetSplit:
        generator = torch.Generator().manual_seed(self.seed + (0 if split == "train" else 1))
        n = self.sizes[split]
        labels = torch.arange(n) % self.n_classes
        centres = torch.stack([torch.cos(labels * 2.1), torch.sin(labels * 2.1)] + [torch.zeros(n)] * (self.dims - 2), dim=-1)
        points = centres[:, None, :] * 2 + torch.randn((n, self.points, self.dims), generator=generator)
        return PointSetSplit(points=points, labels=labels, class_names=[f"c{i}" for i in range(self.n_classes)], dataset="test_blobs", split=split)


class MeanPoolModel(nn.Module):
    """Per-point MLP, mean pooling, linear classifier; ``fail``/``diverge``/``sleep_s`` for tests."""

    name = "test_meanpool"

    def __init__(self, num_classes: int, dims: int, in_features: int = 0, hidden: int = 16, fail: bool = False, diverge: bool = False, sleep_s: float = 0.0):
        super().__init__()
        self.point = nn.Sequential(nn.Linear(dims + in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, num_classes)
        self.fail, self.diverge, self.sleep_s = fail, diverge, sleep_s

    def forward(self, x):
        if self.fail:
            raise RuntimeError("this model fails on purpose")
        if self.sleep_s and self.training:
            time.sleep(self.sleep_s)
        logits = self.head(self.point(x).mean(dim=1))
        if self.diverge and self.training:
            logits = logits * float("nan")
        return torch.log_softmax(logits, dim=-1)


@hookimpl
def gmbench_dataset():
    return BlobsDataset


@hookimpl
def gmbench_model():
    return MeanPoolModel
