"""Figures of a report (matplotlib, Agg), each saved as PNG and PDF.

* accuracy vs number of input Gaussians per model (error bars: std over seeds);
* training curves (test accuracy and training loss per epoch, per cell);
* per-layer RMSE bars per reduction method (cells run with ``diagnostics: true``);
* peak memory and training time per model;
* time and RMSE per transfer-fitting method (Table 7 suites);
* the fitted input mixtures of a few test samples per data set and fitting method.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import json  # noqa: E402
import logging  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gmbench import io, plugins  # noqa: E402
from gmbench.report.input_figures import save_split_figure  # noqa: E402
from gmbench.run.folder import DIAGNOSTICS_FILE, cell_dir, read_config, read_environment, read_epochs  # noqa: E402
from gmbench.tasks import TASKS, dataset_parameters  # noqa: E402


def _save(fig, folder: Path, stem: str) -> None:
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        with io.atomic_path(folder / f"{stem}.{suffix}") as tmp:
            fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def accuracy_vs_gaussians(frame: pd.DataFrame, folder: Path) -> bool:
    data = _ok(frame).dropna(subset=["test_accuracy", "n_gaussians"])
    if data.empty or data["n_gaussians"].nunique() < 2:
        return False
    datasets = list(dict.fromkeys(data["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        subset = data[data["dataset"] == dataset].copy()
        subset["series"] = subset["label"].astype(str) + subset["input"].map(lambda v: f" ({v})" if isinstance(v, str) else "")
        for series, group in subset.groupby("series", sort=False):
            stats = group.groupby("n_gaussians")["test_accuracy"].agg(["mean", "std"]).reset_index()
            axis.errorbar(stats["n_gaussians"], 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o", capsize=3, label=series)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("input Gaussians")
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(str(dataset))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(fig, folder, "accuracy_vs_gaussians")
    return True


def training_curves(run_dir: Path, frame: pd.DataFrame, folder: Path) -> bool:
    # Cells of tasks that train epoch by epoch (their epochs.jsonl).
    data = frame[frame["task"].map(lambda name: name in TASKS and TASKS[name].epochs_field is not None)] if "task" in frame else frame
    curves = []
    for _, row in data.iterrows():
        records = [r for r in read_epochs(cell_dir(run_dir, row["cell_id"])) if {"epoch", "test_accuracy", "train_loss"} <= r.keys()]
        if records:
            curves.append((row, pd.DataFrame(records)))
    if not curves:
        return False
    datasets = list(dict.fromkeys(str(row["dataset"]) for row, _ in curves))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 6.5), squeeze=False, sharex="col")
    for column, dataset in enumerate(datasets):
        for row, history in curves:
            if str(row["dataset"]) != dataset:
                continue
            name = f"{row['label']} N={row['n_gaussians']} s{row['seed']}"
            # Markers keep one-epoch (--smoke) curves visible.
            axes[0][column].plot(history["epoch"], 100 * history["test_accuracy"], marker="o", markersize=3, label=name)
            axes[1][column].plot(history["epoch"], history["train_loss"], marker="o", markersize=3, label=name)
        axes[0][column].set_title(dataset)
        axes[0][column].set_ylabel("test accuracy (%)")
        axes[1][column].set_ylabel("training loss")
        axes[1][column].set_xlabel("epoch")
        axes[1][column].set_yscale("log")
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
        axes[0][column].legend(fontsize=6)
    _save(fig, folder, "training_curves")
    return True


def rmse_per_layer(run_dir: Path, frame: pd.DataFrame, folder: Path) -> bool:
    parts = []
    for _, row in _ok(frame).iterrows():
        path = cell_dir(run_dir, row["cell_id"]) / DIAGNOSTICS_FILE
        if path.is_file():
            diagnostics = pd.read_csv(path)
            diagnostics["label"] = row["label"]
            parts.append(diagnostics)
    if not parts:
        return False
    data = pd.concat(parts, ignore_index=True)
    if not {"layer", "metric", "value"} <= set(data.columns):
        return False
    metrics = list(dict.fromkeys(data["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        table = data[data["metric"] == metric].groupby(["layer", "label"])["value"].mean().unstack("label")
        table.plot.bar(ax=axis, rot=0)
        axis.set_title(f"RMSE: {metric}")
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=7)
    _save(fig, folder, "rmse_per_layer")
    return True


def memory_and_time(frame: pd.DataFrame, folder: Path) -> bool:
    data = _ok(frame).dropna(subset=["train_time_s"]) if "train_time_s" in frame else pd.DataFrame()
    if data.empty:
        return False
    data = data.copy()
    data["series"] = data["label"].astype(str) + data["n_gaussians"].map(lambda n: f" N={n}")
    stats = data.groupby("series", sort=False)[["peak_memory_mb", "train_time_s"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(stats) + 2))
    stats["peak_memory_mb"].plot.barh(ax=axes[0], color="tab:blue")
    axes[0].set_xlabel("peak memory (MiB)")
    stats["train_time_s"].plot.barh(ax=axes[1], color="tab:orange")
    axes[1].set_xlabel("training time (s)")
    for axis in axes:
        axis.set_ylabel("")
        axis.grid(alpha=0.3, axis="x")
    _save(fig, folder, "memory_and_time")
    return True


def transfer_fitting_timing(frame: pd.DataFrame, folder: Path) -> bool:
    if "time_ms" not in frame:
        return False
    data = _ok(frame).dropna(subset=["time_ms"])
    if data.empty:
        return False
    stats = data.groupby("label", sort=False)[["time_ms", "rmse"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(stats) + 2))
    stats["time_ms"].plot.barh(ax=axes[0], logx=True, color="tab:blue")
    axes[0].set_xlabel("time per batch (ms, log)")
    stats["rmse"].plot.barh(ax=axes[1], color="tab:orange")
    axes[1].set_xlabel("RMSE vs ReLU of the input")
    for axis in axes:
        axis.set_ylabel("")
    _save(fig, folder, "transfer_fitting_timing")
    return True


def input_fitting_examples(run_dir: Path, frame: pd.DataFrame, folder: Path) -> list[tuple[str, str]]:
    """Fitted input mixtures of the first test samples, one per data set and
    fitting method of the mixture-input cells; skipped when the data cannot be loaded here."""
    drawn, seen = [], set()
    data_root = read_environment(run_dir).get("data_root")
    for _, row in _ok(frame).iterrows():
        task = TASKS.get(row.get("task"))
        if task is None or not task.uses_dataset or row.get("input") != "gm":
            continue
        config = read_config(cell_dir(run_dir, row["cell_id"]), "its input mixtures are not drawn")
        if config is None:
            continue
        key = (config["dataset"], json.dumps(config.get("dataset_params"), sort_keys=True), config.get("input_fitting"), json.dumps(config.get("input_fitting_params"), sort_keys=True), config.get("n_gaussians"))
        if key in seen:
            continue
        seen.add(key)
        stem = f"input_{config['dataset']}_{config.get('input_fitting')}_{config.get('n_gaussians')}"
        params = dataset_parameters(config["dataset_params"], data_root)  # as the runner passed them
        try:
            split = plugins.create("dataset", config["dataset"], **params).load("test")
            for suffix in ("png", "pdf"):
                save_split_figure(split, config["input_fitting"], config["n_gaussians"], config["input_fitting_params"], folder / f"{stem}.{suffix}", samples=8)
        except Exception as error:  # noqa: BLE001 - e.g. the data set is not on this machine
            logging.getLogger("gmbench.report").info("input fitting figure for %s skipped: %s", config["dataset"], error)
            continue
        drawn.append((f"Input mixtures: {config['dataset']}, {config['input_fitting']}, {config['n_gaussians']} Gaussians", stem))
    return drawn


def draw_all(run_dir: Path, frame: pd.DataFrame, folder: Path) -> list[tuple[str, str]]:
    """Draw every figure the results support; return (title, file stem) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    drawn = []
    if accuracy_vs_gaussians(frame, folder):
        drawn.append(("Accuracy vs number of input Gaussians", "accuracy_vs_gaussians"))
    if training_curves(run_dir, frame, folder):
        drawn.append(("Training curves", "training_curves"))
    if rmse_per_layer(run_dir, frame, folder):
        drawn.append(("Per-layer fitting RMSE per reduction method", "rmse_per_layer"))
    if memory_and_time(frame, folder):
        drawn.append(("Peak memory and training time", "memory_and_time"))
    if transfer_fitting_timing(frame, folder):
        drawn.append(("Transfer fitting: time and error", "transfer_fitting_timing"))
    drawn.extend(input_fitting_examples(run_dir, frame, folder))
    return drawn
