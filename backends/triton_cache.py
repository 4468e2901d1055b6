"""Triton's cache of compiled kernels, kept in a folder only the current user can write.

Triton compiles each kernel's launcher (and its driver utilities) into a shared
library in its cache folder and imports it with ``importlib``, without any
check, and it loads GPU binaries from there by name.  A library planted there
runs with the user's rights, so the ``fused`` backend applies the rules of
:mod:`gmbench.backends.native` to that folder before its first compile or
launch (:func:`prepare_cache`):

* ``TRITON_CACHE_DIR`` set (or ``TRITON_HOME``, whose ``.triton/cache`` Triton
  then uses): that folder is created with mode 0700 if missing and checked
  with :func:`native.check_private_folder` (a real folder of the user, not
  writable by group or others, no parent writable by others unless sticky).
  If it fails, one warning line names the folder and the reason, and Triton is
  pointed at the private default instead: the run goes on, its kernels are
  compiled once more, nothing from the refused folder is loaded.
* Neither set: ``<kernel folder>/triton`` inside gmbench's private kernel
  folder (:func:`native.kernel_dir`, ``~/.cache/gmbench-kernels-<uid>`` or
  ``$GMBENCH_KERNEL_DIR``), both created with mode 0700 and checked.  If even
  that folder is not private, the backend is unavailable and says why.

Triton 3.x reads ``TRITON_CACHE_DIR`` from the environment at every cache
access (``triton.knobs.cache.dir``; ``triton.runtime.cache.FileCacheManager``),
so exporting the checked folder there before the first launch is enough, also
after ``import triton``; the export reaches worker processes started later.
Triton's interpreter (``TRITON_INTERPRET=1``) compiles and loads nothing, so
no folder is needed there.  A cache manager chosen with
``TRITON_CACHE_MANAGER`` is the user's own choice and is left alone.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from gmbench.backends import native

CACHE_DIR_ENV = "TRITON_CACHE_DIR"
HOME_ENV = "TRITON_HOME"

log = logging.getLogger("gmbench.backends")


def default_cache_dir() -> Path:
    """The gmbench-managed folder for Triton's cache: beside the C++ kernels, private like them."""
    return native.kernel_dir() / "triton"


def requested_cache_dir() -> tuple[str, Path] | None:
    """``(variable, folder)`` of the cache folder the user asked Triton for, or ``None``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return CACHE_DIR_ENV, Path(explicit).expanduser().absolute()
    home = os.environ.get(HOME_ENV)
    if home:
        return HOME_ENV, Path(home).expanduser().absolute() / ".triton" / "cache"
    return None


def _ensure_private(folder: Path, variable: str) -> None:
    """:func:`native.ensure_private_folder`, its advice naming the variable that chose ``folder``."""
    try:
        native.ensure_private_folder(folder)
    except (native.UnsafeLibraryError, OSError) as error:
        # native's messages end in "set GMBENCH_KERNEL_DIR to a folder ..."; here the
        # folder came from another variable, and that is the one to change.
        text = str(error) if isinstance(error, native.UnsafeLibraryError) else f"cannot check {folder}: {error}"
        raise native.UnsafeLibraryError(text.replace(native.KERNEL_DIR_ENV, variable)) from None


def _export(folder: Path) -> None:
    os.environ[CACHE_DIR_ENV] = str(folder)
    try:
        from triton import knobs  # Triton >= 3.4; earlier versions read only the environment
    except ImportError:
        return
    knobs.cache.dir = str(folder)  # also replaces a value set in Python, which wins over the environment


def configure_cache() -> str | None:
    """Point Triton at a private cache folder; ``None``, or why there is none.

    Logs one warning when the folder the user asked for is refused.  Runs the
    checks on every call (see :func:`prepare_cache` for once per process).
    """
    requested = requested_cache_dir()
    if requested is not None:
        variable, folder = requested
        try:
            _ensure_private(folder, variable)
        except native.UnsafeLibraryError as error:
            refused = str(error)
        else:
            _export(folder)
            return None
    default = default_cache_dir()
    try:
        _ensure_private(default.parent, native.KERNEL_DIR_ENV)
        _ensure_private(default, native.KERNEL_DIR_ENV)
    except native.UnsafeLibraryError as error:
        reason = f"no private folder for Triton's compiled kernels: {error}"
        if requested is not None:
            reason += f" ({requested[0]} was refused too: {refused})"
        return reason
    if requested is not None:
        log.warning("Triton cache: not using %s=%s: %s; compiling into %s instead", variable, folder, refused, default)
    _export(default)
    return None


@functools.lru_cache(maxsize=1)
def prepare_cache() -> str | None:
    """:func:`configure_cache` once per process (one warning at most); ``None`` or the reason."""
    return configure_cache()
