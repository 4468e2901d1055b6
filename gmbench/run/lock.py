"""One ``gmbench run`` per run folder: an OS lock that the driver *and its workers* hold.

``<run folder>/.lock`` is locked with ``flock(LOCK_EX)`` by the driver.  Worker
processes inherit that very lock (the same open file description, passed to
them when they are spawned, see :meth:`RunLock.for_child`), so the kernel
releases it only when the last process of the run has exited: a run whose
driver was killed while its workers still train keeps its folder locked until
they are gone, and a second run cannot start writing next to them.  No pid is
ever trusted (pids are reused), and a lock whose processes are all dead is free
without anybody deleting a file.

The file's content only serves the message of a refused run: the driver's
pid, host and start time and the pids of its workers.  On storage whose
``flock`` does not reach other hosts (NFS mounted with ``nolock``), two hosts
can still share a folder: start a run folder's runs from one host.

Where ``flock`` is missing (Windows) or the file system refuses it (Lustre
mounted without ``-o flock``) the lock file is created exclusively instead and
records the driver's and workers' pids; it is taken over only when it comes
from this host and none of those processes is alive (pids can be reused: a
lock that looks alive but is not can be deleted by hand, as the message says).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from gmbench.errors import GmbenchError
from gmbench.run.folder import LOCK_FILE

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("gmbench.run")

# The locks this process holds, by resolved run folder (executors pass them on to workers).
_held: dict[Path, "RunLock"] = {}


class RunFolderInUse(GmbenchError):
    """Another gmbench run (or processes it started) holds the run folder."""


class RunLock:
    """The exclusive lock of one run folder; use :func:`run_lock`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.uses_flock = False
        self.acquired_at: float | None = None
        self.workers: tuple[int, ...] = ()
        self._record = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ----------------------------------------------------------------- acquire / release

    def acquire(self) -> "RunLock":
        if fcntl is None or not self._acquire_flock():
            self._acquire_exclusive_create()
        self.acquired_at = time.time()
        self._write_record()
        _held[self.run_dir.resolve()] = self
        return self

    def _acquire_flock(self) -> bool:
        """Take the flock; False if this file system does not support flock."""
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue  # released in between: create it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise RunFolderInUse(_in_use_message(self.run_dir, self.path, holder)) from None
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                if created:
                    self.path.unlink(missing_ok=True)
                log.debug("%s: no flock on this file system (%s); using an exclusive lock file", self.path, error.strerror)
                return False
            # The previous holder unlinks the file when it releases it: if that happened
            # between our open and our flock, we hold a lock on a deleted file; start over.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.uses_flock = fd, True
                previous = _read_record(fd)
                if previous.get("pid") not in (None, os.getpid()):
                    log.debug("taking over %s: the run of pid %s has ended", self.path, previous.get("pid"))
                return True
            os.close(fd)

    def _acquire_exclusive_create(self) -> None:
        """Without flock: create the file exclusively; take over a stale one (see the module doc)."""
        for _ in range(3):
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                return
            except FileExistsError:
                holder = _read_file_record(self.path)
            if not _stale(holder, self.path):
                raise RunFolderInUse(
                    _in_use_message(self.run_dir, self.path, holder)
                    + f" (if no such process runs any more, delete {self.path})"
                ) from None
            log.debug("taking over %s: none of the processes it names runs any more", self.path)
            self.path.unlink(missing_ok=True)
        raise RunFolderInUse(f"run folder '{self.run_dir}': another gmbench run keeps taking its lock {self.path}; wait for it to finish")

    def release(self) -> None:
        if self.fd is None:
            return
        _held.pop(self.run_dir.resolve(), None)
        # Unlink while still holding it; a waiting acquirer then notices the inode changed.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    # ----------------------------------------------------------------- workers

    def note_workers(self, pids) -> None:
        """Record the worker pids in the lock file (for the message a refused run prints)."""
        pids = tuple(sorted(int(pid) for pid in pids))
        if pids != self.workers and self.fd is not None:
            self.workers = pids
            self._write_record()

    def for_child(self) -> "InheritedLock | None":
        """A picklable handle that gives a *spawned* worker process this very lock.

        Pass it in the worker's ``initializer`` arguments (or ``Process`` args): there it
        arrives as the inherited descriptor (an ``int``), kept open for the worker's
        lifetime.  ``None`` without ``fcntl``.
        """
        if not self.uses_flock or self.fd is None:
            return None  # an exclusive lock file: the workers are recorded by pid instead
        return InheritedLock(self.fd)

    def _write_record(self) -> None:
        record = dict(self._record, workers=list(self.workers))
        data = (json.dumps(record) + "\n").encode()
        # Written in place: the lock lives on this inode, so no rename (io.write_text) here.
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


class InheritedLock:
    """The lock's file descriptor, duplicated into a spawned process while it starts.

    ``multiprocessing`` pickles a process's arguments while it spawns it; there
    :func:`multiprocessing.reduction.DupFd` adds the descriptor to the ones the
    child inherits, so the child holds the same open file description (and so the
    same ``flock``).  Pickled at any other time it cannot be sent and raises.
    """

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import context, reduction

        if context.get_spawning_popen() is None:
            raise TypeError("an InheritedLock can only be passed to a process while it is spawned (initializer or Process args)")
        return (_inherited, (reduction.DupFd(self.fd),))


# Descriptors of inherited locks: kept open for this process's lifetime.
_inherited_fds: list[int] = []


def _inherited(dup) -> int:
    fd = dup.detach()
    _inherited_fds.append(fd)
    return fd


def held(run_dir: str | os.PathLike) -> RunLock | None:
    """The lock this process holds on ``run_dir``, if any (executors pass it to workers)."""
    return _held.get(Path(run_dir).resolve())


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[RunLock]:
    """Hold the run folder's lock; raise :class:`RunFolderInUse` if a run holds it."""
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        record = json.loads(text) if text.strip() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_file_record(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


# An empty exclusive lock file older than this was left by a run killed while it wrote it.
_EMPTY_LOCK_STALE_S = 10.0


def _stale(holder: dict, path: Path) -> bool:
    """An exclusive lock file whose processes (driver and workers, on this host) are all gone."""
    if not holder:
        try:
            return time.time() - path.stat().st_mtime > _EMPTY_LOCK_STALE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False  # another host's processes cannot be checked from here
    return not any(_alive(pid) for pid in [holder.get("pid"), *(holder.get("workers") or [])])


def _alive(pid) -> bool:
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use_message(run_dir: Path, path: Path, holder: dict) -> str:
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    workers = [int(w) for w in holder.get("workers") or [] if str(w).isdigit()]
    text = f"run folder '{run_dir}' is in use by another gmbench run (pid {pid} on {host}, since {since})"
    if host == socket.gethostname() and pid is not None and not _alive(pid):
        live = [w for w in workers if _alive(w)]
        text = (
            f"run folder '{run_dir}' is still locked by worker processes of a gmbench run whose driver "
            f"(pid {pid}, since {since}) is gone" + (f": pids {', '.join(map(str, live))}" if live else "")
            + "; they stop by themselves within seconds, else end them (kill PID) and run again"
        )
        return text
    if workers:
        text += f" with worker processes {', '.join(map(str, workers))}"
    return text + "; wait for it to finish or stop it (Ctrl-C), then run again"
