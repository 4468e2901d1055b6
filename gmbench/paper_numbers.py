"""The paper's numbers as data: ``gmbench/report/paper_results.yaml`` (package data), read here.

Kept outside :mod:`gmbench.report` (whose package imports pandas for its tables) so that
suite validation can check a report table's ``paper:`` name without importing pandas;
:mod:`gmbench.report.paper` sets these numbers beside the measured ones.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Each table cites its source in the file.
PAPER_RESULTS = Path(__file__).parent / "report" / "paper_results.yaml"


def load_paper_results(path: str | Path = PAPER_RESULTS) -> dict:
    """The paper's tables: table name -> {source, records, note, ...}."""
    with open(path) as handle:
        return yaml.safe_load(handle)["tables"]
