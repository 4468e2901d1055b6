"""The common record type every data set yields.

A split is a padded batch of point sets, so that input fitting and baselines
work on tensors without a Python loop per sample:

* ``points``  ``[S, P, D]`` float32: 3D point clouds, or 2D pixel centres;
* ``weights`` ``[S, P]`` float32 or ``None``: per-point mass (pixel
  intensity for images, 0 for padding); ``None`` means all points weigh 1;
* ``labels``  ``[S]`` int64 in ``[0, len(class_names))``;
* ``class_names``: the label names;
* ``names``: one identifier per sample (a file name, or ``"digits/123"``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class PointSetSplit:
    points: Tensor
    labels: Tensor
    class_names: list[str]
    weights: Tensor | None = None
    names: list[str] | None = None
    dataset: str = ""
    split: str = ""

    def __post_init__(self):
        if self.points.dim() != 3 or self.points.shape[-1] not in (2, 3):
            raise ValueError(f"points must be [S, P, 2|3], got {tuple(self.points.shape)}")
        if self.labels.shape != self.points.shape[:1]:
            raise ValueError("labels must have one entry per sample")
        if self.weights is not None and self.weights.shape != self.points.shape[:2]:
            raise ValueError("weights must be [S, P]")

    @property
    def dims(self) -> int:
        return int(self.points.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def subset(self, index: Tensor | slice | list[int]) -> "PointSetSplit":
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        names = None
        if self.names is not None:
            idx = range(len(self))[index] if isinstance(index, slice) else index.tolist()
            names = [self.names[i] for i in idx]
        return PointSetSplit(
            points=self.points[index],
            labels=self.labels[index],
            class_names=self.class_names,
            weights=None if self.weights is None else self.weights[index],
            names=names,
            dataset=self.dataset,
            split=self.split,
        )
