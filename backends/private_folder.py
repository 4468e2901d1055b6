"""The private folder compiled libraries live in, checked the way ssh checks ``~/.ssh``.

:mod:`gmbench.backends.native` builds and loads libraries only in :func:`kernel_dir`:
``$GMBENCH_KERNEL_DIR``, else ``$XDG_CACHE_HOME/gmbench-kernels-<uid>`` (default
``~/.cache/gmbench-kernels-<uid>``), never in ``$GMBENCH_CACHE`` (the data cache that
clusters share), because a library runs with the user's rights the moment it is loaded.
:func:`ensure_private_folder` creates it with mode 0700; :func:`check_private_folder`
(before every load) accepts only a real folder, not a symbolic link, owned by the current
user, not writable by group or others, with every parent owned by root or the user and not
writable by others unless sticky (like ``/tmp``).  Group write is accepted only for the
user's private group (the user private group scheme, as Debian's ssh does).
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import stat
from pathlib import Path

KERNEL_DIR_ENV = "GMBENCH_KERNEL_DIR"


class UnsafeLibraryError(RuntimeError):
    """The kernel folder is unsafe, or a library failed verification even after a rebuild."""


def kernel_dir() -> Path:
    """The private folder compiled libraries are built in and loaded from."""
    explicit = os.environ.get(KERNEL_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore relative values
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / f"gmbench-kernels-{os.geteuid()}"


@functools.lru_cache(maxsize=None)
def _is_private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own primary group with no other listed members."""
    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == user.pw_gid and set(group.gr_mem) <= {user.pw_name}


def _writable_by_others(st: os.stat_result, uid: int) -> bool:
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _is_private_group(st.st_gid, uid)


def check_private_folder(folder: Path) -> None:
    """Raise :class:`UnsafeLibraryError` unless only the current user can change ``folder``."""
    uid = os.geteuid()
    fix = f"fix it, or set {KERNEL_DIR_ENV} to a folder only you can write"
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeLibraryError(f"kernel folder {folder} is a symbolic link; replace it by a real folder ({fix})")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeLibraryError(f"kernel folder {folder} is not a folder; remove it ({fix})")
    if st.st_uid != uid:
        raise UnsafeLibraryError(f"kernel folder {folder} belongs to uid {st.st_uid}, not to you (uid {uid}); {fix}")
    if _writable_by_others(st, uid):
        raise UnsafeLibraryError(
            f"kernel folder {folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 700 {folder}`, or set {KERNEL_DIR_ENV} to a folder only you can write"
        )
    for parent in Path(os.path.realpath(folder)).parents:
        st = os.stat(parent)
        if st.st_uid not in (0, uid):
            raise UnsafeLibraryError(
                f"{parent}, a parent of the kernel folder {folder}, belongs to uid {st.st_uid}; {fix}"
            )
        if _writable_by_others(st, uid) and not st.st_mode & stat.S_ISVTX:
            raise UnsafeLibraryError(
                f"{parent}, a parent of the kernel folder {folder}, is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) and not sticky; {fix}"
            )


def ensure_private_folder(folder: Path) -> None:
    """Create ``folder`` (mode 0700) if needed and check it (:func:`check_private_folder`)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise UnsafeLibraryError(
            f"cannot create the kernel folder {folder}: {error.strerror}; set {KERNEL_DIR_ENV} to a folder you own"
        ) from None
    check_private_folder(folder)
