"""``--smoke``: every cell shrunk so that a whole suite runs end to end in seconds.

Each task says how its cells shrink (:attr:`gmbench.tasks.Task.smoke`): training cells
get one epoch, 48 train / 24 test samples and small diagnostics, Table 7 cells time 16
mixtures of at most 32 Gaussians once.  For a task whose
:attr:`~gmbench.tasks.Task.smoke_divides_gaussians` is set, every Gaussian count of the
suite (``n_gaussians``, layouts, report filters) is divided by one power of two so the
largest is at most 16 while the sizes stay apart.  The suite's ``smoke:`` overrides come
on top.
"""

from __future__ import annotations

from gmbench import tasks
from gmbench.suite.expansion import merge
from gmbench.tasks.fields import SMOKE_MAX_GAUSSIANS, SMOKE_TEST_SAMPLES, SMOKE_TRAIN_SAMPLES, is_int, shrink_layout

__all__ = [
    "SMOKE_MAX_GAUSSIANS", "SMOKE_TEST_SAMPLES", "SMOKE_TRAIN_SAMPLES", "apply_smoke", "shrink_layout",
    "shrink_report_filters", "smoke_factor",
]


def smoke_factor(configs: list[dict], task: str = tasks.DEFAULT_TASK) -> int:
    """The power of two that brings the suite's largest Gaussian count to at most 16.

    One factor for the whole suite keeps its sizes apart (32 / 64 / 128 -> 4 / 8 / 16),
    so a smoke run's tables have the same columns as the full run's.
    """
    default = tasks.get(task).fields["n_gaussians"].default
    counts = [c.get("n_gaussians", default) for c in configs]
    largest = max((n for n in counts if is_int(n)), default=0)
    factor = 1
    while largest // factor > SMOKE_MAX_GAUSSIANS:
        factor *= 2
    return factor


def shrink_report_filters(report: dict, factor: int) -> None:
    """Divide the Gaussian counts that report tables filter on (``where: {n_gaussians: 64}``)
    like the cells' under --smoke, so those tables are not empty in a smoke run."""
    for table in report.get("tables") or []:
        where = table.get("where") if isinstance(table, dict) else None
        if not isinstance(where, dict) or "n_gaussians" not in where:
            continue
        wanted = where["n_gaussians"]
        shrink = lambda n: max(2, n // factor) if is_int(n) else n  # noqa: E731
        where["n_gaussians"] = [shrink(n) for n in wanted] if isinstance(wanted, list) else shrink(wanted)


def apply_smoke(task: str, config: dict, overrides: dict, factor: int) -> dict:
    """Shrink one expanded cell in place as its task says (``factor`` from
    :func:`smoke_factor`), then apply the suite's ``smoke:`` overrides."""
    tasks.get(task).smoke(config, factor)
    merge(config, overrides)
    return config
