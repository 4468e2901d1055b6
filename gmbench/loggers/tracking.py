"""The framework side of loggers: which ones a run uses, and feeding them.

* :func:`choose` merges a suite's ``loggers:`` with ``--logger`` / ``--mlflow-uri``
  and checks names, parameters and installed packages (one line, exit 2);
* :func:`check_stores` checks each logger's store, :func:`record_choice` records the choice in the
  run folder (``loggers.json``, read again by ``gmbench report``);
* :class:`CellLoggers` feeds one cell's loggers from :func:`gmbench.run.cell.run_cell`;
* :func:`log_report` gives a written report to the run's loggers.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from gmbench import io, plugins
from gmbench.errors import GmbenchError
from gmbench.loggers.records import CellInfo, ReportInfo
from gmbench.run.folder import DIAGNOSTICS_FILE, ENVIRONMENT_FILE, EPOCHS_FILE, LOGGERS_FILE, RUN_FILE

log = logging.getLogger("gmbench.loggers")


@dataclasses.dataclass(frozen=True)
class LoggerChoice:
    """One logger of a run: the plugin's name and its parameters (plain data, picklable)."""

    name: str
    params: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}


def choose(suite_loggers: Iterable[dict] = (), names: Iterable[str] = (), mlflow_uri: str | None = None) -> tuple[LoggerChoice, ...]:
    """The loggers of a run: the suite's (``[{"name", "params"}]``) plus ``--logger`` names,
    with ``--mlflow-uri`` as the mlflow logger's ``tracking_uri``; every one checked
    (name, parameters, package installed) before anything runs."""
    chosen: dict[str, dict] = {entry["name"]: dict(entry.get("params") or {}) for entry in suite_loggers}
    for name in names:
        if name not in plugins.available("logger"):
            raise GmbenchError(f"--logger {name}: unknown logger; available: {', '.join(plugins.available('logger')) or '(none)'}")
        chosen.setdefault(name, {})
    if mlflow_uri is not None:
        if "mlflow" not in chosen:
            raise GmbenchError("--mlflow-uri is given but the run has no mlflow logger; add --logger mlflow (or loggers: [mlflow] in the suite)")
        chosen["mlflow"]["tracking_uri"] = mlflow_uri
    choices = tuple(LoggerChoice(name, params) for name, params in chosen.items())
    for choice in choices:
        info = plugins.check_parameters("logger", choice.name, choice.params)
        reason = info.cls.unavailable_reason()
        if reason:
            raise GmbenchError(reason)
    return choices


def create(choice: LoggerChoice) -> Any:
    return plugins.create("logger", choice.name, **choice.params)


def check_stores(choices: tuple[LoggerChoice, ...], run_dir: Path) -> None:
    """Fail when a logger's store cannot be used, before anything of the run is written.

    Call it holding the run lock.  A logger may have a ``check(run_dir)`` method
    (the mlflow logger opens its tracking store; its default SQLite store is
    created in the run folder).
    """
    for choice in choices:
        check = getattr(create(choice), "check", None)
        if check is not None:
            check(Path(run_dir))


def record_choice(choices: tuple[LoggerChoice, ...], run_dir: Path) -> None:
    """Record the run's loggers in ``loggers.json`` (``gmbench report`` logs to them)."""
    record = Path(run_dir) / LOGGERS_FILE
    if choices:
        io.write_json(record, [choice.to_json() for choice in choices])
    else:
        record.unlink(missing_ok=True)  # gmbench report logs to this run's loggers, not an earlier run's


def run_loggers(run_dir: Path) -> tuple[LoggerChoice, ...]:
    """The loggers the last ``gmbench run`` on ``run_dir`` used (``loggers.json``), else the suite's."""
    run_dir = Path(run_dir)
    entries = _read_json(run_dir / LOGGERS_FILE)
    if not isinstance(entries, list):
        entries = _json_object(run_dir / RUN_FILE).get("loggers") or []
    return tuple(LoggerChoice(e["name"], dict(e.get("params") or {})) for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str))


def _json_object(path: Path) -> dict:
    """A JSON object file; empty when missing or damaged (gmbench.run.folder names damaged ones)."""
    value = _read_json(path)
    return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_epochs(cell_dir: Path) -> list[dict]:
    records = []
    try:
        lines = (cell_dir / EPOCHS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line; the trainer rewrites the file from its checkpoint
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


class CellLoggers:
    """The loggers of one cell, in the order :class:`~gmbench.hookspecs.LoggerPlugin` states.

    ``epoch_callback(on_epoch)`` is what the trainer calls; before the first new
    epoch the loggers get the epochs the trainer continued from (the lines of
    ``epochs.jsonl`` before it, which the trainer rewrote from its checkpoint).
    A logger that raises is warned about once and dropped for the rest of the
    cell: tracking is a copy, the cell's files are already written.
    """

    def __init__(self, choices: tuple[LoggerChoice, ...], cell_config: dict, cell_dir: str | Path):
        self.cell_dir = Path(cell_dir)
        self.config = cell_config
        self.active: list[Any] = []
        self._resumed = False
        if not choices:
            return
        run_dir = self.cell_dir.parent.parent  # <run folder>/cells/<id>
        suite = _json_object(run_dir / RUN_FILE).get("name") or run_dir.name
        info = CellInfo(run_dir, self.cell_dir, self.cell_dir.name, str(suite), cell_config, _json_object(run_dir / ENVIRONMENT_FILE))
        for choice in choices:
            try:
                logger = create(choice)
                logger.start_cell(info)
            except Exception as error:  # noqa: BLE001 - see the class docstring
                self._warn(choice.name, "start_cell", error)
                continue
            self.active.append(logger)
        if self.active:
            atexit.register(self._interrupted)

    def _warn(self, name: str, method: str, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [""])[0]
        log.warning("logger %s failed in %s for cell %s (%s: %s); the cell goes on without it, its files are complete", name, method, self.cell_dir.name, type(error).__name__, first)

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self.active):
            try:
                getattr(logger, method)(*args)
            except Exception as error:  # noqa: BLE001 - see the class docstring
                self._warn(logger.name, method, error)
                self.active.remove(logger)

    def _resume(self, before: int | None) -> None:
        self._resumed = True
        history = [r for r in _read_epochs(self.cell_dir) if before is None or r["epoch"] < before]
        self._call("resume", history)

    def epoch_callback(self, on_epoch: Callable[[dict], Any] | None) -> Callable[[dict], Any] | None:
        """``on_epoch`` with the loggers fed first (``on_epoch`` itself when there are none)."""
        if not self.active:
            return on_epoch

        def logged(record: dict) -> Any:
            if not self._resumed:
                self._resume(before=int(record["epoch"]))
            self._call("log_epoch", record)
            return on_epoch(record) if on_epoch is not None else None

        return logged

    def end(self, metrics: dict) -> None:
        """The cell ended (``metrics.json`` written): diagnostics, final metrics, status."""
        if not self.active:
            return
        if self.config.get("task") == "train" and not self._resumed:
            self._resume(before=None)  # no new epoch ran: every epoch on disk is restored
        diagnostics = self.cell_dir / DIAGNOSTICS_FILE
        if metrics.get("status") == "ok" and self.config.get("diagnostics") and diagnostics.is_file():
            with diagnostics.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            self._call("log_diagnostics", rows, int(metrics.get("epochs") or 0))
        self._call("end_cell", metrics)
        self.active = []
        atexit.unregister(self._interrupted)

    def _interrupted(self) -> None:
        for logger in self.active:
            hook = getattr(logger, "interrupted", None)
            try:
                hook() if hook is not None else None
            except Exception:  # noqa: BLE001, S110 - the process is exiting
                pass


def log_report(run_dir: str | Path, report_file: str | Path, choices: tuple[LoggerChoice, ...] | None = None) -> list[str]:
    """Give a written report (``report.md`` and ``figures/``) to the run's loggers.

    ``choices``: default :func:`run_loggers`.  Returns the names of the loggers that
    took it; one that fails is warned about (the report itself is written).
    """
    run_dir, report_file = Path(run_dir), Path(report_file)
    choices = run_loggers(run_dir) if choices is None else choices
    if not choices:
        return []
    figures = tuple(sorted(p for p in (report_file.parent / "figures").glob("*") if p.suffix.lower() in (".png", ".pdf")))
    suite = _json_object(run_dir / RUN_FILE).get("name") or run_dir.name
    report = ReportInfo(run_dir, str(suite), report_file, figures)
    done = []
    for choice in choices:
        try:
            logger = create(choice)
            reason = type(logger).unavailable_reason()
            if reason:
                raise GmbenchError(reason)
            logger.log_report(report)
        except Exception as error:  # noqa: BLE001 - the report is written; tracking is a copy
            log.warning("logger %s could not take the report of %s (%s: %s)", choice.name, run_dir, type(error).__name__, (str(error).splitlines() or [""])[0])
            continue
        done.append(choice.name)
    return done
