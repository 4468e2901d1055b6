"""Worker processes die with their driver, and stop when the driver tells them to.

A worker (a spawned process running cells) must never outlive the ``gmbench
run`` that started it: an orphan would go on writing into the run folder while
a rerun works there.  :func:`die_with_parent`, called first thing in a worker,
arranges two independent ways to end it:

* on Linux the kernel sends it ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), whatever killed the parent, ``kill -9``
  included;
* everywhere, a daemon thread waits on the parent's sentinel (the pipe whose
  other end only the parent holds, :func:`multiprocessing.parent_process`);
  its end of file means the parent is gone, and the thread ends the process.

:func:`worker_signals` makes a worker ignore ``SIGINT`` (a Ctrl-C reaches
every process of the terminal's process group; the driver decides what
happens, records the cells and stops the workers) and turns ``SIGTERM`` into
``SystemExit``, so that the atomic writes in flight remove their temporary
files as the worker stops.

On the driver, :func:`stop_on_sigterm` makes ``SIGTERM`` (a scheduler's
"time is up", ``kill PID``) stop a run the way Ctrl-C does: as
:class:`RunInterrupted`, a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from gmbench.run import folder as run_folder

log = logging.getLogger("gmbench.run")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Exit code of a worker that noticed its driver is gone (as if killed by SIGKILL).
ORPHAN_EXIT_CODE = 128 + 9


def die_with_parent(use_prctl: bool = True, watch: bool = True) -> None:
    """End this process when its parent process ends (call it in a spawned worker)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if use_prctl:
        set_parent_death_signal(signal.SIGKILL)
    if parent is None:
        return  # not a multiprocessing child: nothing to watch
    if not parent.is_alive():  # the parent died before the death signal was armed
        os._exit(ORPHAN_EXIT_CODE)
    if watch:
        threading.Thread(target=_watch_parent, args=(parent.sentinel,), name="gmbench-parent-watch", daemon=True).start()


def set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError):  # no libc symbol (static or unusual libc)
        return False
    return True


def _watch_parent(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])  # ready (end of file) only once the parent has exited
    os._exit(ORPHAN_EXIT_CODE)


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def worker_signals() -> None:
    """Ctrl-C is the driver's to handle; SIGTERM stops the worker through ``SystemExit``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)


class RunInterrupted(KeyboardInterrupt):
    """The driver received a stop signal (``SIGTERM``); handled like Ctrl-C."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def interrupt_name(interrupt: BaseException) -> str:
    """How a run was stopped, for the cells it interrupted: ``Ctrl-C``, ``SIGTERM``, ..."""
    if isinstance(interrupt, RunInterrupted):
        return interrupt.signal_name
    if isinstance(interrupt, KeyboardInterrupt):
        return "Ctrl-C"
    return type(interrupt).__name__


@contextlib.contextmanager
def stop_on_sigterm():
    """While inside: ``SIGTERM`` raises :class:`RunInterrupted` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # Once: a second SIGTERM must not break the clean-up the first one started.
        signal.signal(signum, signal.SIG_IGN)
        raise RunInterrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def record_interrupted(folder, interrupt: BaseException, since: float | None = None) -> dict:
    """Write and return the metrics of a cell stopped mid-run: status ``interrupted``.

    A cell that finished (``metrics.json`` written at or after ``since``) just before
    the interrupt keeps its metrics.
    """
    folder = Path(folder)
    path = folder / run_folder.METRICS_FILE
    if since is not None and path.is_file() and path.stat().st_mtime >= since:
        written = run_folder.read_metrics_file(path)
        if written.get("status") == "ok":
            return written
    done = run_folder.count_epochs(folder)
    if done:
        again = f"after {done} epoch(s); run the same command again to resume it from its checkpoint"
    else:
        again = "before its first epoch; run the same command again to run it"
    return run_folder.write_failure(folder, "interrupted", f"interrupted by {interrupt_name(interrupt)} {again}")
