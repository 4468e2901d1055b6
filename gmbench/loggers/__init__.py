"""Experiment tracking: logger plugins fed by the trainer and the runner.

Built-ins: :mod:`~gmbench.loggers.tensorboard_logger` (``tensorboard``) and
:mod:`~gmbench.loggers.mlflow_logger` (``mlflow``), each needing its optional
package (``pip install 'gmbench[tensorboard]'`` / ``'gmbench[mlflow]'``).  The
contract is :class:`gmbench.hookspecs.LoggerPlugin`; the run folder's own files
stay the source of truth (see ``docs/tracking.md``).
"""

from gmbench.loggers.records import CellInfo, ReportInfo
from gmbench.loggers.tracking import LOGGERS_FILE, CellLoggers, LoggerChoice, check_stores, choose, log_report, record_choice, run_loggers

__all__ = ["LOGGERS_FILE", "CellInfo", "CellLoggers", "LoggerChoice", "ReportInfo", "check_stores", "choose", "log_report", "record_choice", "run_loggers"]
