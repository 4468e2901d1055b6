"""MNIST and Fashion-MNIST from local IDX files (plugins ``mnist``, ``fashion_mnist``).

Expected files (gzipped ``.gz`` or not) in one of ``<root>/<folder>/``,
``<root>/<folder>/raw/`` or ``<root>`` itself, ``<folder>`` being ``MNIST`` /
``mnist`` or ``FashionMNIST`` / ``fashion_mnist`` / ``fashion-mnist``::

    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

Images become weighted 2D point sets (:mod:`gmbench.data.images`).  The GMCN
authors fitted 64 Gaussians to 4000 jittered pixel samples per image with
k-means initialisation and covariance regularisation 0.1: ``n_points: 4000``
with input fitting ``kmeans`` ``reg_covar: 0.1``.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from gmbench.data import paths
from gmbench.data.images import jittered_pixel_samples, pixel_point_sets
from gmbench.data.records import PointSetSplit
from gmbench.errors import DataError
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """An IDX array (LeCun's format: 2 zero bytes, type code, rank, big-endian int32 sizes, data).

    Gzipped data (``.gz`` as downloaded) is decompressed first.  A corrupt or
    truncated file raises a :class:`DataError` naming ``source``.
    """
    again = f"download {Path(source).name} again (or replace it with a good copy)"
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:  # zlib.error: "Error -3 while decompressing"
            raise DataError(f"{source}: corrupt gzip file ({error}); {again}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise DataError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'none'}); "
                        f"expected MNIST-format idx data: {again}")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, rank {rank} needs {header}); {again}")
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">i4"))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow
    if len(data) - header != expected or min(shape, default=0) < 0:
        raise DataError(f"{source}: IDX file holds {len(data) - header} data bytes but its header {shape} needs "
                        f"{expected}; the file is truncated or corrupt: {again}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    try:
        return parse_idx(path.read_bytes(), str(path))
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None


class IDXImages:
    """Base of the IDX image data sets."""

    folders: tuple[str, ...] = ()
    class_names: list[str] = []
    url = ""

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int | None, "jittered samples per image (null: one point per pixel)"] = None,
        max_samples: Annotated[int | None, "use the first this many images of a split (null: all)"] = None,
    ):
        if n_points is not None and n_points < 1:
            raise ValueError(f"n_points must be positive or None, got {n_points}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.data_root = data_root
        self.seed = int(seed)
        self.n_points = n_points
        self.max_samples = max_samples

    def _expected(self) -> str:
        names = ", ".join(FILES["train"] + FILES["test"])
        return (f"{self.folders[0]}/ (or {self.folders[0]}/raw/) with {names} (.gz or not) from {self.url} "
                f"('gmbench data fetch {self.name} --root DIR' downloads them)")

    def _find(self, root: Path, stem: str) -> Path:
        folders = [root / f for f in self.folders] + [root / f / "raw" for f in self.folders] + [root]
        for folder in folders:
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    return candidate
        raise DataError(f"{stem}[.gz] not found for data set '{self.name}' under {root}; expected {self._expected()}")

    def check(self) -> None:
        """Fail fast with a :class:`DataError` when any of the four IDX files is missing."""
        root = paths.data_root(self.data_root, self.name, self._expected())
        for stems in FILES.values():
            for stem in stems:
                self._find(root, stem)

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` of 2D points in pixel units (28x28 grid), weights = intensity / 255."""
        if split not in FILES:
            raise DataError(f"unknown split '{split}' for {self.name}; use train or test")
        root = paths.data_root(self.data_root, self.name, self._expected())
        image_path, label_path = (self._find(root, stem) for stem in FILES[split])
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{image_path} {images.shape} and {label_path} {labels.shape} do not match; "
                            "expected images [S, 28, 28] and labels [S]")
        if labels.size and int(labels.max()) >= len(self.class_names):
            raise DataError(f"{label_path}: label {int(labels.max())} out of range 0-{len(self.class_names) - 1}")
        if self.max_samples is not None:
            images, labels = images[: self.max_samples], labels[: self.max_samples]
        images = torch.from_numpy(images.astype(np.float32) / 255.0)
        names = [f"{self.name}/{split}/{i}" for i in range(len(labels))]
        if self.n_points is None:
            points, weights = pixel_point_sets(images)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            points, weights = jittered_pixel_samples(images, self.n_points, generator), None
        return PointSetSplit(points=points, labels=torch.from_numpy(labels.astype(np.int64)),
                             class_names=list(self.class_names), weights=weights, names=names,
                             dataset=self.name, split=split)


class MNIST(IDXImages):
    """MNIST handwritten digits from local IDX files, as pixel-weighted 2D point sets."""

    name = "mnist"
    folders = ("MNIST", "mnist")
    class_names = [str(c) for c in range(10)]
    url = "http://yann.lecun.com/exdb/mnist/"


class FashionMNIST(IDXImages):
    """Fashion-MNIST from local IDX files, as pixel-weighted 2D point sets."""

    name = "fashion_mnist"
    folders = ("FashionMNIST", "fashion_mnist", "fashion-mnist")
    class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
    url = "https://github.com/zalandoresearch/fashion-mnist"


@hookimpl
def gmbench_dataset():
    return [MNIST, FashionMNIST]
