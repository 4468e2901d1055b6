"""Build and load compiled C++ helper libraries without trusting any shared folder.

A compiled library runs with the user's rights the moment it is loaded (its
constructors run inside ``dlopen``), and a truncated one kills the process
with SIGBUS when a page past its end is touched.  So a library is built and
loaded only under these rules:

* **Private folder.**  Libraries live in :func:`kernel_dir` (``$GMBENCH_KERNEL_DIR``,
  else a per-user folder under ``$XDG_CACHE_HOME``, never the shared data cache),
  created with mode 0700 and checked before every load the way ssh checks
  ``~/.ssh`` (:mod:`gmbench.backends.private_folder` has the rules).
* **Verified bytes.**  At build time the SHA-256 and size of the library are
  recorded in ``manifest.json`` in that folder (written atomically, under a
  lock).  A load opens the file with ``O_NOFOLLOW``, checks it is a regular
  file of the user, reads it, compares size and hash, and hands exactly those
  bytes to ``dlopen`` (through a sealed ``memfd``, or a private temporary
  copy), so nothing that was not hashed is ever mapped.
* **Rebuild once, then fall back.**  A missing library is built; a rejected
  one (not in the manifest, wrong size or hash, a link, unloadable) is rebuilt
  once with a warning; if that fails too, or the folder is unsafe,
  :class:`UnsafeLibraryError` is raised and :class:`NativeLibrary` logs one
  warning line and returns ``None`` so the caller takes its PyTorch path.

:class:`NativeLibrary` wraps this for a module: lazy build on first use,
``load()`` / ``unavailable_reason()``, an environment variable that disables
it.  Sources are ``.cpp`` files shipped next to the module (package data).
Besides system headers they may include headers of their own folder with
``#include "name.h"``: :func:`read_source` pastes those in, so the key, the
hash and the compiled private copy all cover the exact bytes of every file.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The folder rules live in gmbench.backends.private_folder; these names stay importable here.
from gmbench.backends.private_folder import (  # noqa: F401
    KERNEL_DIR_ENV,
    UnsafeLibraryError,
    check_private_folder,
    ensure_private_folder,
    kernel_dir,
)

MANIFEST = "manifest.json"
MAX_LIBRARY_BYTES = 256 << 20
COMPILE_TIMEOUT_S = 300

log = logging.getLogger("gmbench.backends")

# ctypes signature of one exported function: (argtypes, restype).
Signature = tuple[Sequence[Any], Any]


# Compiler flags of the vectorised mat-vec kernels (cpu_kernel.cpp, cutoff_kernel.cpp):
# -ffast-math lets GCC reassociate the reductions into vector lanes;
# -fno-finite-math-only keeps inf/NaN semantics so a diverging model still shows
# up as NaN; -fopenmp-simd honours `omp simd` without linking an OpenMP runtime.
VECTOR_KERNEL_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp-simd", "-pthread",
                       "-shared", "-fPIC")


def mat_vec_variant_symbols(argtypes_by_prefix: Mapping[str, Sequence[Any]]) -> dict[str, Signature]:
    """``{prefix_SUFFIX: (argtypes, None)}`` for every compiled variant of a mat-vec kernel.

    SUFFIX is ``{f32|f64}_{6|10}_w{1|2}``: the dtype, the number of features
    (2-D or 3-D Gaussians) and the weight sets sharing each exponential, as the
    kernels' ``extern "C"`` macros spell it.
    """
    return {
        f"{prefix}_{t}_{f}_w{w}": (list(argtypes), None)
        for t in ("f32", "f64") for f in (6, 10) for w in (1, 2) for prefix, argtypes in argtypes_by_prefix.items()
    }


class CompileError(RuntimeError):
    """No compiler, or the compiler failed: the caller silently uses its fallback."""


class _Rejected(Exception):
    """A library file that must not be loaded (the message says why); it is rebuilt."""


def _cpu_signature() -> str:
    # -march=native binaries are only valid on CPUs with the same instruction sets.
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise CompileError("no C++ compiler (g++) on PATH; install one or set CXX")
    return compiler


# ``#include "name.h"`` of a header next to the source (no folders in the name).
_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*"([^"/\\]+)"[^\n]*$', re.MULTILINE)


def read_source(source: str | os.PathLike) -> bytes:
    """The bytes compiled for ``source``: its own headers (``#include "x.h"``) pasted in place, once each.

    Pasting rather than ``-I``: the compiler reads only the private copy of
    these bytes, so the library key covers the headers, and a header changed
    after the key was computed cannot slip into the build.
    """
    source = Path(source)
    pasted: set[str] = set()

    def expand(path: Path) -> bytes:
        code = path.read_bytes()

        def paste(match: re.Match) -> bytes:
            name = match.group(1).decode()
            header = source.parent / name
            if not header.is_file():
                raise CompileError(f'{path}: #include "{name}" names no file in {source.parent}')
            if name in pasted:
                return b""
            pasted.add(name)
            line = code.count(b"\n", 0, match.end()) + 2
            # File names, not paths: the same sources give the same key (and library) wherever
            # gmbench is installed; a diagnostic still names the file and line.
            return (f'#line 1 "{header.name}"\n'.encode() + expand(header).rstrip(b"\n")
                    + f'\n#line {line} "{path.name}"'.encode())

        return _LOCAL_INCLUDE.sub(paste, code)

    return expand(source)


def library_name(source: Path, code: bytes, flags: Sequence[str], compiler: str) -> str:
    """File name of the library built from ``code``: keyed by source, flags, compiler and CPU."""
    key = hashlib.sha256(b"\0".join([code, *(f.encode() for f in flags), compiler.encode(), _cpu_signature().encode()]))
    return f"{source.stem}_{key.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Serialise builds and manifest updates of concurrent processes (one compiles, the others wait)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: builds may then race harmlessly
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_private_file(path: Path) -> int:
    """``O_NOFOLLOW`` (a link is refused) and ``O_NONBLOCK`` (a planted FIFO cannot hang us)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _Rejected(f"{path} is a symbolic link") from None
        raise _Rejected(f"cannot open {path}: {error.strerror}") from None


def _read_manifest(folder: Path) -> dict[str, dict]:
    """``{library file name: {"sha256", "size", ...}}``; damaged or missing -> ``{}`` (libraries are rebuilt)."""
    try:
        fd = _open_private_file(folder / MANIFEST)
    except (FileNotFoundError, _Rejected):
        return {}
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        try:
            payload = json.loads(handle.read(1 << 20))
        except ValueError:
            return {}
    libraries = payload.get("libraries") if isinstance(payload, dict) else None
    if not isinstance(libraries, dict):
        return {}
    return {
        name: record for name, record in libraries.items()
        if isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("size"), int)
    }


def _write_manifest(folder: Path, records: dict[str, dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=folder)  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"format": 1, "libraries": records}, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / MANIFEST)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read_verified(path: Path, record: dict | None) -> bytes:
    """The bytes of ``path`` if they are exactly what the manifest recorded; else :class:`_Rejected`."""
    fd = _open_private_file(path)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Rejected(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise _Rejected(f"{path} belongs to uid {st.st_uid}, not to you")
        if record is None:
            raise _Rejected(f"{path} is not recorded in {MANIFEST} (not built by gmbench here)")
        if st.st_size != record["size"]:
            raise _Rejected(f"{path} has {st.st_size} bytes, {record['size']} were built (truncated or replaced)")
        data = handle.read(min(record["size"], MAX_LIBRARY_BYTES) + 1)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise _Rejected(f"the SHA-256 of {path} differs from the one recorded when it was built (replaced or damaged)")
    return data


# memfds of loaded libraries stay open for the life of the process: dlopen matches
# libraries by path, so a reused /proc/self/fd/N would return the earlier library.
_loaded_images: list[int] = []


def _dlopen_bytes(data: bytes, name: str, folder: Path) -> ctypes.CDLL:
    """Load exactly ``data``: from a sealed memfd, else from a private temporary copy.

    Safe to dlopen: ``data`` are bytes whose SHA-256 matched the manifest written at build
    time in the private folder; no file that another user or a data source can write is
    ever handed to the loader.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                _write_all(fd, data)
                seals = sum(getattr(fcntl, s, 0) for s in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL"))
                if hasattr(fcntl, "F_ADD_SEALS"):
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
                library = ctypes.CDLL(f"/proc/self/fd/{fd}")
            except OSError:
                os.close(fd)  # e.g. vm.memfd_noexec forbids executable memfds: use a file instead
            else:
                _loaded_images.append(fd)
                return library
    fd, tmp = tempfile.mkstemp(prefix=f".load-{name}.", suffix=".so", dir=folder)  # mode 0600, private folder
    try:
        _write_all(fd, data)
        os.close(fd)
        fd = -1
        return ctypes.CDLL(tmp)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _bind(data: bytes, name: str, folder: Path, symbols: Mapping[str, Signature]) -> ctypes.CDLL:
    try:
        library = _dlopen_bytes(data, name, folder)
        for symbol, (argtypes, restype) in symbols.items():
            function = getattr(library, symbol)
            function.argtypes = list(argtypes)
            function.restype = restype
    except (OSError, AttributeError) as error:
        raise _Rejected(f"cannot load {folder / name}: {error}") from None
    return library


def _compile(compiler: str, flags: Sequence[str], source: Path, code: bytes, folder: Path, name: str) -> bytes:
    """Compile ``code`` into ``folder/name``, recording its hash first; return the built bytes."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        # Compile a private copy of the bytes the key was computed from (the source may change meanwhile).
        copy = Path(tmp) / source.name
        copy.write_bytes(code)
        built = Path(tmp) / name
        try:
            result = subprocess.run(
                [compiler, *flags, str(copy), "-o", str(built)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise CompileError(f"{compiler} could not run: {error}") from None
        if result.returncode != 0:
            raise CompileError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.chmod(built, 0o600)
        data = built.read_bytes()
        records = _read_manifest(folder)
        records[name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "source": str(source),
            "compiler": compiler,
            "flags": list(flags),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_manifest(folder, records)  # before the library appears: a library is never unrecorded
        os.replace(built, folder / name)
    return data


def build_library(
    source: str | os.PathLike, symbols: Mapping[str, Signature], flags: Sequence[str], description: str = "C++ library"
) -> ctypes.CDLL:
    """Build ``source`` (a ``.cpp`` file, see :func:`read_source`) in :func:`kernel_dir` if needed, verify it, load it.

    ``symbols`` maps each exported ``extern "C"`` function to its ctypes
    ``(argtypes, restype)``.  Raises :class:`CompileError` (no compiler, compile
    failure) or :class:`UnsafeLibraryError` (unsafe folder; verification or load
    failed again after one rebuild).  A rebuild after a rejected file logs one
    warning that names the file and the reason.
    """
    source = Path(source)
    compiler = find_compiler()
    code = read_source(source)
    folder = kernel_dir()
    ensure_private_folder(folder)
    name = library_name(source, code, flags, compiler)
    with _folder_lock(folder):
        problem = None
        try:
            return _bind(_read_verified(folder / name, _read_manifest(folder).get(name)), name, folder, symbols)
        except FileNotFoundError:
            pass
        except _Rejected as rejected:
            problem = str(rejected)
        data = _compile(compiler, flags, source, code, folder, name)
        try:
            library = _bind(data, name, folder, symbols)
        except _Rejected as rejected:
            raise UnsafeLibraryError(f"{rejected} (also after rebuilding it); remove {folder} to start afresh") from None
    if problem:
        log.warning("%s: %s; rebuilt it (if this repeats, check what else writes to %s)", description, problem, folder)
    return library


class NativeLibrary:
    """A C++ source file built on first use by :func:`build_library`; ``None`` when unavailable.

    ``disable_env``: an environment variable that, when set, disables the
    library.  ``fallback`` names what the caller uses instead (for the warning
    printed when the library is refused).
    """

    def __init__(self, source: str | os.PathLike, symbols: Mapping[str, Signature], flags: Sequence[str], *,
                 description: str, fallback: str, disable_env: str | None = None):
        self.source = Path(source)
        self.symbols = dict(symbols)
        self.flags = list(flags)
        self.description = description
        self.fallback = fallback
        self.disable_env = disable_env
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._reason: str | None = None
        self._tried = False

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or ``None`` (see :meth:`unavailable_reason`); built once per process."""
        with self._lock:
            if not self._tried:
                self._tried = True
                if self.disable_env and os.environ.get(self.disable_env):
                    self._reason = f"disabled by {self.disable_env}"
                else:
                    try:
                        self._library = build_library(self.source, self.symbols, self.flags, self.description)
                    except CompileError as error:
                        self._reason = f"cannot build the {self.description}: {error}"
                    except (UnsafeLibraryError, OSError) as error:
                        self._reason = f"{self.description} not loaded: {error}"
                        log.warning("%s not loaded, using %s: %s", self.description, self.fallback, error)
            return self._library

    def unavailable_reason(self) -> str | None:
        self.load()
        return self._reason
