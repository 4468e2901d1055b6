"""The ``tensorboard`` logger: event files per cell under the run folder.

``<run folder>/tensorboard/<cell id>/`` gets one scalar per number of each epoch
record (tag = the ``epochs.jsonl`` key, step = epoch), the final metrics
(``final/<key>``), the per-layer fitting RMSE (``rmse/<metric>/<layer>``), the
status and error as text, and the cell's hyper-parameters with the HParams
plugin; ``<run folder>/tensorboard/report/`` gets the report's figures as
images.  View them with ``tensorboard --logdir <run folder>/tensorboard``.

A cell that starts again in a folder with event files opens its writer with
``purge_step=1``: TensorBoard hides every earlier event from step 1 on, and the
epochs the trainer continues from are written again from ``epochs.jsonl`` (the
source of truth), so each epoch shows once even when the previous process was
killed before its last events were flushed.  The hyper-parameters (step 0) are
written once, by the first start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

from gmbench.loggers.records import CellInfo, ReportInfo, numeric_items
from gmbench.plugins import hookimpl

LOG_DIR = "tensorboard"
REPORT_RUN = "report"
INSTALL = "pip install 'gmbench[tensorboard]'"

# Final metrics shown in the HParams table beside the hyper-parameters.
HPARAM_METRICS = ("final/test_accuracy", "final/smoothed_test_accuracy", "final/best_test_accuracy", "final/train_time_s")


def _has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("events.out.tfevents.*"))


class TensorBoardLogger:
    """TensorBoard event files per cell under the run folder: epoch scalars, final metrics, hparams, report figures."""

    name: ClassVar[str] = "tensorboard"

    def __init__(self, log_dir: Annotated[str | None, "folder for the event files (default: <run folder>/tensorboard)"] = None):
        self.log_dir = log_dir
        self._writer = None
        self._step = 0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
        except ImportError:
            return f"the tensorboard logger needs the tensorboard package; install it: {INSTALL}"
        return None

    def _root(self, run_dir: Path) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(run_dir) / LOG_DIR

    def _open(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        again = _has_events(folder)
        # flush_secs: the writer is flushed after every epoch anyway; this bounds what a kill loses otherwise.
        return SummaryWriter(str(folder), purge_step=1 if again else None, flush_secs=30), again

    # ----------------------------------------------------------------------- a cell

    def start_cell(self, cell: CellInfo) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._writer, again = self._open(self._root(cell.run_dir) / cell.cell_id)
        if not again:
            experiment, session_start, _ = hparams(cell.hyperparameters(), {tag: 0.0 for tag in HPARAM_METRICS})
            self._writer.file_writer.add_summary(experiment)
            self._writer.file_writer.add_summary(session_start)
            self._writer.add_text("cell", f"suite {cell.suite}, cell {cell.title}, run folder {cell.run_dir}", 0)
        self._writer.flush()

    def resume(self, history: list[dict]) -> None:
        for record in history:
            self._scalars(record)
        self._writer.flush()

    def log_epoch(self, record: dict) -> None:
        self._scalars(record)
        self._writer.flush()

    def _scalars(self, record: dict) -> None:
        step = int(record["epoch"])
        for key, value in numeric_items(record, skip=("epoch",)).items():
            self._writer.add_scalar(key, value, step)
        self._step = max(self._step, step)

    def log_diagnostics(self, rows: list[dict], step: int) -> None:
        for row in rows:
            self._writer.add_scalar(f"rmse/{row['metric']}/{row['layer']}", float(row["value"]), step)
        self._writer.flush()

    def end_cell(self, metrics: dict) -> None:
        step = max(self._step, 1)  # >= 1: a later start's purge_step=1 hides it
        for key, value in numeric_items(metrics).items():
            if not key.startswith("rmse_"):  # the per-layer RMSE is under rmse/ (log_diagnostics)
                self._writer.add_scalar(f"final/{key}", value, step)
        status = metrics.get("status", "")
        error = metrics.get("error") or ""
        self._writer.add_text("status", f"{status}: {error}" if error else status, step)
        session_end = _session_end(succeeded=status == "ok")
        self._writer.file_writer.add_summary(session_end, step)
        self._writer.close()
        self._writer = None

    # ----------------------------------------------------------------------- a report

    def log_report(self, report: ReportInfo) -> None:
        import matplotlib.image

        writer, _ = self._open(self._root(report.run_dir) / REPORT_RUN)
        try:
            for figure in report.figures:
                if figure.suffix.lower() == ".png":
                    image = matplotlib.image.imread(str(figure))  # [H, W, 3 or 4] floats in [0, 1]
                    writer.add_image(f"figures/{figure.stem}", image[..., :3], 1, dataformats="HWC")
            writer.add_text("report", report.report_file.read_text(encoding="utf-8"), 1)
        finally:
            writer.close()


def _session_end(succeeded: bool):
    """The HParams plugin's session-end summary with the cell's status (torch's ``hparams()``
    always writes success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE)
    content = plugin_data_pb2.HParamsPluginData(session_end_info=info, version=metadata.PLUGIN_DATA_VERSION)
    plugin_data = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin_data))])


@hookimpl
def gmbench_logger():
    return TensorBoardLogger
