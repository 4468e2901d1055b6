"""The training recipe shared by every model (GMCN and the point-cloud baselines).

Paper Section 5: Adam with an initial learning rate of 1e-3, the rate reduced
once the accuracy plateaus (``ReduceLROnPlateau`` in mode ``max`` on the test
accuracy, factor 0.1, patience 5, cooldown 8; ``lr_schedule: cosine`` instead
anneals it over the planned epochs without looking at the test set), negative log-likelihood loss
plus the model's optional ``regularization_loss()``, batch size 21, 60 epochs.
The authors' code attached two plateau schedulers to one optimiser, which cut
the rate twice per plateau; here there is exactly one.

The paper has no validation split: the scheduler watches the test accuracy,
as the authors' did.  The same holds for ``best_test_accuracy``; report
``test_accuracy`` (the last epoch) as the unbiased number.

A run directory receives

* ``epochs.jsonl``: one JSON line per finished epoch, flushed as it is written
  (keys: epoch, train_loss, train_accuracy, test_accuracy, lr, epoch_time_s,
  samples_per_s, peak_memory_mb), so a crash loses at most the epoch in flight;
* ``checkpoint.pt``: model, optimiser, scheduler, every RNG state and the
  history, written atomically after each epoch.  ``train`` resumes from it when
  present; on CPU the resumed run is bit-identical to an uninterrupted one.  A
  checkpoint that does not fit the cell is moved to ``checkpoint.pt.rejected``
  with one warning and the cell trains from scratch (:mod:`gmbench.checkpoint`).

Inputs are tensors indexed on dim 0: GMCN mixtures ``[S, 1, N, K]``, baseline
point sets ``[S, P, D + F]``; labels ``[S]`` int64.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmbench import io
from gmbench.checkpoint import resume, rng_state
from gmbench.errors import GmbenchError
from gmbench.run.folder import CHECKPOINT_FILE, EPOCHS_FILE
from gmbench.run.ranks import current


LR_SCHEDULES = ("plateau", "cosine")


class TrainingDiverged(GmbenchError):
    """The loss became NaN or infinite; the epochs finished before are on disk."""


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: paper Section 5 / Appendix F).

    ``grad_clip``: maximum total gradient norm (``None``: no clipping).
    ``eval_batch_size``: batch size for the test pass (``None``: ``batch_size``).
    ``progress``: tqdm bars with loss and accuracy, shown only on a terminal.
    ``lr_schedule``: ``"plateau"`` (the paper: ``ReduceLROnPlateau`` on the test accuracy
    with ``lr_factor``, ``lr_patience``, ``lr_cooldown``) or ``"cosine"`` (epoch ``e`` of
    ``epochs`` trains at ``lr * (1 + cos(pi (e - 1) / epochs)) / 2``; the plateau fields
    are unused).
    ``precise_bn_samples``: after each epoch, before the test pass, re-estimate every
    normalisation layer's running statistics (batch norm; GMCN pooling traces) as plain
    averages over this many training samples with the weights fixed ("precise batch
    norm", Wu & Johnson 2021; see :func:`recalibrate_normalization`).  ``None``: evaluate
    with the exponential running averages of training, which lag while the weights
    change quickly (high learning rates, short runs).
    """

    epochs: int = 60
    batch_size: int = 21
    lr: float = 1e-3
    seed: int = 0
    lr_factor: float = 0.1
    lr_patience: int = 5
    lr_cooldown: int = 8
    grad_clip: float | None = None
    device: str = "cpu"
    progress: bool = True
    eval_batch_size: int | None = None
    lr_schedule: str = "plateau"
    precise_bn_samples: int | None = None

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("lr_factor", 0 < self.lr_factor < 1, "in (0, 1)"),
            ("lr_patience", self.lr_patience >= 0, "non-negative"),
            ("lr_cooldown", self.lr_cooldown >= 0, "non-negative"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "positive or null"),
            ("eval_batch_size", self.eval_batch_size is None or self.eval_batch_size >= 1, "at least 1 or null"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
            ("precise_bn_samples", self.precise_bn_samples is None or self.precise_bn_samples >= 2, "at least 2 or null"),
        ]
        for field, ok, requirement in checks:
            if not ok:
                raise GmbenchError(
                    f"training parameter '{field}' = {getattr(self, field)!r} must be {requirement}; fix it in the suite"
                )


@dataclasses.dataclass
class TrainResult:
    """Summary of a finished run; ``history`` holds the per-epoch records of ``epochs.jsonl``."""

    test_accuracy: float
    best_test_accuracy: float
    train_time_s: float
    samples_per_s: float
    peak_memory_mb: float
    params: int
    epochs_completed: int
    history: list[dict]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (call before building the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for :func:`peak_memory_mb`.

    CUDA: the allocator's peak statistics. CPU on Linux: the kernel's peak RSS
    (``VmHWM``; writing 5 to ``/proc/self/clear_refs`` resets it), so cells run one
    after another in one process each report their own peak instead of the
    process's lifetime maximum. Elsewhere the CPU peak stays the lifetime maximum.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # not Linux (or not permitted): the documented lifetime maximum remains


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated on ``device`` since the last reset; CPU: peak RSS since the last
    :func:`reset_peak_memory` on Linux, the process's lifetime peak RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _batches(n: int, batch_size: int, min_size: int = 2) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges; a trailing batch of fewer than ``min_size`` samples joins the
    previous one (batch norm cannot compute statistics from a single sample; data-parallel
    training needs at least one sample per process)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_size:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, disable=not (enabled and sys.stderr.isatty()))


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The learning-rate schedule of ``config.lr_schedule``, stepped once per epoch."""
    if config.lr_schedule == "cosine":
        # The curve is not part of the checkpoint (LambdaLR saves its step count only): a
        # run resumed with more epochs continues on the curve of its new epoch count.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: 0.5 * (1.0 + math.cos(math.pi * done / config.epochs))
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.lr_factor, patience=config.lr_patience, cooldown=config.lr_cooldown
    )


def _regularization(model: nn.Module, lr: float) -> Tensor | None:
    """The model's ``regularization_loss()``; given the current learning rate when it asks
    for one (``learning_rate`` keyword: the GMCN weight decay of Eq. 8 scales with it)."""
    method = getattr(model, "regularization_loss", None)
    if method is None:
        return None
    if "learning_rate" in inspect.signature(method).parameters:
        return method(learning_rate=lr)
    return method()


def recalibrate_normalization(model: nn.Module, x: Tensor, samples: int, batch_size: int, seed: int, device: torch.device) -> int:
    """Re-estimate the running statistics of ``model``'s normalisation layers from data.

    Every module with ``reset_running_stats()`` and a ``momentum`` (``torch.nn``'s batch
    norms, :class:`~gmbench.models.pooling.ScaleNormalization`) is reset and switched to
    the cumulative average (``momentum = None``); ``samples`` samples of ``x`` (a fixed
    random choice drawn with ``seed``) then run forward in training mode without
    gradients, in batches of ``batch_size``, so each running value becomes the plain
    mean of the batch statistics at the current weights ("precise batch norm", Wu &
    Johnson 2021; ``torch.optim.swa_utils.update_bn`` does this for batch norms only).
    Momenta and the training flag are restored.  Returns the number of layers updated.
    """
    layers = [m for m in model.modules() if callable(getattr(m, "reset_running_stats", None)) and hasattr(m, "momentum")]
    if not layers:
        return 0
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
        model.train()
        with torch.no_grad():
            for start, stop in _batches(len(index), batch_size):
                model(x[index[start:stop]].to(device))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return len(layers)


def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device, distributed=None) -> float:
    """Fraction of correctly classified samples, model in eval mode, no gradients.

    ``distributed`` (a :class:`gmbench.run.ranks.DistributedContext`): each rank
    evaluates its shard of ``x`` and the counts are summed over ranks.
    """
    if distributed is not None and distributed.is_distributed:
        model = distributed.unwrap(model)
        x, y = distributed.shard(x, allow_empty=True), distributed.shard(y, allow_empty=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            correct += int((model(xb).argmax(-1) == yb).sum())
    total = len(x)
    if distributed is not None and distributed.is_distributed:
        correct, total = distributed.sum([correct, total])
    return correct / max(total, 1)


def train(
    model: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    on_epoch: Callable[[dict], Any] | None = None,
    distributed=None,
) -> TrainResult:
    """Train ``model`` with the paper's recipe; see the module docstring.

    Shapes: ``train_x [S, ...]``, ``train_y [S]`` (int64 class indices),
    likewise for the test tensors.  ``augment(x, generator)`` is applied to
    training batches only, drawing randomness from ``generator`` so that it is
    part of the checkpointed state.  ``on_epoch(record)`` is called after each
    epoch, once the record and checkpoint are on disk.

    ``distributed``: a :class:`gmbench.run.ranks.DistributedContext` (default: the
    process group this process joined, else single-process).  Under data parallelism
    ``batch_size`` is the global batch, split over the ranks; metrics are reduced
    over ranks and only rank 0 writes ``run_dir`` (see :mod:`gmbench.run.ranks`).

    Raises :class:`TrainingDiverged` on a NaN/inf loss.
    """
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("inputs and labels must have the same number of samples")
    if len(train_x) < 2:
        raise GmbenchError(f"training needs at least 2 samples, got {len(train_x)}; use a larger split")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GmbenchError(f"device '{config.device}' requested but CUDA is not available; set device: cpu")
    run_dir = Path(run_dir) if run_dir is not None else None
    if distributed is None:
        distributed = current()

    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    # foreach: the multi-tensor update (torch picks it by default on CUDA only); on CPU the
    # same bits as the per-parameter loop in fewer ops (measured); fused=True would round differently.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
    scheduler = _scheduler(optimizer, config)
    history: list[dict] = []

    checkpoint_path = run_dir / CHECKPOINT_FILE if run_dir is not None else None
    resumed = None
    if checkpoint_path is not None and checkpoint_path.exists():
        # None: the file did not fit this cell, was set aside with a warning, and the run starts fresh.
        resumed = resume(checkpoint_path, config, model, optimizer, scheduler, generator, device, distributed.is_writer)
        if resumed is None:  # a rejected file may have set some generators before it failed
            seed_everything(config.seed)
            generator.manual_seed(config.seed)
    if resumed is not None:
        history = resumed
        # The log may hold a line the checkpoint does not (a crash between the two
        # writes) or lack one; the checkpoint is the truth.
        if distributed.is_writer:
            io.write_text(run_dir / EPOCHS_FILE, "".join(_json_line(r) for r in history))
    elif run_dir is not None and distributed.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / EPOCHS_FILE).unlink(missing_ok=True)

    # Wrapped after the checkpoint is loaded: DDP broadcasts rank 0's state on construction.
    trained = distributed.wrap(model, device)
    eval_batch_size = config.eval_batch_size or config.batch_size
    n_train = len(train_x)
    for epoch in range(len(history) + 1, config.epochs + 1):
        reset_peak_memory(device)
        trained.train()
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        order = torch.randperm(n_train, generator=generator)
        loss_sum, correct = 0.0, 0
        bounds = _batches(n_train, config.batch_size, min_size=max(2, distributed.world_size))
        with _progress_bar(len(bounds), f"epoch {epoch}/{config.epochs}", config.progress and distributed.is_writer) as bar:
            for step, (start, stop) in enumerate(bounds):
                index = order[start:stop]
                xb = train_x[index].to(device)
                yb = train_y[index].to(device)
                if augment is not None:
                    xb = augment(xb, generator)
                # Every rank drew the same global batch (and augmentation); each trains on its shard.
                xb, yb = distributed.shard(xb), distributed.shard(yb)
                log_probs = trained(xb)
                loss = F.nll_loss(log_probs, yb)
                regularization = _regularization(model, lr)
                if regularization is not None:
                    loss = loss + regularization.sum()
                if not distributed.all_finite(loss):
                    raise TrainingDiverged(
                        f"training diverged: loss is {loss.item()} at epoch {epoch}, batch {step + 1}; "
                        f"epochs 1-{epoch - 1} are saved; lower lr or set grad_clip"
                    )
                optimizer.zero_grad(set_to_none=True)
                distributed.scale_for_backward(loss, len(yb), len(index)).backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                loss_sum += loss.item() * len(yb)
                correct += int((log_probs.argmax(-1) == yb).sum())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / stop:.3f}", acc=f"{correct / stop:.3f}")
        train_time = time.perf_counter() - started
        loss_sum, correct = distributed.sum([loss_sum, correct])
        if config.precise_bn_samples is not None:
            # Every rank averages the same samples, so their statistics stay equal.
            recalibrate_normalization(model, train_x, config.precise_bn_samples, config.batch_size, config.seed, device)
        test_accuracy = evaluate_accuracy(model, test_x, test_y, eval_batch_size, device, distributed)
        if config.lr_schedule == "plateau":
            scheduler.step(test_accuracy)
        else:
            scheduler.step()
        epoch_time = time.perf_counter() - started
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / n_train,
            "train_accuracy": correct / n_train,
            "test_accuracy": test_accuracy,
            "lr": lr,
            "epoch_time_s": epoch_time,
            "samples_per_s": n_train / train_time if train_time > 0 else math.inf,
            "peak_memory_mb": peak_memory_mb(device),
        }
        history.append(record)
        if run_dir is not None and distributed.is_writer:
            io.append_jsonl(run_dir / EPOCHS_FILE, record)
            io.save_torch(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(generator, device),
                    "history": history,
                    "config": dataclasses.asdict(config),
                },
            )
        if on_epoch is not None:
            on_epoch(record)

    return _result(model, history)


def _json_line(record: dict) -> str:
    return json.dumps(record, default=str) + "\n"


def _result(model: nn.Module, history: list[dict]) -> TrainResult:
    train_time = sum(r["epoch_time_s"] for r in history)
    samples_per_s = [r["samples_per_s"] for r in history]
    return TrainResult(
        test_accuracy=history[-1]["test_accuracy"] if history else float("nan"),
        best_test_accuracy=max((r["test_accuracy"] for r in history), default=float("nan")),
        train_time_s=train_time,
        samples_per_s=float(np.mean(samples_per_s)) if samples_per_s else float("nan"),
        peak_memory_mb=max((r["peak_memory_mb"] for r in history), default=float("nan")),
        params=count_parameters(model),
        epochs_completed=len(history),
        history=history,
    )
