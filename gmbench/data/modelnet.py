"""ModelNet10 / ModelNet40 point clouds from local files (plugins ``modelnet10``, ``modelnet40``).

Accepted layouts under the data root (checked in this order):

1. PointNet++'s resampled clouds ``modelnet40_normal_resampled/`` with the
   lists ``modelnet10_{train,test}.txt`` / ``modelnet40_{train,test}.txt``
   (one name such as ``chair_0001`` per line) and ``<class>/<name>.txt`` rows
   ``x,y,z,nx,ny,nz``; the first ``n_points`` rows are used, as PointNet++ does.
2. The Princeton meshes ``ModelNet10/<class>/{train,test}/<name>.off`` (or
   the data root itself being that folder), or the archive ``ModelNet10.zip``
   as downloaded; points are drawn by area-weighted surface sampling seeded
   per sample from ``seed`` and the file name (:mod:`gmbench.data.sampling`).

Every cloud is centred and scaled into the unit sphere (``normalize``).
The sampled clouds are cached (``cache_points``) in ``<cache dir>/points/``
(``$GMBENCH_CACHE`` or ``~/.cache/gmbench``), keyed by the parameters and the
size and modification time of every data file.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from gmbench import __version__
from gmbench.cache import default_cache_dir
from gmbench.data import paths
from gmbench.data.off import parse_off, read_off
from gmbench.data.records import PointSetSplit
from gmbench.data.sampling import normalize_to_unit_sphere, sample_surface
from gmbench.errors import DataError
from gmbench.io import load_torch, save_torch
from gmbench.parameters import DataRoot, Seed
from gmbench.plugins import hookimpl

SOURCES = ("auto", "resampled", "meshes")
SPLITS = ("train", "test")


def _expected(classes: int) -> str:
    return (
        f"ModelNet{classes}/<class>/{{train,test}}/*.off or ModelNet{classes}.zip "
        f"(https://modelnet.cs.princeton.edu) or modelnet40_normal_resampled/ with modelnet{classes}_train.txt "
        "(PointNet++: https://shapenet.cs.stanford.edu/media/modelnet40_normal_resampled.zip); "
        f"'gmbench data fetch modelnet{classes} --root DIR' downloads the meshes"
    )


def sample_seed(seed: int, name: str) -> int:
    """Per-sample generator seed: the same cloud for a file whatever else is loaded."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _class_of(name: str) -> str:
    return name.rsplit("_", 1)[0]


def _limit_per_class(entries: list[tuple[str, str]], samples_per_class: int | None) -> list[tuple[str, str]]:
    """``entries`` = ``(class, name)`` sorted by name; keep the first ``samples_per_class`` of each class."""
    if samples_per_class is None:
        return entries
    kept, counts = [], {}
    for cls, name in entries:
        if counts.get(cls, 0) < samples_per_class:
            kept.append((cls, name))
            counts[cls] = counts.get(cls, 0) + 1
    return kept


class ModelNet:
    """Base of the ModelNet plugins; ``classes`` is 10 or 40."""

    classes = 10

    def __init__(
        self,
        data_root: DataRoot = None,
        seed: Seed = 0,
        n_points: Annotated[int, "points per cloud (the first rows of a resampled cloud, else surface samples)"] = 1024,
        samples_per_class: Annotated[int | None, "keep the first this many samples of each class (null: all)"] = None,
        source: Annotated[Literal["auto", "resampled", "meshes"], "which files: PointNet++'s resampled clouds, the OFF meshes, or the first found"] = "auto",
        normalize: Annotated[bool, "centre every cloud and scale it into the unit sphere"] = True,
        cache_points: Annotated[bool, "keep sampled clouds in <cache dir>/points/"] = True,
    ):
        if n_points < 1:
            raise ValueError(f"n_points must be positive, got {n_points}")
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.data_root = data_root
        self.seed = int(seed)
        self.n_points = int(n_points)
        self.samples_per_class = samples_per_class
        self.source = source
        self.normalize = bool(normalize)
        self.cache_points = bool(cache_points)

    @property
    def dataset_name(self) -> str:
        return f"modelnet{self.classes}"

    def check(self) -> None:
        """Fail fast with a :class:`DataError` when no data root is set or it is not a folder,
        or a class folder of the Princeton layout holds no meshes."""
        root = paths.data_root(self.data_root, self.dataset_name, _expected(self.classes))
        folder = self._mesh_folder(root)
        if self.source != "resampled" and folder is not None:
            _check_no_empty_classes(folder, _class_folders(folder))

    def load(self, split: str) -> PointSetSplit:
        """``PointSetSplit`` with points ``[S, n_points, 3]``, no weights, labels by sorted class name."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}' for {self.dataset_name}; use train or test")
        root = paths.data_root(self.data_root, self.dataset_name, _expected(self.classes))
        cache_file = self._points_cache_path(root, split) if self.cache_points else None
        if cache_file is not None and cache_file.exists():
            cached = self._read_points_cache(cache_file, split)
            if cached is not None:
                return cached
        loaded = self._load_files(root, split)
        if cache_file is not None:
            save_torch(cache_file, {"points": loaded.points, "labels": loaded.labels,
                                    "class_names": loaded.class_names, "names": loaded.names})
        return loaded

    def _points_cache_path(self, root: Path, split: str) -> Path:
        """Sampled clouds are cached too: parsing thousands of meshes takes minutes, and the
        runner loads the data set for every cell.  The key covers every parameter and the
        size and modification time of every data file."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.dataset_name, split, str(root.resolve()), self.seed, self.n_points,
                                  self.samples_per_class, self.source, self.normalize, __version__]).encode())
        candidates = [root / "modelnet40_normal_resampled", root / f"ModelNet{self.classes}",
                      root / f"ModelNet{self.classes}.zip"]
        present = [c for c in candidates if c.exists()] or [root]
        for location in present:
            entries = [location] if location.is_file() else sorted(location.rglob("*"))
            for path in entries:
                if path.is_dir():  # an added or removed (empty) class folder changes the classes
                    digest.update(f"{path.relative_to(root)}/;".encode())
                    continue
                stat = path.stat()
                digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return default_cache_dir() / "points" / f"{self.dataset_name}-{split}-{digest.hexdigest()[:16]}.pt"

    def _read_points_cache(self, path: Path, split: str) -> PointSetSplit | None:
        try:
            payload = load_torch(path)
            result = PointSetSplit(points=payload["points"], labels=payload["labels"],
                                   class_names=list(payload["class_names"]), names=list(payload["names"]),
                                   dataset=self.dataset_name, split=split)
            if result.points.shape[1] != self.n_points or not bool(torch.isfinite(result.points).all()):
                raise ValueError("wrong shape or non-finite values")
            return result
        except Exception as error:  # a damaged cache file is only a lost shortcut
            warnings.warn(f"point cache {path} is unusable ({error}); loading the data files again", stacklevel=3)
            return None

    def _load_files(self, root: Path, split: str) -> PointSetSplit:
        resampled = paths.first_existing([root / "modelnet40_normal_resampled", root])
        if self.source in ("auto", "resampled") and resampled is not None and \
                (resampled / f"modelnet{self.classes}_{split}.txt").is_file():
            points, labels, names, classes = self._load_resampled(resampled, split)
        elif self.source == "resampled":
            raise DataError(f"no modelnet{self.classes}_{split}.txt under {root} or {root / 'modelnet40_normal_resampled'}; "
                            f"expected {_expected(self.classes)}")
        else:
            points, labels, names, classes = self._load_meshes(root, split)
        if self.normalize:
            points = normalize_to_unit_sphere(points)
        return PointSetSplit(points=points, labels=labels, class_names=classes, names=names,
                             dataset=self.dataset_name, split=split)

    def _load_resampled(self, folder: Path, split: str):
        listing = folder / f"modelnet{self.classes}_{split}.txt"
        names = sorted(line.strip() for line in listing.read_text().splitlines() if line.strip())
        entries = _limit_per_class([(_class_of(n), n) for n in names], self.samples_per_class)
        if not entries:
            raise DataError(f"{listing} lists no samples")
        found = set()
        for other in SPLITS:  # labels from both lists so train and test agree
            other_listing = folder / f"modelnet{self.classes}_{other}.txt"
            if other_listing.is_file():
                found |= {_class_of(line.strip()) for line in other_listing.read_text().splitlines() if line.strip()}
        classes = self._class_names(folder, found)
        unknown = sorted({c for c, _ in entries} - set(classes))
        if unknown:
            raise DataError(f"{listing} lists class '{unknown[0]}' which {folder / f'modelnet{self.classes}_shape_names.txt'} "
                            "does not name; add it there or fix the list")
        clouds = []
        for cls, name in entries:
            path = folder / cls / f"{name}.txt"
            try:
                rows = np.loadtxt(path, delimiter=",", dtype=np.float32, max_rows=self.n_points, ndmin=2)
            except (OSError, ValueError) as error:
                raise DataError(f"cannot read {path}: {error}; expected rows 'x,y,z,nx,ny,nz'") from None
            if rows.shape[0] < self.n_points or rows.shape[1] < 3:
                raise DataError(f"{path} has {rows.shape[0]} rows of {rows.shape[1]} values; need {self.n_points} rows 'x,y,z,...'")
            if not np.isfinite(rows[:, :3]).all():
                row = int(np.argmin(np.isfinite(rows[:, :3]).all(-1))) + 1
                raise DataError(f"{path}: row {row} has a NaN or infinite coordinate; the file is corrupt: "
                                "re-extract it from the data set archive or remove it from the lists")
            clouds.append(torch.from_numpy(rows[:, :3].copy()))
        labels = torch.tensor([classes.index(c) for c, _ in entries], dtype=torch.long)
        return torch.stack(clouds), labels, [n for _, n in entries], classes

    def _class_names(self, folder: Path, found: set[str]) -> list[str]:
        names_file = folder / f"modelnet{self.classes}_shape_names.txt"
        if names_file.is_file():
            return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        return sorted(found)

    def _mesh_folder(self, root: Path) -> Path | None:
        """The Princeton ``ModelNet<N>/`` folder (or the data root itself in that layout)."""
        folder = paths.first_existing([root / f"ModelNet{self.classes}"])
        if folder is None and any((root / c / s).is_dir() for c in _subfolders(root) for s in SPLITS):
            folder = root
        return folder

    def _load_meshes(self, root: Path, split: str):
        folder_name = f"ModelNet{self.classes}"
        folder = self._mesh_folder(root)
        archive = root / f"{folder_name}.zip"
        if folder is not None:
            files = sorted((p.parent.parent.name, p.stem, p) for p in folder.glob(f"*/{split}/*.off"))
            entries = _limit_per_class([(c, n) for c, n, _ in files], self.samples_per_class)
            lookup = {n: p for _, n, p in files}
            read = lambda name: (*read_off(lookup[name]), str(lookup[name]))
            where = folder
            all_classes = _class_folders(folder)
            _check_no_empty_classes(folder, all_classes)
        elif archive.is_file():
            try:
                handle = zipfile.ZipFile(archive)
            except zipfile.BadZipFile:
                raise DataError(f"{archive} is not a valid zip archive; download it again") from None
            members, all_classes = {}, set()
            for member in handle.namelist():
                parts = member.split("/")
                if "__MACOSX" in parts or not member.endswith(".off") or len(parts) < 3:
                    continue
                all_classes.add(parts[-3])
                if parts[-2] == split:
                    members[Path(parts[-1]).stem] = (parts[-3], member)
            entries = _limit_per_class(sorted((c, n) for n, (c, _) in members.items()), self.samples_per_class)
            entries.sort(key=lambda e: e[1])
            read = lambda name: (*parse_off(_read_member(handle, archive, members[name][1]),
                                            f"{archive}:{members[name][1]}"), f"{archive}:{members[name][1]}")
            where = archive
        else:
            raise DataError(f"no ModelNet{self.classes} files under {root}; expected {_expected(self.classes)}")
        entries.sort(key=lambda e: e[1])
        if not entries:
            raise DataError(f"no {split} meshes (*.off) in {where}; expected {_expected(self.classes)}")
        # Labels from every class folder, so train and test agree even if a split lacks a class.
        classes = sorted(all_classes)
        clouds = []
        for cls, name in entries:
            vertices, faces, source = read(name)
            generator = torch.Generator().manual_seed(sample_seed(self.seed, name))
            try:
                clouds.append(sample_surface(vertices, faces, self.n_points, generator))
            except ValueError as error:
                raise DataError(f"{source}: {error}; the file is corrupt: re-extract it from the data set archive "
                                "or remove it") from None
        labels = torch.tensor([classes.index(c) for c, _ in entries], dtype=torch.long)
        return torch.stack(clouds).float(), labels, [n for _, n in entries], classes


def _read_member(handle: zipfile.ZipFile, archive: Path, member: str) -> str:
    try:
        with handle.open(member) as stream:
            return io.TextIOWrapper(stream, encoding="ascii", errors="replace").read()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:  # e.g. "Bad CRC-32"
        raise DataError(f"{archive}:{member}: damaged archive member ({error}); download {archive.name} again") from None


def _class_folders(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if any((p / split).is_dir() for split in SPLITS)}


def _check_no_empty_classes(folder: Path, classes: set[str]) -> None:
    """A class folder without meshes would become a label no sample has (and shift the
    labels of every class after it)."""
    for cls in sorted(classes):
        if not any(any((folder / cls / split).glob("*.off")) for split in SPLITS):
            raise DataError(f"{folder / cls}: class folder has no meshes (*.off) in train/ or test/; "
                            "restore its files or remove the folder")


def _subfolders(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


class ModelNet10(ModelNet):
    """ModelNet10 from local files: Princeton OFF meshes (folder or zip) or PointNet++'s resampled clouds."""

    name = "modelnet10"
    classes = 10


class ModelNet40(ModelNet):
    """ModelNet40 from local files: Princeton OFF meshes (folder or zip) or PointNet++'s resampled clouds."""

    name = "modelnet40"
    classes = 40


@hookimpl
def gmbench_dataset():
    return [ModelNet10, ModelNet40]
