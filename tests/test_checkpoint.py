"""A checkpoint that does not fit its cell is set aside with one warning and the cell trains from scratch."""

from __future__ import annotations

import io as bytes_io
import json
import logging
import subprocess
import sys

import pandas as pd
import pytest
import torch
from suite_texts import TESTS, blobs_suite, subprocess_env

from gmbench import io
from gmbench.checkpoint import REJECTED_SUFFIX
from gmbench.cli import main
from gmbench.training import CHECKPOINT_FILE, EPOCHS_FILE, TrainConfig, train
from test_training import ConstantClassifier, blobs, fresh_model, metrics

CONFIG = dict(batch_size=8, progress=False)


class PlantsAFile:
    """A pickle payload: loading it without weights_only would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def saved(payload) -> bytes:
    buffer = bytes_io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory) -> bytes:
    """A real checkpoint after epoch 1 of the cell the tests resume."""
    folder = tmp_path_factory.mktemp("source")
    train(fresh_model(), *blobs(5), TrainConfig(epochs=1, **CONFIG), run_dir=folder)
    return (folder / CHECKPOINT_FILE).read_bytes()


@pytest.fixture(scope="module")
def straight():
    """The same cell trained from scratch without any checkpoint."""
    model = fresh_model()
    result = train(model, *blobs(5), TrainConfig(epochs=2, **CONFIG))
    return metrics(result.history), model.state_dict()


def edited(valid: bytes, edit) -> bytes:
    checkpoint = torch.load(bytes_io.BytesIO(valid), weights_only=True)
    edit(checkpoint)
    return saved(checkpoint)


def another_models_checkpoint(tmp_path) -> bytes:
    folder = tmp_path / "other-model"
    train(ConstantClassifier(), *blobs(5), TrainConfig(epochs=1, **CONFIG), run_dir=folder)
    return (folder / CHECKPOINT_FILE).read_bytes()


def set_item(path, value):
    def edit(checkpoint):
        target = checkpoint
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


CASES = {
    "garbage bytes": lambda valid, tmp: b"not a checkpoint",
    "truncated file": lambda valid, tmp: valid[: len(valid) // 2],
    "empty file": lambda valid, tmp: b"",
    "a list": lambda valid, tmp: saved([1, 2, 3]),
    "a pickle payload": lambda valid, tmp: saved({"model": PlantsAFile(tmp / "planted")}),
    "dict without its RNG state": lambda valid, tmp: edited(valid, lambda c: c.pop("rng")),
    "parameters of other shapes": lambda valid, tmp: edited(valid, set_item(["model", "net.0.weight"], torch.zeros(32, 2))),
    "another model's checkpoint": lambda valid, tmp: another_models_checkpoint(tmp),
    "another batch size": lambda valid, tmp: edited(valid, set_item(["config", "batch_size"], 5)),
    "optimiser moments of other shapes": lambda valid, tmp: edited(valid, set_item(["optimizer", "state", 0, "exp_avg"], torch.zeros(3))),
    "scheduler state of something else": lambda valid, tmp: edited(valid, set_item(["scheduler"], {"optimizer": 1})),
    "malformed history": lambda valid, tmp: edited(valid, set_item(["history"], [{"epoch": 1}])),
    # Model, optimiser, scheduler, torch and generator states load; NumPy's then fails:
    # everything already restored must be undone for a true fresh start.
    "corrupt NumPy RNG state": lambda valid, tmp: edited(valid, set_item(["rng", "numpy", "keys"], torch.zeros(5, dtype=torch.int64))),
    "corrupt torch RNG state": lambda valid, tmp: edited(valid, set_item(["rng", "torch"], torch.zeros(3, dtype=torch.uint8))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_does_not_fit_is_set_aside_and_the_cell_trains_from_scratch(
        case, tmp_path, valid_checkpoint, straight, caplog):
    cell = tmp_path / "cell"
    cell.mkdir()
    planted = CASES[case](valid_checkpoint, tmp_path)
    (cell / CHECKPOINT_FILE).write_bytes(planted)
    (cell / EPOCHS_FILE).write_text('{"epoch": 1}\n')
    model = fresh_model()
    with caplog.at_level(logging.WARNING):
        result = train(model, *blobs(5), TrainConfig(epochs=2, **CONFIG), run_dir=cell)

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "\n" not in message and str(cell / CHECKPOINT_FILE) in message
    assert f"moved it to {CHECKPOINT_FILE}{REJECTED_SUFFIX}" in message and "training the cell from scratch" in message
    assert (cell / f"{CHECKPOINT_FILE}{REJECTED_SUFFIX}").read_bytes() == planted  # kept, not deleted
    assert not (tmp_path / "planted").exists()  # nothing in the file ran
    # Exactly the run without any checkpoint.
    expected_metrics, expected_state = straight
    assert metrics(result.history) == expected_metrics
    for name, tensor in expected_state.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert [json.loads(line)["epoch"] for line in (cell / EPOCHS_FILE).read_text().splitlines()] == [1, 2]
    # The new checkpoint is good: a longer run resumes from it without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        longer = train(fresh_model(), *blobs(5), TrainConfig(epochs=3, **CONFIG), run_dir=cell)
    assert longer.epochs_completed == 3 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_second_rejection_keeps_the_first_rejected_file(tmp_path, caplog):
    for attempt in (b"first", b"second"):
        (tmp_path / CHECKPOINT_FILE).write_bytes(attempt)
        train(fresh_model(), *blobs(5), TrainConfig(epochs=1, **CONFIG), run_dir=tmp_path)
        (tmp_path / CHECKPOINT_FILE).unlink()
    assert (tmp_path / f"{CHECKPOINT_FILE}{REJECTED_SUFFIX}").read_bytes() == b"first"
    assert (tmp_path / f"{CHECKPOINT_FILE}{REJECTED_SUFFIX}.2").read_bytes() == b"second"


def test_a_valid_checkpoint_still_resumes_without_a_warning(tmp_path, valid_checkpoint, straight, caplog):
    (tmp_path / CHECKPOINT_FILE).write_bytes(valid_checkpoint)
    with caplog.at_level(logging.WARNING):
        result = train(fresh_model(), *blobs(5), TrainConfig(epochs=2, **CONFIG), run_dir=tmp_path)
    assert not caplog.records and metrics(result.history) == straight[0]
    assert not (tmp_path / f"{CHECKPOINT_FILE}{REJECTED_SUFFIX}").exists()


SUITE = blobs_suite("ckpt", epochs=2, batch_size=10)


@pytest.mark.slow
def test_gmbench_run_with_a_bad_checkpoint_warns_once_and_the_cell_finishes_ok(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    suite = tmp_path / "ckpt.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "run"
    assert main(["run", str(suite), "--out", str(out), "--no-report", "--no-progress"]) == 0
    (cell,) = (out / "cells").iterdir()
    (cell / "metrics.json").unlink()  # as if the run had been killed in epoch 2
    (cell / CHECKPOINT_FILE).write_bytes(saved([1, 2, 3]))
    env = subprocess_env()
    rerun = subprocess.run([sys.executable, "-m", "gmbench", "run", str(suite), "--out", str(out), "--no-report",
                            "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    lines = [line for line in rerun.stderr.splitlines() if CHECKPOINT_FILE in line]
    assert len(lines) == 1 and str(cell / CHECKPOINT_FILE) in lines[0] and "from scratch" in lines[0], rerun.stderr
    frame = pd.read_csv(out / "results.csv")
    assert list(frame["status"]) == ["ok"] and list(frame["epochs"]) == [2]
    assert io.load_torch(cell / CHECKPOINT_FILE)["history"][-1]["epoch"] == 2
