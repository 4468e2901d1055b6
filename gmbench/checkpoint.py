"""Training checkpoints: what ``checkpoint.pt`` holds and how a run resumes from it.

A checkpoint is a dict of plain data (loaded with ``torch.load(weights_only=True)``,
so it can never run code)::

    model, optimizer, scheduler   state dicts
    rng                           every generator's state (:func:`rng_state`)
    history                       the epoch records so far
    config                        the TrainConfig as a dict

:func:`resume` restores all of it, or -- when the file does not fit the cell
(unreadable, truncated, a list, keys missing, another model's parameters, other
shapes, another ``batch_size``/``lr``/... than the cell's) -- moves it aside to
``checkpoint.pt.rejected`` (kept, never deleted), logs one warning line naming
the file and why, and puts the model, the optimiser and the scheduler back as
they were before the attempt; the trainer then seeds every generator again, so
the run is exactly a fresh one.  So a
bad checkpoint costs the epochs it held, never a permanent failure of the cell.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gmbench import io

log = logging.getLogger(__name__)

REJECTED_SUFFIX = ".rejected"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "history", "config")
# Fields that must match between a checkpoint and the config resuming it:
# changing any of them would make the resumed run a different experiment.
RESUME_FIELDS = (
    "batch_size", "lr", "seed", "lr_factor", "lr_patience", "lr_cooldown", "grad_clip", "precise_bn_samples", "lr_schedule",
)
# Keys _result and the epoch loop read from every history record.
HISTORY_KEYS = ("epoch", "test_accuracy", "epoch_time_s", "samples_per_s", "peak_memory_mb")


class CheckpointMismatch(Exception):
    """Why a checkpoint cannot resume this cell (the message is the reason, one line)."""


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Python's, NumPy's, PyTorch's (CPU and CUDA) and ``generator``'s states as plain data."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        # NumPy's state as plain tensors/ints so that the checkpoint loads with weights_only.
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python[-1], tuple(python[:-1]), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _shape(value: Any) -> tuple | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _check_model(saved: Any, model: nn.Module) -> None:
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"its 'model' is a {type(saved).__name__}, not a state dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(map(str, unexpected[:3]))}")
        raise CheckpointMismatch(f"it holds another model's parameters ({'; '.join(parts)})")
    for key, tensor in expected.items():
        if not isinstance(saved[key], Tensor):
            raise CheckpointMismatch(f"parameter '{key}' is a {type(saved[key]).__name__} there, not a tensor")
        if _shape(saved[key]) != tuple(tensor.shape):
            raise CheckpointMismatch(f"parameter '{key}' has shape {_shape(saved[key])} there, {tuple(tensor.shape)} in this model")


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointMismatch("its 'optimizer' is not an optimiser state dict")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] if isinstance(group, dict) for i in group.get("params", [])]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or len(saved_ids) != len(params):
        raise CheckpointMismatch(f"its optimiser state is for {len(saved_ids)} parameter tensors, this model has {len(params)}")
    index = {saved_id: param for saved_id, param in zip(saved_ids, params)}
    for saved_id, state in saved["state"].items():
        if saved_id not in index or not isinstance(state, dict):
            raise CheckpointMismatch(f"its optimiser state refers to unknown parameter {saved_id!r}")
        for name, value in state.items():
            # Adam's moments have their parameter's shape; the step count is a scalar.
            if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(index[saved_id].shape):
                raise CheckpointMismatch(f"optimiser '{name}' of parameter {saved_id} has shape {tuple(value.shape)}, "
                                         f"the parameter {tuple(index[saved_id].shape)}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return f"list of {len(value)}"
    return type(value).__name__


def _check_scheduler(saved: Any, scheduler) -> None:
    expected = scheduler.state_dict()
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"its 'scheduler' is a {type(saved).__name__}, not a state dict")
    # Exactly the scheduler's keys: load_state_dict updates its __dict__ with whatever is there.
    if set(saved) != set(expected):
        raise CheckpointMismatch(f"its scheduler state has the keys {sorted(map(str, saved))[:4]}..., not this scheduler's")
    for key, value in expected.items():
        if _kind(saved[key]) != _kind(value):
            raise CheckpointMismatch(f"its scheduler state has a {_kind(saved[key])} for '{key}', expected a {_kind(value)}")


def _check_history(saved: Any) -> None:
    if not isinstance(saved, list) or not all(isinstance(r, dict) for r in saved):
        raise CheckpointMismatch("its 'history' is not a list of epoch records")
    for number, record in enumerate(saved, 1):
        if record.get("epoch") != number or not all(isinstance(record.get(k), (int, float)) for k in HISTORY_KEYS):
            raise CheckpointMismatch(f"its history record {number} is malformed")


def check_fits(checkpoint: Any, config, model: nn.Module, optimizer, scheduler) -> None:
    """Raise :class:`CheckpointMismatch` unless ``checkpoint`` can resume this cell (reads only)."""
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatch(f"it holds a {type(checkpoint).__name__}, not a gmbench checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointMismatch(f"it lacks {', '.join(repr(k) for k in missing)}")
    saved = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
    # A field added to TrainConfig after a checkpoint was written had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    for field in RESUME_FIELDS:
        written = saved.get(field, defaults.get(field))
        if written != getattr(config, field):
            raise CheckpointMismatch(f"it was written with {field}={written!r}, the cell has "
                                     f"{field}={getattr(config, field)!r}")
    _check_model(checkpoint["model"], model)
    _check_optimizer(checkpoint["optimizer"], optimizer)
    _check_scheduler(checkpoint["scheduler"], scheduler)
    if not isinstance(checkpoint["rng"], dict):
        raise CheckpointMismatch("its 'rng' is not a dict of generator states")
    _check_history(checkpoint["history"])


def set_aside(path: Path) -> Path | None:
    """Move ``path`` to ``<path>.rejected`` (``.rejected.2``, ... when taken); ``None`` if it cannot be moved."""
    target = path.with_name(path.name + REJECTED_SUFFIX)
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{REJECTED_SUFFIX}.{number}")
    try:
        os.replace(path, target)
    except OSError:
        return None
    return target


def resume(path: Path, config, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
           device: torch.device, is_writer: bool = True) -> list[dict] | None:
    """Restore the run from the checkpoint at ``path`` and return its history; ``None`` when the
    file does not fit the cell (see the module docstring: set aside, one warning, model,
    optimiser and scheduler untouched; the generators may have changed: seed them again).

    ``is_writer``: only the writing rank of a data-parallel run moves the file and warns.
    """
    initial_model = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    initial_optimizer, initial_scheduler = optimizer.state_dict(), scheduler.state_dict()
    try:
        checkpoint = io.load_torch(path)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - truncated, garbage, a pickle payload, unreadable
        checkpoint, reason = None, _unreadable(error)
    else:
        reason = _restore(checkpoint, config, model, optimizer, scheduler, generator, device)
    if reason is None:
        return list(checkpoint["history"])
    # Back to the state before the attempt (a failed restore may have changed part of it);
    # the caller seeds the generators again.
    model.load_state_dict(initial_model)
    optimizer.load_state_dict(initial_optimizer)
    scheduler.load_state_dict(initial_scheduler)
    if is_writer:
        reason = " ".join(reason.split())[:300]
        moved = set_aside(path)
        where = f"moved it to {moved.name}" if moved is not None else "it could not be moved and will be overwritten"
        log.warning("checkpoint %s does not fit this cell (%s); %s and training the cell from scratch", path, reason, where)
    return None


def _unreadable(error: Exception) -> str:
    if isinstance(error, pickle.UnpicklingError):
        # torch's own text suggests weights_only=False, which would run the file's code.
        return "cannot be read: corrupt, or it holds Python objects, which are never loaded"
    detail = " ".join(str(error).split())[:100]
    return f"cannot be read: truncated, corrupt or not a checkpoint ({type(error).__name__}{': ' + detail if detail else ''})"


def _restore(checkpoint, config, model, optimizer, scheduler, generator, device) -> str | None:
    """Check ``checkpoint`` and load it into the run; ``None``, or why it does not fit."""
    try:
        check_fits(checkpoint, config, model, optimizer, scheduler)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], generator, device)
    except CheckpointMismatch as error:
        return str(error)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # the machine, not the file
    except Exception as error:  # noqa: BLE001 - a state its object refuses (e.g. a corrupt RNG state)
        return f"restoring it failed: {type(error).__name__}: {error}"
    return None
