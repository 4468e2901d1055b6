"""The shared training recipe: logging, scheduler, determinism, resume, divergence."""

import json

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gmbench.errors import GmbenchError
from gmbench.training import (
    CHECKPOINT_FILE,
    EPOCHS_FILE,
    TrainConfig,
    TrainingDiverged,
    recalibrate_normalization,
    seed_everything,
    train,
)
from gmbench.models.pooling import ScaleNormalization

RECORD_KEYS = {
    "epoch", "train_loss", "train_accuracy", "test_accuracy", "lr",
    "epoch_time_s", "samples_per_s", "peak_memory_mb",
}


def blobs(n_per_class=30, seed=0):
    """Three well-separated 2D Gaussian blobs, train and test."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 4.0], [4.0, -2.0], [-4.0, -2.0]])
    def draw():
        x = torch.cat([c + torch.randn(n_per_class, 2, generator=g) for c in centres])
        y = torch.arange(3).repeat_interleave(n_per_class)
        return x, y
    return (*draw(), *draw())


class SmallNet(nn.Module):
    """Batch norm, dropout (global RNG) and a regulariser: everything resume must restore."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.seen_lr = []

    def forward(self, x):
        return torch.log_softmax(self.net(x), -1)

    def regularization_loss(self, learning_rate):
        self.seen_lr.append(learning_rate)
        return 1e-3 * learning_rate * sum((p**2).sum() for p in self.parameters())


def jitter(x, generator):
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def metrics(history):
    return [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "lr")} for r in history]


def fresh_model():
    seed_everything(0)
    return SmallNet()


def test_training_learns_separable_blobs_and_logs_every_epoch(tmp_path):
    data = blobs()
    config = TrainConfig(epochs=15, batch_size=16, lr=1e-2, progress=False)
    result = train(fresh_model(), *data, config, run_dir=tmp_path)
    assert result.test_accuracy >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    lines = (tmp_path / EPOCHS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 16))
    assert all(set(json.loads(line)) == RECORD_KEYS for line in lines)
    assert result.params == 2 * 16 + 16 + 2 * 16 + 16 * 3 + 3
    assert result.epochs_completed == 15
    assert result.peak_memory_mb > 10  # a Python process with torch loaded: tens of MB at least
    assert result.best_test_accuracy >= result.test_accuracy


def test_same_seed_gives_identical_runs_and_another_seed_does_not():
    data = blobs()
    config = TrainConfig(epochs=3, batch_size=8, progress=False)
    a = train(fresh_model(), *data, config, augment=jitter)
    b = train(fresh_model(), *data, config, augment=jitter)
    c = train(fresh_model(), *data, TrainConfig(epochs=3, batch_size=8, progress=False, seed=1), augment=jitter)
    assert metrics(a.history) == metrics(b.history)
    assert metrics(a.history) != metrics(c.history)


class Interrupt(Exception):
    pass


def test_resume_after_kill_is_bit_identical_to_uninterrupted_run(tmp_path):
    data = blobs()
    config = TrainConfig(epochs=2, batch_size=8, progress=False)
    straight_model = fresh_model()
    straight = train(straight_model, *data, config, run_dir=tmp_path / "straight", augment=jitter)

    def kill_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(fresh_model(), *data, config, run_dir=tmp_path / "resumed", augment=jitter,
              on_epoch=kill_after_first_epoch)
    # A new process would build a freshly initialised model; use a different init to be sure.
    seed_everything(123)
    resumed_model = SmallNet()
    resumed = train(resumed_model, *data, config, run_dir=tmp_path / "resumed", augment=jitter)

    assert metrics(resumed.history) == metrics(straight.history)
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "resumed" / EPOCHS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_extends_a_finished_run_to_more_epochs(tmp_path):
    data = blobs()
    train(fresh_model(), *data, TrainConfig(epochs=1, batch_size=8, progress=False), run_dir=tmp_path)
    extended = train(fresh_model(), *data, TrainConfig(epochs=3, batch_size=8, progress=False), run_dir=tmp_path)
    straight = train(fresh_model(), *data, TrainConfig(epochs=3, batch_size=8, progress=False))
    assert metrics(extended.history) == metrics(straight.history)


class ConstantClassifier(nn.Module):
    """Always predicts class 0, so the accuracy plateaus from the first epoch."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3) + 0 * self.unused
        return torch.log_softmax(logits, -1)


def test_one_scheduler_cuts_the_rate_once_per_plateau():
    # patience 1: the third epoch without improvement cuts; cooldown 2 then waits
    # two epochs before counting again, so the next cut comes four epochs later.
    config = TrainConfig(epochs=8, batch_size=10, lr=1e-3, lr_patience=1, lr_cooldown=2, progress=False)
    result = train(ConstantClassifier(), *blobs(5), config)
    lrs = [r["lr"] for r in result.history]
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 4 + [1e-5])



def test_cosine_schedule_anneals_the_rate_over_the_planned_epochs_whatever_the_accuracy():
    import math

    config = TrainConfig(epochs=5, batch_size=10, lr=1e-2, lr_schedule="cosine", progress=False)
    result = train(ConstantClassifier(), *blobs(5), config)
    expected = [1e-2 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-12)


def test_a_cosine_run_resumed_after_a_kill_is_bit_identical(tmp_path):
    data = blobs()
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, lr_schedule="cosine", precise_bn_samples=40, progress=False)
    straight = train(fresh_model(), *data, config, run_dir=tmp_path / "straight")

    def kill_after_second_epoch(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(fresh_model(), *data, config, run_dir=tmp_path / "resumed", on_epoch=kill_after_second_epoch)
    seed_everything(123)
    resumed = train(SmallNet(), *data, config, run_dir=tmp_path / "resumed")
    assert metrics(resumed.history) == metrics(straight.history)


def test_a_checkpoint_written_with_the_plateau_schedule_does_not_resume_a_cosine_cell(tmp_path, caplog):
    data = blobs(5)
    train(fresh_model(), *data, TrainConfig(epochs=1, batch_size=6, progress=False), run_dir=tmp_path)
    train(fresh_model(), *data, TrainConfig(epochs=2, batch_size=6, lr_schedule="cosine", progress=False), run_dir=tmp_path)
    assert "written with lr_schedule='plateau', the cell has lr_schedule='cosine'" in caplog.text

def test_regularization_receives_the_current_learning_rate():
    model = fresh_model()
    train(model, *blobs(5), TrainConfig(epochs=1, batch_size=5, lr=3e-3, progress=False))
    assert model.seen_lr == [3e-3] * 3


class NaNAfterFirstEpoch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.linear(x)
        return torch.log_softmax(out * (float("nan") if self.calls > 2 else 1.0), -1)


def test_nan_loss_raises_training_diverged_after_the_finished_epochs_are_written(tmp_path):
    config = TrainConfig(epochs=5, batch_size=8, progress=False)
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        train(NaNAfterFirstEpoch(), *blobs(5), config, run_dir=tmp_path)  # 15 samples = 2 batches/epoch
    lines = (tmp_path / EPOCHS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert issubclass(TrainingDiverged, GmbenchError)


def test_trailing_single_sample_batch_is_merged_for_batch_norm():
    x, y, tx, ty = blobs(7)  # 21 samples, batch 10 -> 10 + 11, never a batch of one
    result = train(fresh_model(), x, y, tx, ty, TrainConfig(epochs=1, batch_size=10, progress=False))
    assert result.epochs_completed == 1


def test_resuming_with_a_different_batch_size_sets_the_checkpoint_aside(tmp_path, caplog):
    # Damaged and foreign checkpoints: tests/test_checkpoint.py.
    train(fresh_model(), *blobs(5), TrainConfig(epochs=1, batch_size=5, progress=False), run_dir=tmp_path)
    result = train(fresh_model(), *blobs(5), TrainConfig(epochs=2, batch_size=6, progress=False), run_dir=tmp_path)
    assert result.epochs_completed == 2
    assert "written with batch_size=5, the cell has batch_size=6" in caplog.text
    assert (tmp_path / (CHECKPOINT_FILE + ".rejected")).is_file()


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("lr_factor", 1.5), ("grad_clip", 0.0), ("lr_schedule", "step")])
def test_bad_config_values_are_user_errors(field, value):
    with pytest.raises(GmbenchError, match=field):
        TrainConfig(**{field: value})


def test_gradient_clipping_bounds_every_update():
    norms = []

    def record_gradient_norm(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.sqrt(sum((grad**2).sum() for grad in grads)).item())

    handle = register_optimizer_step_pre_hook(record_gradient_norm)
    try:
        train(fresh_model(), *blobs(5), TrainConfig(epochs=1, batch_size=5, grad_clip=1e-3, progress=False))
        clipped = list(norms)
        norms.clear()
        train(fresh_model(), *blobs(5), TrainConfig(epochs=1, batch_size=5, progress=False))
    finally:
        handle.remove()
    assert len(clipped) == 3 and max(clipped) <= 1e-3 * (1 + 1e-5)
    assert min(norms) > 1e-2  # unclipped gradients are far larger, so the clip did act


# ---------------------------------------------------------------- precise batch-norm statistics

def test_recalibration_sets_running_statistics_to_the_mean_of_the_batch_statistics():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 3.0, 0.5]) + 2.0
    norm = nn.BatchNorm1d(3, momentum=0.3)
    model = nn.Sequential(norm).eval()
    model(x)  # eval mode: nothing learned yet; the running values are the initial 0 / 1
    assert recalibrate_normalization(model, x, samples=40, batch_size=8, seed=7, device=torch.device("cpu")) == 1
    index = torch.randperm(40, generator=torch.Generator().manual_seed(7))
    batches = [x[index[start : start + 8]] for start in range(0, 40, 8)]
    torch.testing.assert_close(norm.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert norm.momentum == 0.3 and not model.training  # restored


def test_recalibration_covers_the_gmcn_pooling_traces_and_uses_only_the_requested_samples():
    from gmbench import mixture as gm
    from test_gmcn import random_mixtures

    m = torch.cat([random_mixtures(1, 2, 5, 2, seed=seed) for seed in range(12)])
    pool = ScaleNormalization(2, dims=2, momentum=0.1)
    model = nn.Sequential(pool).train()
    recalibrate_normalization(model, m, samples=6, batch_size=3, seed=0, device=torch.device("cpu"))
    index = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:6]
    traces = [gm.mean_covariance_trace(m[index[start : start + 3]]).mean(0) for start in (0, 3)]
    torch.testing.assert_close(pool.running_trace, torch.stack(traces).mean(0))
    assert pool.momentum == 0.1 and model.training


def test_training_with_precise_statistics_evaluates_with_statistics_of_the_final_weights():
    data = blobs(10)
    precise = train(fresh_model(), *data, TrainConfig(epochs=2, batch_size=6, lr=0.05, precise_bn_samples=30, progress=False))
    model = fresh_model()
    train(model, *data, TrainConfig(epochs=2, batch_size=6, lr=0.05, precise_bn_samples=30, progress=False))
    norm = model.net[1]
    trained_mean, trained_var = norm.running_mean.clone(), norm.running_var.clone()
    recalibrate_normalization(model, data[0], samples=30, batch_size=6, seed=0, device=torch.device("cpu"))
    torch.testing.assert_close(norm.running_mean, trained_mean, rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, trained_var, rtol=0, atol=0)
    # Without it the exponential averages of training remain, which differ.
    plain = fresh_model()
    train(plain, *data, TrainConfig(epochs=2, batch_size=6, lr=0.05, progress=False))
    assert not torch.allclose(plain.net[1].running_mean, trained_mean)
    assert precise.epochs_completed == 2


def test_precise_statistics_need_at_least_two_samples():
    with pytest.raises(GmbenchError, match="precise_bn_samples"):
        TrainConfig(precise_bn_samples=1)


def test_a_checkpoint_from_before_a_training_field_existed_resumes_at_that_fields_default(tmp_path):
    data = blobs(5)
    train(fresh_model(), *data, TrainConfig(epochs=1, batch_size=6, progress=False), run_dir=tmp_path)
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    for field in ("lr_schedule", "precise_bn_samples"):  # fields newer than format_version 2
        del checkpoint["config"][field]
    torch.save(checkpoint, tmp_path / CHECKPOINT_FILE)
    resumed = train(fresh_model(), *data, TrainConfig(epochs=2, batch_size=6, progress=False), run_dir=tmp_path)
    straight = train(fresh_model(), *data, TrainConfig(epochs=2, batch_size=6, progress=False))
    assert not (tmp_path / (CHECKPOINT_FILE + ".rejected")).exists()
    assert metrics(resumed.history) == metrics(straight.history)
