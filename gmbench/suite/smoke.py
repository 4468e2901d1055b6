"""``--smoke``: every cell shrunk so that a whole suite runs end to end in seconds.

Training cells get one epoch, 48 train / 24 test samples and small diagnostics;
every Gaussian count of the suite (``n_gaussians``, layouts, report filters) is
divided by one power of two so the largest is at most 16 while the sizes stay
apart.  Table 7 cells time 16 mixtures of at most 32 Gaussians once.  The suite's
``smoke:`` overrides come on top.
"""

from __future__ import annotations

from gmbench.suite.expansion import merge
from gmbench.suite.schema import CELL_FIELDS
from gmbench.suite.yaml_lines import LDict

SMOKE_TRAIN_SAMPLES = 48
SMOKE_TEST_SAMPLES = 24
SMOKE_MAX_GAUSSIANS = 16


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def smoke_factor(configs: list[dict]) -> int:
    """The power of two that brings the suite's largest Gaussian count to at most 16.

    One factor for the whole suite keeps its sizes apart (32 / 64 / 128 -> 4 / 8 / 16),
    so a smoke run's tables have the same columns as the full run's.
    """
    default = CELL_FIELDS["train"]["n_gaussians"].default
    counts = [c.get("n_gaussians", default) for c in configs]
    largest = max((n for n in counts if _is_int(n)), default=0)
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
        shrink = lambda n: max(2, n // factor) if _is_int(n) else n  # noqa: E731
        where["n_gaussians"] = [shrink(n) for n in wanted] if isinstance(wanted, list) else shrink(wanted)


def shrink_layout(layout: str, factor: int) -> str:
    """Divide every Gaussian count of a layout string by ``factor`` (at least 2 each), for --smoke."""
    parts = layout.split("->")
    shrunk = []
    for part in parts[:-1]:
        if "/" in part and part.split("/")[1].strip().isdigit():
            channels, gaussians = part.split("/")
            shrunk.append(f"{channels.strip()}/{max(2, int(gaussians) // factor)}")
        else:
            shrunk.append(part)
    return "->".join([*shrunk, parts[-1]])


def apply_smoke(task: str, config: dict, overrides: dict, factor: int) -> dict:
    """Shrink one expanded cell in place (``factor`` from :func:`smoke_factor`), then apply
    the suite's ``smoke:`` overrides."""
    if task == "train":
        training = config.setdefault("training", LDict())
        training["epochs"] = 1
        config["train_samples"] = min(config.get("train_samples") or SMOKE_TRAIN_SAMPLES, SMOKE_TRAIN_SAMPLES)
        config["test_samples"] = min(config.get("test_samples") or SMOKE_TEST_SAMPLES, SMOKE_TEST_SAMPLES)
        config["diagnostics_samples"] = min(config.get("diagnostics_samples", 4), 4)
        config["diagnostics_points"] = min(config.get("diagnostics_points", 2000), 2000)
        n = config.get("n_gaussians", CELL_FIELDS["train"]["n_gaussians"].default)
        if factor > 1 and _is_int(n):
            config["n_gaussians"] = max(2, n // factor)
            if config.get("n_points"):
                config["n_points"] = max(8, config["n_points"] // factor)
            params = config.get("model_params") or {}
            layout = params.get("layout")
            if isinstance(layout, str):
                params["layout"] = shrink_layout(layout.replace("{n_gaussians}", str(n)), factor)
    elif task == "transfer_fitting_timing":
        config["n_mixtures"] = min(config.get("n_mixtures", 800), 16)
        config["n_gaussians"] = min(config.get("n_gaussians", 256), 32)
        config["repeats"] = 1
        config["rmse_samples"] = min(config.get("rmse_samples", 20000), 2000)
    merge(config, overrides)
    return config
