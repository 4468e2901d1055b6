"""The ``mlflow`` logger: one experiment per suite, one MLflow run per cell.

Each cell's run gets the resolved configuration as parameters (dotted keys,
``training.epochs``), tags for the suite, cell id and run folder, the run's
``environment.json`` and the cell's ``config.json``/``metrics.json`` as
artifacts, one metric per number of each epoch record (step = epoch), the
final metrics (``final/<key>``) and the per-layer fitting RMSE
(``rmse/<metric>/<layer>``); its status is FINISHED for an ``ok`` cell, FAILED
otherwise.  A report goes to a run named ``report`` of the same experiment.

Store: ``tracking_uri`` (``--mlflow-uri``), else ``$MLFLOW_TRACKING_URI``, else
an SQLite file in the run folder (``sqlite:///<run folder>/mlflow.db``,
artifacts in ``<run folder>/mlflow-artifacts``).  A file store
(``file:./mlruns``) works where MLflow allows it (``MLFLOW_ALLOW_FILE_STORE=true``
with MLflow 3), and so does a tracking server (``http://host:5000``).

The run id is recorded in the cell folder (``mlflow.json``): a cell that runs
again (resumed from its checkpoint, or re-run after a failure) continues the
same MLflow run and logs only the epochs it does not have yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, ClassVar

from gmbench import io
from gmbench.errors import GmbenchError
from gmbench.loggers.records import CellInfo, ReportInfo, numeric_items, param_text
from gmbench.plugins import hookimpl

RUN_RECORD = "mlflow.json"
DATABASE = "mlflow.db"
ARTIFACTS = "mlflow-artifacts"
INSTALL = "pip install 'gmbench[mlflow]'"
# MLflow's log_batch limits: 1,000 metrics, 100 parameters, 100 tags per call.
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
PROBE_TIMEOUT_S = 15  # the store check before the run: a server that does not answer in this time is an error


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, ``_ - . / :`` and spaces: ``1->8`` becomes ``1_to_8``."""
    return name.replace("->", "_to_").replace(">", "_")


class MLflowLogger:
    """MLflow: one experiment per suite, one run per cell with parameters, per-epoch metrics and artifacts."""

    name: ClassVar[str] = "mlflow"

    def __init__(
        self,
        tracking_uri: Annotated[str | None, "tracking store: sqlite:///file.db, file:./mlruns, http://host:5000 (default: $MLFLOW_TRACKING_URI, else sqlite in the run folder)"] = None,
        experiment: Annotated[str | None, "experiment name (default: the suite's name)"] = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._client = None
        self._run_id: str | None = None
        self._logged: set[int] = set()  # epochs the run has
        self._last_epoch = 0
        self._cell: CellInfo | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            return f"the mlflow logger needs MLflow; install it: {INSTALL}"
        return None

    # ----------------------------------------------------------------------- the store

    def store_uri(self, run_dir: Path) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{(Path(run_dir) / DATABASE).resolve()}"

    def _default_store(self, run_dir: Path) -> bool:
        return not (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))

    def connect(self, run_dir: Path):
        """An ``MlflowClient`` on the store, checked to answer (one-line error otherwise)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self.store_uri(run_dir)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except (MlflowException, OSError, ImportError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GmbenchError(f"mlflow logger: tracking store {uri} cannot be used: {first}; fix --mlflow-uri / tracking_uri") from None
        return client

    def check(self, run_dir: Path) -> None:
        """Fail before any cell runs when the store cannot be used (called with the run folder locked)."""
        uri = self.store_uri(run_dir)
        if uri.startswith("sqlite:"):
            try:
                import alembic  # noqa: F401 - MLflow's SQL store migrates its schema with it
                import sqlalchemy  # noqa: F401
            except ImportError:
                raise GmbenchError(f"mlflow logger: the SQLite store {uri} needs sqlalchemy and alembic; install them: {INSTALL}") from None
        with _quick_requests():
            self.connect(run_dir)

    def _experiment_id(self, client, run_dir: Path, suite: str) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment or suite
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (Path(run_dir) / ARTIFACTS).resolve().as_uri() if self._default_store(run_dir) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another cell's process created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # ----------------------------------------------------------------------- a cell

    def start_cell(self, cell: CellInfo) -> None:
        self._cell = cell
        self._client = client = self.connect(cell.run_dir)
        previous = _read_record(cell.cell_dir / RUN_RECORD)
        if previous is not None and previous.get("tracking_uri") == self.store_uri(cell.run_dir) and _run_exists(client, previous.get("run_id")):
            self._run_id = previous["run_id"]
            client.update_run(self._run_id, status="RUNNING")
            for key in ("epoch_time_s", "train_loss", "test_accuracy"):
                self._logged |= {metric.step for metric in client.get_metric_history(self._run_id, key)}
        else:
            self._create_run(cell)

    def _create_run(self, cell: CellInfo) -> None:
        from mlflow.entities import Param

        client = self._client
        experiment_id = self._experiment_id(client, cell.run_dir, cell.suite)
        tags = {
            "gmbench.suite": cell.suite, "gmbench.cell_id": cell.cell_id, "gmbench.run_dir": str(cell.run_dir.resolve()),
            "gmbench.task": str(cell.config.get("task", "")),
            "gmbench.git_commit": str((cell.environment.get("git") or {}).get("commit") or ""),
        }
        self._run_id = client.create_run(experiment_id, run_name=cell.title, tags=tags).info.run_id
        self._logged = set()
        io.write_json(cell.cell_dir / RUN_RECORD, {"tracking_uri": self.store_uri(cell.run_dir), "experiment_id": experiment_id, "run_id": self._run_id})
        params = [Param(key, param_text(value)) for key, value in cell.hyperparameters().items()]
        for start in range(0, len(params), MAX_BATCH_PARAMS):
            client.log_batch(self._run_id, params=params[start : start + MAX_BATCH_PARAMS])
        client.log_dict(self._run_id, cell.environment, "environment.json")
        client.log_dict(self._run_id, cell.config, "config.json")

    def resume(self, history: list[dict]) -> None:
        if any(step > len(history) for step in self._logged):
            # The trainer started over (its checkpoint did not fit the cell): MLflow cannot
            # delete metric values, so the old run is closed and a new one holds the cell.
            old = self._run_id
            self._client.set_tag(old, "gmbench.superseded", "the cell trained again from scratch")
            self._client.set_terminated(old, "KILLED")
            self._create_run(self._cell)
        for record in history:
            self.log_epoch(record)

    def log_epoch(self, record: dict) -> None:
        epoch = int(record["epoch"])
        self._last_epoch = max(self._last_epoch, epoch)
        if epoch in self._logged:
            return
        self._log_metrics(numeric_items(record, skip=("epoch",)), epoch)
        self._logged.add(epoch)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(key), value, stamp, step) for key, value in values.items()]
        for start in range(0, len(metrics), MAX_BATCH_METRICS):
            self._client.log_batch(self._run_id, metrics=metrics[start : start + MAX_BATCH_METRICS])

    def log_diagnostics(self, rows: list[dict], step: int) -> None:
        self._log_metrics({f"rmse/{row['metric']}/{row['layer']}": float(row["value"]) for row in rows}, step)

    def end_cell(self, metrics: dict) -> None:
        from mlflow.entities import RunTag

        values = {f"final/{key}": value for key, value in numeric_items(metrics).items() if not key.startswith("rmse_")}
        self._log_metrics(values, max(self._last_epoch, 0))
        status = str(metrics.get("status", ""))
        tags = [RunTag("gmbench.status", status), RunTag("gmbench.error", str(metrics.get("error") or "")[:5000])]
        self._client.log_batch(self._run_id, tags=tags)
        self._client.log_dict(self._run_id, metrics, "metrics.json")
        self._client.set_terminated(self._run_id, "FINISHED" if status == "ok" else "FAILED")

    def interrupted(self) -> None:
        """The process is ending without ``end_cell`` (Ctrl-C, SIGTERM): mark the run KILLED."""
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, "KILLED")

    # ----------------------------------------------------------------------- a report

    def log_report(self, report: ReportInfo) -> None:
        client = self.connect(report.run_dir)
        experiment_id = self._experiment_id(client, report.run_dir, report.suite)
        run_dir = str(report.run_dir.resolve())
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`gmbench.report` = '{run_dir}'", max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = client.create_run(experiment_id, run_name="report", tags={"gmbench.report": run_dir, "gmbench.suite": report.suite}).info.run_id
        client.log_artifact(run_id, str(report.report_file), "report")
        for figure in report.figures:
            client.log_artifact(run_id, str(figure), "report/figures")
        client.set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def _quick_requests():
    """One try with a short timeout for the check before the run: MLflow's defaults (7 retries,
    exponential back-off, 120 s timeout) take minutes to say that a server is not there."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update({key: value for key, value in quick.items() if saved[key] is None})  # the user's settings win
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _read_record(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("run_id"), str) else None


def _run_exists(client, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


@hookimpl
def gmbench_logger():
    return MLflowLogger
