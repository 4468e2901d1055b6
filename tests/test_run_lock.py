"""The run lock without flock (Windows, Lustre without ``-o flock``): an exclusive lock file
that records the driver's and workers' pids and is taken over only when all of them are gone."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from gmbench.run import lock as run_lock
from gmbench.run.lock import RunFolderInUse, RunLock


@pytest.fixture
def no_flock(monkeypatch):
    """A file system that refuses flock, as Lustre without ``-o flock`` does."""

    def refuse(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", refuse)


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_without_flock_a_second_run_is_refused_and_the_lock_freed_on_release(tmp_path, no_flock):
    with run_lock.run_lock(tmp_path) as held:
        assert not held.uses_flock and held.for_child() is None
        held.note_workers([os.getpid()])
        with pytest.raises(RunFolderInUse, match="is in use by another gmbench run"):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / ".lock").read_text())["workers"] == [os.getpid()]
    assert not (tmp_path / ".lock").exists()
    with run_lock.run_lock(tmp_path):
        pass


def test_without_flock_a_lock_is_taken_over_only_when_its_driver_and_workers_are_gone(tmp_path, no_flock):
    path = tmp_path / ".lock"
    host = socket.gethostname()
    path.write_text(json.dumps({"pid": _dead_pid(), "host": host, "since": "then", "workers": [os.getpid()]}))
    with pytest.raises(RunFolderInUse) as info:  # the driver is gone, a worker (this process) is not
        RunLock(tmp_path).acquire()
    assert "is gone" in str(info.value) and str(os.getpid()) in str(info.value)
    path.write_text(json.dumps({"pid": _dead_pid(), "host": host, "since": "then", "workers": [_dead_pid()]}))
    with run_lock.run_lock(tmp_path) as held:
        assert json.loads(path.read_text())["pid"] == os.getpid() and held.fd is not None


def test_without_flock_another_hosts_lock_is_never_taken_over(tmp_path, no_flock):
    (tmp_path / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunFolderInUse, match=r"elsewhere.*delete"):
        RunLock(tmp_path).acquire()
