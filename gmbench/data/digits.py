"""scikit-learn's bundled 8x8 handwritten digits as weighted 2D point sets (plugin ``digits``).

1797 images of 10 classes (UCI optical recognition of handwritten digits),
shipped inside scikit-learn, so this data set needs no download.  The
train/test split is stratified and fixed (``test_fraction``, random state 0),
independent of ``seed``; ``seed`` only drives the jittered samples
(``n_points``, see :mod:`gmbench.data.images`).
"""

from __future__ import annotations

from typing import Annotated

import torch

from gmbench.data.images import jittered_pixel_samples, pixel_point_sets
from gmbench.data.records import PointSetSplit
from gmbench.errors import DataError
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl

SPLIT_RANDOM_STATE = 0


class Digits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as pixel-weighted 2D point sets; embedded."""

    name = "digits"

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int | None, "jittered samples per image (null: one point per pixel)"] = None,
        test_fraction: Annotated[float, "fraction of the images in the stratified test split, in (0, 1)"] = 0.25,
        samples_per_class: Annotated[int | None, "keep the first this many samples of each class (null: all)"] = None,
    ):
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if n_points is not None and n_points < 1:
            raise ValueError(f"n_points must be positive or None, got {n_points}")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}")
        self.data_root = data_root  # accepted for a uniform interface; the data are embedded
        self.seed = int(seed)
        self.n_points = n_points
        self.test_fraction = float(test_fraction)
        self.samples_per_class = samples_per_class

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` of 2D points (pixel units, 8x8 grid); weights = intensity / 16."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split '{split}' for digits; use train or test")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        index = torch.arange(len(bunch.target))
        train, test = train_test_split(index.numpy(), test_size=self.test_fraction, stratify=bunch.target,
                                       random_state=SPLIT_RANDOM_STATE)
        chosen = torch.as_tensor(sorted(train if split == "train" else test))
        labels = torch.as_tensor(bunch.target)[chosen]
        if self.samples_per_class is not None:
            keep = torch.cat([chosen[labels == c][: self.samples_per_class] for c in range(10)]).sort().values
            chosen, labels = keep, torch.as_tensor(bunch.target)[keep]
        images = torch.as_tensor(bunch.images, dtype=torch.float32)[chosen] / 16.0
        names = [f"digits/{i}" for i in chosen.tolist()]
        class_names = [str(c) for c in range(10)]
        if self.n_points is None:
            points, weights = pixel_point_sets(images)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            points, weights = jittered_pixel_samples(images, self.n_points, generator), None
        return PointSetSplit(points=points, labels=labels.long(), class_names=class_names, weights=weights,
                             names=names, dataset="digits", split=split)


@hookimpl
def gmbench_dataset():
    return Digits
