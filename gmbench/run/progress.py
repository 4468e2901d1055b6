"""Live progress of a suite run: which cell, epoch, loss/accuracy, ETA.

On a terminal a tqdm bar counts epochs over all cells still to run (so its ETA
covers the whole run) with the current cell in its description; every epoch
and every finished cell is also logged as one line (to stderr), which is what
a log file or CI shows.  With worker processes the epochs are read from the
cells' ``epochs.jsonl`` files when the executor polls.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from gmbench.run.folder import cell_dir, count_epochs, read_epochs
from gmbench.tasks import task_for

log = logging.getLogger("gmbench.run")


def _planned_epochs(cell) -> int:
    return task_for(cell.config).planned_epochs(cell.config)


class RunProgress:
    def __init__(self, cells, run_dir: Path, enabled: bool = True):
        self.cells = list(cells)
        self.index = {cell.id: i + 1 for i, cell in enumerate(self.cells)}
        self.total = len(self.cells)
        self.folders = {cell.id: cell_dir(run_dir, cell.id) for cell in self.cells}
        self.seen_epochs: dict[str, int] = {}
        self.running: dict[str, object] = {}
        self.finished = 0
        self.started = time.perf_counter()
        self.planned = sum(_planned_epochs(cell) for cell in self.cells)
        self.done_epochs = 0
        self.bar = None
        if enabled and sys.stderr.isatty() and self.cells:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.planned, unit="epoch", desc="suite", dynamic_ncols=True)

    def _say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def _eta(self) -> str:
        if not self.done_epochs:
            return "?"
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / self.done_epochs * max(self.planned - self.done_epochs, 0)
        return _duration(remaining)

    def cell_started(self, cell) -> None:
        self.running[cell.id] = cell
        # A resumed cell already has epochs on disk: they count as done.
        already = count_epochs(self.folders[cell.id])
        self.seen_epochs[cell.id] = already
        self._advance(already)
        suffix = f" (resuming after epoch {already})" if already else ""
        self._say(f"[{self.index[cell.id]}/{self.total}] start {cell.title} ({cell.id}){suffix}")
        if self.bar is not None:
            self.bar.set_description(f"cell {self.index[cell.id]}/{self.total} {cell.title}")

    def epoch(self, cell, record: dict) -> None:
        self.seen_epochs[cell.id] = max(self.seen_epochs.get(cell.id, 0), int(record.get("epoch", 0)))
        self._advance(1)
        planned = _planned_epochs(cell)
        self._say(
            f"[{self.index.get(cell.id, '?')}/{self.total}] {cell.title} epoch {record.get('epoch')}/{planned} "
            f"loss {record.get('train_loss', float('nan')):.4f} train {100 * record.get('train_accuracy', float('nan')):.1f}% "
            f"test {100 * record.get('test_accuracy', float('nan')):.1f}% | ETA {self._eta()}"
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('train_loss', float('nan')):.3f}", test=f"{record.get('test_accuracy', float('nan')):.3f}")

    def poll(self) -> None:
        """Read new epoch lines of running cells (worker processes cannot call back)."""
        for cell_id, cell in list(self.running.items()):
            records = read_epochs(self.folders[cell_id])
            for record in records[self.seen_epochs.get(cell_id, 0):]:
                self.epoch(cell, record)

    def cell_finished(self, cell, metrics: dict) -> None:
        if cell.id in self.running:
            self.poll()
            self.running.pop(cell.id, None)
        self.finished += 1
        # Epochs a cell did not run (early failure) leave the plan.
        missing = _planned_epochs(cell) - self.seen_epochs.get(cell.id, 0)
        if metrics.get("status") != "ok" or missing > 0:
            self.planned -= max(missing, 0)
            if self.bar is not None:
                self.bar.total = self.planned
                self.bar.refresh()
        status = metrics.get("status")
        if status == "ok":
            detail = _brief_metrics(metrics)
        else:
            detail = f"{status.upper()}: {metrics.get('error')}"
        verb = "stopped" if status == "interrupted" else "done"
        self._say(f"[{self.index.get(cell.id, '?')}/{self.total}] {verb} {cell.title} ({cell.id}): {detail}")

    def _advance(self, epochs: int) -> None:
        self.done_epochs += epochs
        if self.bar is not None and epochs:
            self.bar.update(epochs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _brief_metrics(metrics: dict) -> str:
    parts = []
    if metrics.get("test_accuracy") is not None:
        parts.append(f"test accuracy {100 * metrics['test_accuracy']:.1f}% (best {100 * (metrics.get('best_test_accuracy') or 0):.1f}%)")
    if metrics.get("time_ms") is not None:
        parts.append(f"{metrics['time_ms']:.1f} ms, RMSE {metrics.get('rmse', float('nan')):.4g}")
    if metrics.get("memory_mb") is not None:
        parts.append(f"{metrics['memory_mb']:.2f} MiB, {metrics.get('total_gaussians')} Gaussians")
    if metrics.get("wall_time_s") is not None:
        parts.append(f"in {_duration(metrics['wall_time_s'])}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
