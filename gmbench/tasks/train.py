"""The ``train`` task: fit the inputs (or sample points), train a model, measure it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from gmbench import io, plugins
from gmbench.baselines.inputs import matching_point_count, mixture_point_features, sample_points
from gmbench.cache import fit_cached
from gmbench.diagnostics import fitting_diagnostics
from gmbench.metrics import accuracy_summary
from gmbench.run import folder
from gmbench.suite import substitute_placeholders
from gmbench.tasks import dataset_parameters
from gmbench.training import TrainConfig, train

# Subsets for train_samples/test_samples are drawn with this fixed seed, so every
# cell of a suite (whatever its training seed) sees the same samples.
SUBSET_SEED = 0


def _fixed_choice(total: int, limit: int) -> torch.Tensor:
    """``limit`` of ``range(total)``, drawn with SUBSET_SEED and sorted: the same for every cell."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit].sort().values


def _subset(split, limit: int | None):
    if limit is None or limit >= len(split):
        return split
    subset = split.subset(_fixed_choice(len(split), limit))
    # The fitted-mixture cache keys on the split's name: a subset is another split.
    subset.split = f"{split.split}-first{limit}-seed{SUBSET_SEED}"
    return subset


def _plugin_choice(model_info, params: dict, kind: str) -> str | None:
    """``treehem(T=2)``: a nested plugin choice of a model with its parameters, for results."""
    accepted = {p.name: p for p in model_info.parameters}
    if kind not in accepted:
        return None
    name = params.get(kind, accepted[kind].default)
    if not isinstance(name, str):
        return None
    nested = params.get(f"{kind}_params") or {}
    if nested:
        return f"{name}(" + ",".join(f"{key}={value}" for key, value in sorted(nested.items())) + ")"
    return name


def run(config: dict, cell_dir: Path, options, on_epoch) -> dict:
    """Train one model on one data set (Tables 1-4, 8-11); metrics of the trained model."""
    params = dataset_parameters(config["dataset_params"], options.data_root)
    dataset = plugins.create("dataset", config["dataset"], **params)
    train_split = _subset(dataset.load("train"), config["train_samples"])
    test_split = _subset(dataset.load("test"), config["test_samples"])
    num_classes, dims = train_split.num_classes, train_split.dims

    model_info = plugins.get("model", config["model"])
    model_params = substitute_placeholders(config["model_params"], num_classes=num_classes)
    takes_points = "in_features" in {p.name for p in model_info.parameters}
    n_gaussians = config["n_gaussians"]
    metrics: dict[str, Any] = {
        "num_classes": num_classes, "dims": dims, "n_train": len(train_split), "n_test": len(test_split),
        "layout": model_params.get("layout"), "n_points": None,
        "transfer_fitting": _plugin_choice(model_info, model_params, "transfer_fitting"),
        "reduction": _plugin_choice(model_info, model_params, "reduction"),
    }

    fit_started = time.perf_counter()
    if config["input"] == "points":
        n_points = config["n_points"] or matching_point_count(n_gaussians, dims)
        train_x = sample_points(train_split, n_points, seed=config["seed"])
        test_x = sample_points(test_split, n_points, seed=config["seed"] + 1_000_003)
        metrics["n_points"] = n_points
        model_params["in_features"] = 0
    else:
        fit = dict(method=config["input_fitting"], n_components=n_gaussians, params=config["input_fitting_params"], cache_dir=options.cache_dir, progress=options.progress)
        train_x = fit_cached(train_split, **fit)
        test_x = fit_cached(test_split, **fit)
        if takes_points:
            train_x = mixture_point_features(train_x)
            test_x = mixture_point_features(test_x)
            model_params["in_features"] = int(train_x.shape[-1]) - dims
            metrics["n_points"] = int(train_x.shape[1])
    metrics["input_time_s"] = time.perf_counter() - fit_started

    torch.manual_seed(config["seed"])  # model initialisation depends on the cell seed only
    model = plugins.create("model", config["model"], num_classes=num_classes, dims=dims, **model_params)
    train_config = TrainConfig(**config["training"], seed=config["seed"], device=options.device, progress=options.progress)
    result = train(
        model, train_x, train_split.labels, test_x, test_split.labels, train_config,
        run_dir=cell_dir, on_epoch=on_epoch,
    )
    metrics.update(
        test_accuracy=result.test_accuracy, best_test_accuracy=result.best_test_accuracy,
        train_time_s=result.train_time_s, samples_per_s=result.samples_per_s,
        peak_memory_mb=result.peak_memory_mb, params=result.params, epochs=result.epochs_completed,
    )
    # The paper's accuracies are TensorBoard-smoothed (Appendix F); Table 8 also counts kernels.
    metrics.update(accuracy_summary([record["test_accuracy"] for record in result.history]))
    if callable(getattr(model, "kernel_count", None)):
        metrics["kernels"] = model.kernel_count()
    if config["diagnostics"]:
        metrics.update(_diagnostics(model, _diagnostics_samples(test_x, config["diagnostics_samples"]), cell_dir, config))
    return metrics


def _diagnostics_samples(x, n: int):
    """A fixed random choice of ``n`` test samples (seed SUBSET_SEED): splits are often
    stored class by class (mnist5k, ModelNet), so the first ``n`` would be one class."""
    return x if n >= len(x) else x[_fixed_choice(len(x), n)]


def _diagnostics(model, x, cell_dir: Path, config: dict) -> dict:
    """Per-layer fitting errors (Tables 10-11) of the trained model on the first test samples."""
    frame = fitting_diagnostics(model, x, n_samples=config["diagnostics_points"], seed=config["seed"])
    with io.atomic_path(cell_dir / folder.DIAGNOSTICS_FILE) as tmp:
        frame.to_csv(tmp, index=False)
    summary = {}
    for _, row in frame.iterrows():
        summary[f"rmse_{row['metric']}_{row['layer']}"] = float(row["value"])
    return summary
