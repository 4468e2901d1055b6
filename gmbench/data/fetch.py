"""``gmbench data fetch``: download a data set into the layout its loader reads.

Each data set in :data:`SOURCES` lists its files with the publisher's URLs and
the published size and SHA-256 (where one is published; each value says where
it comes from).  Files are downloaded into ``<root>/downloads/`` (resumable,
see :mod:`gmbench.data.download`), verified, and unpacked into a temporary
folder beside the target that is then renamed into place, so the loaders never
see half a data set:

* ``mnist`` / ``fashion_mnist``: the four gzipped IDX files in
  ``<root>/MNIST/raw/`` / ``<root>/FashionMNIST/raw/`` (torchvision's layout;
  the loader reads ``.gz`` directly);
* ``modelnet10`` / ``modelnet40``: the Princeton OFF meshes in
  ``<root>/ModelNet10/<class>/{train,test}/*.off`` (``__MACOSX`` entries of the
  archive are dropped).  Princeton publishes no checksum for its archives:
  gmbench checks every member's CRC and the published mesh counts, and pins the
  first download's SHA-256 in ``<root>/gmbench-fetch.json``, which later
  downloads into that root must match.

``<root>/gmbench-fetch.json`` records every fetched file (URL, size, SHA-256,
where the expected value came from, date).  A file put by hand into
``<root>/downloads/`` is verified and used instead of downloading.  A mirror
(``--mirror URL`` or ``$GMBENCH_DATA_MIRROR``) serves
``<mirror>/<data set>/<file name>`` and replaces the publisher's URLs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import urllib.error
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Iterator

from gmbench.data.download import DownloadError, RemoteFile, download, reason, sha256_of
from gmbench.errors import DataError
from gmbench.io import write_json

MIRROR_VARIABLE = "GMBENCH_DATA_MIRROR"
DOWNLOADS = "downloads"
RECORD = "gmbench-fetch.json"
LOCK = ".gmbench-fetch.lock"

# MNIST: sizes and SHA-256 from TensorFlow Datasets, tensorflow_datasets/url_checksums/mnist.txt
# (recorded on the storage.googleapis.com/cvdf-datasets mirror of LeCun's files; the same
# files torchvision checks by MD5 on its ossci-datasets mirror).
_MNIST_TFDS = "TensorFlow Datasets url_checksums/mnist.txt"
_MNIST_URLS = ("http://yann.lecun.com/exdb/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
               "https://ossci-datasets.s3.amazonaws.com/mnist/")
# Fashion-MNIST: sizes and SHA-256 from TensorFlow Datasets, url_checksums/fashion_mnist.txt,
# recorded on Zalando's own server.
_FASHION_TFDS = "TensorFlow Datasets url_checksums/fashion_mnist.txt"
_FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


def _idx_files(bases: tuple[str, ...], source: str, values: dict[str, tuple[int, str]]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(name, tuple(base + name for base in bases), size, sha, source)
                 for name, (size, sha) in values.items())


@dataclass(frozen=True)
class DataSource:
    """Where a data set comes from and where under the data root its loader reads it.

    ``meshes``: for an OFF archive, the number of ``*.off`` files per split it holds.
    """

    name: str
    folder: str
    files: tuple[RemoteFile, ...]
    homepage: str
    meshes: dict[str, int] = field(default_factory=dict)

    def with_mirror(self, mirror: str) -> "DataSource":
        base = mirror.rstrip("/")
        return replace(self, files=tuple(replace(f, urls=(f"{base}/{self.name}/{f.name}",)) for f in self.files))


SOURCES: dict[str, DataSource] = {
    "mnist": DataSource("mnist", "MNIST/raw", _idx_files(_MNIST_URLS, _MNIST_TFDS, {
        "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    }), "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": DataSource("fashion_mnist", "FashionMNIST/raw", _idx_files(_FASHION_URLS, _FASHION_TFDS, {
        "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    }), "https://github.com/zalandoresearch/fashion-mnist"),
    # Princeton publishes neither size nor checksum; URLs as torch_geometric.datasets.ModelNet
    # uses them. Mesh counts: the standard splits (3991 / 908 and 9843 / 2468 OFF files).
    "modelnet10": DataSource("modelnet10", "ModelNet10", (RemoteFile(
        "ModelNet10.zip", ("http://3dvision.princeton.edu/projects/2014/3DShapeNets/ModelNet10.zip",), None, None,
        "none published by Princeton"),), "https://modelnet.cs.princeton.edu", {"train": 3991, "test": 908}),
    "modelnet40": DataSource("modelnet40", "ModelNet40", (RemoteFile(
        "ModelNet40.zip", ("http://modelnet.cs.princeton.edu/ModelNet40.zip",), None, None,
        "none published by Princeton"),), "https://modelnet.cs.princeton.edu", {"train": 9843, "test": 2468}),
}


@dataclass
class FetchResult:
    name: str
    location: Path
    status: str  # "fetched" or "present"
    notes: list[str] = field(default_factory=list)


def fetch(name: str, root: str | os.PathLike, mirror: str | None = None, progress: bool = True,
          force: bool = False) -> FetchResult:
    """Download, verify and unpack data set ``name`` under ``root``; returns where it is."""
    if name not in SOURCES:
        raise DataError(f"no download known for data set '{name}'; gmbench data fetch knows {', '.join(SOURCES)}")
    source = SOURCES[name]
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_VARIABLE) or None
    if mirror:
        source = source.with_mirror(mirror)
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create data root {root}: {error.strerror}; pass a writable --root") from None
    target = root / source.folder
    with _lock(root / LOCK):
        record = _read_record(root)
        if target.exists() and not force:
            problem = _problem_with_unpacked(source, target, record)
            if problem is None:
                return FetchResult(name, target, "present")
            raise DataError(f"{target} exists but {problem}; pass --force to replace it with a fresh download")
        notes, entries = [], {}
        for remote in source.files:
            path, entry, note = _obtain(source, remote, root, record, progress)
            entries[remote.name] = (path, entry)
            notes += [note] if note else []
        _unpack(source, {n: p for n, (p, _) in entries.items()}, target)
        record.setdefault(name, {}).update({n: e for n, (_, e) in entries.items()})
        write_json(root / RECORD, record)
        for path, _ in entries.values():
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (root / DOWNLOADS).rmdir()
    return FetchResult(name, target, "fetched", notes)


def _obtain(source: DataSource, remote: RemoteFile, root: Path, record: dict, progress: bool):
    """A verified local copy of ``remote``: a file in downloads/ (by hand or from before) or a download."""
    local = root / DOWNLOADS / remote.name
    pinned = record.get(source.name, {}).get(remote.name, {})
    sha256 = remote.sha256 or pinned.get("sha256")
    size = remote.size if remote.size is not None else pinned.get("size")
    expected = remote if remote.sha256 else replace(remote, sha256=sha256, size=size)
    manual = f"put a copy downloaded by hand at {local} and run the command again"
    if local.exists():
        url = f"file {local}"
    else:
        part = local.with_name(local.name + ".part")
        url, reasons = None, []
        for candidate in remote.urls:
            try:
                download(candidate, part, size, progress, f"{source.name}: {remote.name}")
                url = candidate
                break
            except DownloadError:
                raise
            except (urllib.error.URLError, OSError) as error:
                reasons.append(reason(error))
        if url is None:
            others = ""
            if len(reasons) > 1:
                alike = len(set(reasons)) == 1
                others = f", and {len(reasons) - 1} mirror(s) " + ("failed the same way" if alike else
                                                                  f"({'; '.join(reasons[1:])})")
            raise DownloadError(f"cannot download {remote.name} for {source.name}: {reasons[0]} ({remote.urls[0]}"
                                f"{others}); {expected.expected()}; {manual}")
        os.replace(part, local)
    actual_size, actual = local.stat().st_size, sha256_of(local)
    if (size is not None and actual_size != size) or (sha256 is not None and actual != sha256):
        local.unlink()
        origin = "published" if remote.sha256 else f"pinned (in {root / RECORD})"
        expected_text = f"the {origin} sha256 is {sha256}" + (f" ({size} bytes)" if size is not None else "")
        found = (f"is larger than {size} bytes (the download stopped there)" if size is not None and actual_size > size
                 else f"has sha256 {actual} ({actual_size} bytes)")
        raise DownloadError(f"{remote.name} from {url} {found} but {expected_text}; the file was removed: "
                            f"run the command again, try another --mirror, or {manual}")
    note = None
    if sha256 is None:
        note = (f"{remote.name}: no checksum is published; pinned sha256 {actual} ({actual_size} bytes) in "
                f"{root / RECORD}: later downloads into {root} must match it")
    entry = {"url": url, "size": actual_size, "sha256": actual,
             "checksum_source": remote.checksum_source if remote.sha256 else (
                 pinned.get("checksum_source") or f"pinned on first download {_now()}"),
             "fetched": _now()}
    return local, entry, note


def _unpack(source: DataSource, files: dict[str, Path], target: Path) -> None:
    """Fill a temporary folder beside ``target``, check it, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if source.meshes:
            (archive,) = files.values()
            unpacked = _extract_meshes(archive, staging)
            problem = _mesh_count_problem(source, unpacked)
            if problem:
                archive.unlink(missing_ok=True)
                raise DownloadError(f"downloaded {archive.name} {problem}, so it is not the published data set; "
                                    "it was removed: run the command again or try another --mirror")
        else:
            for name, path in files.items():
                shutil.copyfile(path, staging / name)
            unpacked = staging
        _replace_folder(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_meshes(archive: Path, staging: Path) -> Path:
    """Extract the ``*.off`` members (CRC-checked) of a ModelNet archive; returns the folder holding the classes."""
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive} is not a zip archive; it was removed: run the command again") from None
    prefixes = set()
    with handle:
        for member in handle.infolist():
            parts = PurePosixPath(member.filename).parts
            if member.is_dir() or "__MACOSX" in parts or not member.filename.endswith(".off") or len(parts) < 3:
                continue
            if parts[-2] not in ("train", "test") or any(p in ("..", "") for p in parts) or member.filename.startswith("/"):
                continue  # not <class>/<split>/<name>.off, or a path that would leave the folder
            prefixes.add(parts[:-3])
            destination = staging.joinpath(*parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with handle.open(member) as data, open(destination, "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
            except (zipfile.BadZipFile, OSError, EOFError) as error:  # BadZipFile: "Bad CRC-32 for file ..."
                archive.unlink(missing_ok=True)
                raise DownloadError(f"{archive}: member {member.filename} is damaged ({error}); the archive was "
                                    "removed: run the command again") from None
    if len(prefixes) > 1:
        raise DownloadError(f"{archive} holds meshes under several top folders ({', '.join(sorted('/'.join(p) or '.' for p in prefixes))})")
    return staging.joinpath(*next(iter(prefixes), ()))


def _mesh_count_problem(source: DataSource, folder: Path) -> str | None:
    for split, expected in source.meshes.items():
        found = sum(1 for _ in folder.glob(f"*/{split}/*.off")) if folder.is_dir() else 0
        if found != expected:
            return f"holds {found} {split} meshes, the published {source.name} split has {expected}"
    return None


def _problem_with_unpacked(source: DataSource, target: Path, record: dict) -> str | None:
    """Why the existing ``target`` is not a complete copy (``None``: it is)."""
    if source.meshes:
        return _mesh_count_problem(source, target)
    for remote in source.files:
        path = target / remote.name
        expected = remote.sha256 or record.get(source.name, {}).get(remote.name, {}).get("sha256")
        if not path.is_file():
            return f"has no {remote.name}"
        if expected is not None and sha256_of(path) != expected:
            return f"its {remote.name} does not match the sha256 {expected}"
    return None


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` (``--force``) is moved aside first, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_record(root: Path) -> dict:
    path = root / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is unreadable ({error}); fix or delete it (it records the checksums of fetched files)") from None
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One fetch at a time per data root: two would write the same part files."""
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; fetches into one root must not overlap
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another 'gmbench data fetch' is downloading into {path.parent}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
