"""Reports of a run folder: tables, the paper's numbers beside the measured ones, figures.

* :mod:`gmbench.report.document` -- :func:`write_report`: ``report.md`` and its files;
* :mod:`gmbench.report.tables` -- tables from ``results.csv`` (Markdown, CSV, LaTeX);
* :mod:`gmbench.report.paper` -- the paper's numbers (``paper_results.yaml``, package data)
  and the paper columns of a table;
* :mod:`gmbench.report.figures` -- the report's figures; :mod:`gmbench.report.input_figures`
  (fitted input mixtures) and :mod:`gmbench.report.fitting_figure` (``gmbench figure``).

The names below are the package's public interface; matplotlib is imported only by the
figure modules, when a report draws figures.
"""

from gmbench.report.document import DEFAULT_TEMPLATE, TEMPLATE_FIELDS, write_report
from gmbench.report.paper import PAPER_RESULTS, load_paper_results
from gmbench.report.tables import build_diagnostics_table, build_table, compare_runs, default_tables, to_latex, to_markdown

__all__ = [
    "DEFAULT_TEMPLATE", "PAPER_RESULTS", "TEMPLATE_FIELDS", "build_diagnostics_table", "build_table", "compare_runs",
    "default_tables", "load_paper_results", "to_latex", "to_markdown", "write_report",
]
