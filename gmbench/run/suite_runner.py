"""Whole suites: :func:`run_suite` prepares the run folder, takes its lock, runs the cells.

Re-running :func:`run_suite` on the same folder skips the cells whose
``metrics.json`` says ``ok``, re-runs failed ones, and lets interrupted ones
resume from their checkpoint (the trainer does that).  The run folder's lock
(:mod:`gmbench.run.lock`, held by the driver and its workers) is taken before
anything is written there; a damaged run folder is read as
:mod:`gmbench.run.folder` describes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from gmbench import environment, loggers
from gmbench.run import folder, results
from gmbench.run.cell import RunOptions, check_data
from gmbench.run.executors import LocalExecutor
from gmbench.run.lifetime import stop_on_sigterm
from gmbench.run.lock import run_lock
from gmbench.run.prepare import check_run_dir
from gmbench.run.progress import RunProgress

log = logging.getLogger("gmbench.run")


@dataclasses.dataclass
class RunSummary:
    run_dir: Path
    total: int
    skipped: int
    ran: int
    failed: list[str]
    wall_time_s: float


def run_suite(suite, run_dir: str | Path, options: RunOptions, executor=None, update: bool = False, progress: bool = True) -> RunSummary:
    """Run every cell of ``suite`` that is not finished yet; write results as cells finish.

    ``SIGTERM`` stops the run like Ctrl-C (``KeyboardInterrupt``): the cells in flight are
    recorded as ``interrupted`` and resume from their checkpoints on the next run.
    """
    run_dir = Path(run_dir)
    started = time.perf_counter()
    folder.new_command()
    check_run_dir(suite, run_dir, update=update)  # refuse a wrong folder before creating anything
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) as lock, stop_on_sigterm():
        check_run_dir(suite, run_dir, update=update)  # again: another command may have changed it meanwhile
        options = run_options_for(suite, options)
        loggers.check_stores(options.loggers, run_dir)  # an unusable tracking store: refused before run.json changes
        folder.write_run(run_dir, suite.text, suite.to_json())
        folder.remove_stale_temp_files(run_dir, older_than=lock.acquired_at)
        return _run_locked(suite, run_dir, options, executor, progress, started)


def run_options_for(suite, options: RunOptions) -> RunOptions:
    """``options`` completed from the suite: its backend (unless given), plugins, backend
    parameters and loggers (unless given)."""
    if options.backend is None and suite.backend:
        options = dataclasses.replace(options, backend=suite.backend)
    options = dataclasses.replace(options, plugins=tuple(suite.plugins), backend_params=suite.backend_params or None)
    return dataclasses.replace(options, loggers=loggers.choose(suite.loggers) if options.loggers is None else options.loggers)


def _run_locked(suite, run_dir: Path, options: RunOptions, executor, progress: bool, started: float) -> RunSummary:
    environment.write_environment(
        run_dir / folder.ENVIRONMENT_FILE, device=options.device, backend=options.backend or suite.backend,
        data_root=options.data_root,
    )
    loggers.record_choice(options.loggers, run_dir)

    todo, skipped = [], 0
    for cell in suite.cells:
        previous = folder.read_metrics(run_dir, cell.id)
        if previous is not None and previous.get("status") == "ok":
            skipped += 1
        else:
            todo.append(cell)
    check_data(todo, options)
    if skipped:
        log.info("%d of %d cells already finished in %s; running the other %d", skipped, len(suite.cells), run_dir, len(todo))
    results.write_results(run_dir)

    executor = executor or LocalExecutor(jobs=1)
    tracker = RunProgress(todo, run_dir, enabled=progress)
    failed: list[str] = []

    def on_done(cell, metrics: dict) -> None:
        tracker.cell_finished(cell, metrics)
        if metrics.get("status") != "ok":
            failed.append(cell.id)
        results.write_results(run_dir)

    try:
        executor.run(todo, run_dir, options, on_start=tracker.cell_started, on_epoch=tracker.epoch, on_done=on_done, poll=tracker.poll)
    finally:
        tracker.close()
        results.write_results(run_dir)
    return RunSummary(run_dir, len(suite.cells), skipped, len(todo), failed, time.perf_counter() - started)
