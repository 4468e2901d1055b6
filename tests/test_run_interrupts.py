"""Kills, interrupts and concurrent runs: workers die with their driver, the run lock is held
by every process of a run, Ctrl-C stops at once, a second run writes nothing, temp files go.

Every test that starts processes kills what it started in a ``finally`` (process groups),
with bounded waits, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from suite_texts import blobs_suite, subprocess_env

from gmbench.cli import main

# Cells that need about 15 s each unless stopped (30 epochs of 3 batches x 0.15 s).
LONG_SUITE = blobs_suite("long", epochs=30, batch_size=20, sleep_s=0.15, matrix="matrix:\n  seed: [0, 1, 2]\n")
QUICK_SUITE = blobs_suite("quick", epochs=2, batch_size=20, matrix="matrix:\n  seed: [0, 1]\n")


def _env() -> dict:
    return subprocess_env(PYTHONUNBUFFERED="1")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A process in its own session (its own process group), output to ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen(args, env=_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _start_script(tmp_path: Path, source: str, args: list[str], log: Path) -> subprocess.Popen:
    """Run ``source`` as a script file (spawned children import its functions from there)."""
    script = tmp_path / f"script_{abs(hash(source))}.py"
    script.write_text(source)
    return _start([sys.executable, str(script), *args], log)


def _start_gmbench(args: list[str], log: Path) -> subprocess.Popen:
    return _start([sys.executable, "-m", "gmbench", *args], log)


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for pid 1, which may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"process ended (rc {process.returncode}) before {what}:\n{log.read_text() if log else ''}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}:\n{log.read_text() if log else ''}")


@contextlib.contextmanager
def _cleanup():
    """Kill the process groups and any listed pid on the way out, whatever happened."""
    started: list = []
    try:
        yield started
    finally:
        for item in started:
            pid = item.pid if isinstance(item, subprocess.Popen) else int(item)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if isinstance(item, subprocess.Popen) else os.kill(pid, signal.SIGKILL)
            if isinstance(item, subprocess.Popen):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    item.wait(timeout=10)


def _epochs(folder: Path) -> list[int]:
    path = folder / "epochs.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _cells_with_epochs(out: Path, at_least: int) -> list[Path]:
    folders = sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []
    return [f for f in folders if len(_epochs(f)) >= at_least]


def _lock_workers(out: Path) -> list[int]:
    try:
        return json.loads((out / ".lock").read_text()).get("workers") or []
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _no_traceback(text: str) -> bool:
    return "Traceback" not in text


# --------------------------------------------------------------------------- workers die with the driver


_PARENT_SCRIPT = """
import multiprocessing, os, sys, time

def child(use_prctl, watch):
    from gmbench.run.lifetime import die_with_parent
    die_with_parent(use_prctl=use_prctl, watch=watch)
    time.sleep(120)

if __name__ == "__main__":
    use_prctl, watch = sys.argv[1] == "1", sys.argv[2] == "1"
    process = multiprocessing.get_context("spawn").Process(target=child, args=(use_prctl, watch))
    process.start()
    time.sleep(2.0)  # the child has armed its guards
    print(process.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("use_prctl, watch", [(True, False), (False, True)], ids=["pdeathsig", "sentinel-watch"])
def test_a_spawned_worker_dies_when_its_parent_is_killed(tmp_path, use_prctl, watch):
    if use_prctl and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    log = tmp_path / "parent.log"
    with _cleanup() as started:
        parent = _start_script(tmp_path, _PARENT_SCRIPT, [str(int(use_prctl)), str(int(watch))], log)
        started.append(parent)
        child = int(_wait_until(lambda: log.read_text().strip(), 60, "the child's pid", parent, log))
        started.append(child)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, not its group
        parent.wait(timeout=10)
        _wait_until(lambda: not _alive(child), 15, f"the orphaned child {child} to end")


def test_killing_the_driver_of_a_jobs_2_run_ends_its_workers_and_a_rerun_resumes(tmp_path):
    suite = tmp_path / "long.yaml"
    suite.write_text(LONG_SUITE.replace("epochs: 30", "epochs: 6"))
    out, log = tmp_path / "run", tmp_path / "run.log"
    with _cleanup() as started:
        driver = _start_gmbench(["run", str(suite), "--out", str(out), "--jobs", "2", "--no-report", "--no-progress"], log)
        started.append(driver)
        _wait_until(lambda: len(_cells_with_epochs(out, 1)) == 2, 120, "two cells training", driver, log)
        workers = _wait_until(lambda: _lock_workers(out), 10, "the lock to list the workers", driver, log)
        started.extend(workers)
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        _wait_until(lambda: not any(_alive(pid) for pid in workers), 15, "the workers to die with their driver")
        epochs_at_kill = {f.name: _epochs(f) for f in _cells_with_epochs(out, 1)}

        rerun = subprocess.run(
            [sys.executable, "-m", "gmbench", "run", str(suite), "--out", str(out), "--jobs", "2", "--no-report", "--no-progress"],
            env=_env(), capture_output=True, text=True, timeout=300,
        )
    assert rerun.returncode == 0, rerun.stderr
    assert "in use" not in rerun.stderr  # the killed run's lock was free: all its processes were gone
    for name in epochs_at_kill:
        assert _epochs(out / "cells" / name) == list(range(1, 7)), name  # resumed; no epoch twice
    assert "resuming after epoch" in rerun.stderr
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 3 and (frame["status"] == "ok").all()


# --------------------------------------------------------------------------- the lock


_HOLDER_SCRIPT = """
import multiprocessing, os, sys, time
from gmbench.run.lock import RunLock

def worker(fd):
    time.sleep(120)  # holds the inherited lock (no die-with-parent guard: an orphan)

if __name__ == "__main__":
    lock = RunLock(sys.argv[1]).acquire()
    process = multiprocessing.get_context("spawn").Process(target=worker, args=(lock.for_child(),))
    process.start()
    lock.note_workers([process.pid])
    time.sleep(1.0)
    print(process.pid, flush=True)
    os._exit(9)  # the driver dies without releasing anything; its worker lives on
"""


def test_the_lock_is_not_taken_over_while_a_worker_of_a_dead_driver_lives(tmp_path):
    from gmbench.run.lock import RunFolderInUse, run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = tmp_path / "holder.log"
    with _cleanup() as started:
        holder = _start_script(tmp_path, _HOLDER_SCRIPT, [str(run_dir)], log)
        started.append(holder)
        holder.wait(timeout=60)
        worker = int(log.read_text().split()[0])
        started.append(worker)
        assert _alive(worker)
        with pytest.raises(RunFolderInUse) as info:
            with run_lock(run_dir):
                pass
        message = str(info.value)
        assert "\n" not in message and "driver" in message and str(worker) in message and "is gone" in message
        os.kill(worker, signal.SIGKILL)
        _wait_until(lambda: not _alive(worker), 10, "the worker to end")
        with run_lock(run_dir) as lock:  # now every process of that run is gone
            assert lock.fd is not None
    assert not (run_dir / ".lock").exists()


def test_a_second_update_run_is_refused_before_it_writes_anything(tmp_path, capsys):
    from gmbench.run.lock import run_lock

    suite, changed = tmp_path / "quick.yaml", tmp_path / "changed.yaml"
    suite.write_text(QUICK_SUITE)
    changed.write_text(QUICK_SUITE.replace("seed: [0, 1]", "seed: [0, 1, 2]"))
    out = tmp_path / "run"
    assert main(["run", str(suite), "--out", str(out), "--no-report", "--no-progress"]) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in ("run.json", "suite.yaml", "results.csv")}
    stamps = {name: (out / name).stat().st_mtime_ns for name in before}
    with run_lock(out):  # a run in progress holds the folder
        code = main(["run", str(changed), "--out", str(out), "--update", "--no-report", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "is in use by another gmbench run" in err[0] and str(out) in err[0]
    for name, content in before.items():  # the first run's files are untouched
        assert (out / name).read_bytes() == content and (out / name).stat().st_mtime_ns == stamps[name], name
    assert len(pd.read_csv(out / "results.csv")) == 2


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_a_jobs_2_run_at_once_and_records_its_cells_as_interrupted(tmp_path):
    suite = tmp_path / "long.yaml"
    suite.write_text(LONG_SUITE)
    out, log = tmp_path / "run", tmp_path / "run.log"
    with _cleanup() as started:
        driver = _start_gmbench(["run", str(suite), "--out", str(out), "--jobs", "2", "--no-report", "--no-progress"], log)
        started.append(driver)
        running = _wait_until(lambda: _cells_with_epochs(out, 1) if len(_cells_with_epochs(out, 1)) == 2 else None, 120, "two cells training", driver, log)
        workers = _lock_workers(out)
        started.extend(workers)
        os.kill(driver.pid, signal.SIGINT)
        # The cells need ~25 s more each; the driver must not wait for them.
        driver.wait(timeout=60)
        output = log.read_text()
        assert driver.returncode == 130, output
        assert _no_traceback(output), output
        assert output.strip().splitlines()[-1] == "gmbench run: interrupted"
        assert not any(_alive(pid) for pid in workers)
    for folder in running:
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and "interrupted by Ctrl-C" in metrics["error"]
        assert 1 <= len(_epochs(folder)) < 30  # stopped mid-training, not finished
    frame = pd.read_csv(out / "results.csv").set_index("cell_id")
    assert sorted(frame["status"]) == ["interrupted", "interrupted", "pending"]
    assert not (out / ".lock").exists()


def test_sigterm_stops_an_in_process_run_like_ctrl_c(tmp_path):
    suite = tmp_path / "long.yaml"
    suite.write_text(LONG_SUITE)
    out, log = tmp_path / "run", tmp_path / "run.log"
    with _cleanup() as started:
        driver = _start_gmbench(["run", str(suite), "--out", str(out), "--no-report", "--no-progress"], log)
        started.append(driver)
        (folder,) = _wait_until(lambda: _cells_with_epochs(out, 1), 120, "a cell training", driver, log)
        os.kill(driver.pid, signal.SIGTERM)
        driver.wait(timeout=60)
    output = log.read_text()
    assert driver.returncode == 130 and _no_traceback(output), output
    assert json.loads((folder / "metrics.json").read_text())["status"] == "interrupted"
    assert "interrupted by SIGTERM" in pd.read_csv(out / "results.csv").set_index("cell_id").loc[folder.name, "error"]


# --------------------------------------------------------------------------- temp files


def test_a_rerun_removes_the_temp_files_a_killed_run_left(tmp_path, caplog):
    from gmbench.run.cell import RunOptions
    from gmbench.run.executors import LocalExecutor
    from gmbench.run.suite_runner import run_suite
    from gmbench.suite import parse_suite

    suite = parse_suite(textwrap.dedent(QUICK_SUITE), "quick.yaml")
    out = tmp_path / "run"
    run_suite(suite, out, RunOptions(), executor=LocalExecutor(), progress=False)
    cell = out / "cells" / suite.cells[0].id
    stale = [cell / ".checkpoint.pt.k3j2h1g0.tmp", out / ".results.csv.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(os.urandom(1 << 20))
        os.utime(path, (time.time() - 60, time.time() - 60))
    unrelated = cell / "notes.tmp"  # not an atomic-write temp file: kept
    unrelated.write_text("mine")
    with caplog.at_level("INFO", logger="gmbench.run"):
        run_suite(suite, out, RunOptions(), executor=LocalExecutor(), progress=False)
    assert not any(path.exists() for path in stale)
    assert unrelated.exists()
    assert any("removed 2 temporary file(s)" in record.getMessage() for record in caplog.records)
