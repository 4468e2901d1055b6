"""The paper's reporting convention: TensorBoard's smoothed test accuracy (Appendix F, factor 0.9)."""

import math

import pytest

from gmbench.metrics import accuracy_summary, tensorboard_smoothed


def debiased_ema(values, weight):
    """Closed form of TensorBoard's smoothing: a weighted mean of the first t values with
    weights (1 - w) w^(t - k), divided by their sum 1 - w^t."""
    out = []
    for t in range(1, len(values) + 1):
        weights = [(1 - weight) * weight ** (t - k) for k in range(1, t + 1)]
        out.append(sum(w * v for w, v in zip(weights, values[:t])) / (1 - weight**t))
    return out


ACCURACIES = [0.42, 0.61, 0.70, 0.74, 0.73, 0.79, 0.81, 0.80, 0.84, 0.83, 0.85, 0.86]


def test_smoothed_curve_equals_the_debiased_ema_formula():
    assert tensorboard_smoothed(ACCURACIES) == pytest.approx(debiased_ema(ACCURACIES, 0.9), abs=1e-15)
    assert tensorboard_smoothed(ACCURACIES, 0.6) == pytest.approx(debiased_ema(ACCURACIES, 0.6), abs=1e-15)


def test_two_epochs_by_hand():
    # s1 = 0.05 -> 0.05 / 0.1 = 0.5; s2 = 0.9 * 0.05 + 0.1 * 1.0 = 0.145 -> 0.145 / 0.19.
    assert tensorboard_smoothed([0.5, 1.0]) == pytest.approx([0.5, 0.145 / 0.19], abs=1e-15)


def test_first_point_is_unbiased_and_a_constant_curve_is_unchanged():
    assert tensorboard_smoothed([0.7, 0.2])[0] == pytest.approx(0.7)
    assert tensorboard_smoothed([0.9] * 5) == [0.9] * 5
    assert tensorboard_smoothed([]) == []


def test_smoothed_value_lags_a_rising_curve():
    smoothed = tensorboard_smoothed(ACCURACIES)
    assert smoothed[-1] < ACCURACIES[-1]
    assert smoothed[-1] == pytest.approx(debiased_ema(ACCURACIES, 0.9)[-1])


def test_non_finite_values_pass_through_without_entering_the_average():
    smoothed = tensorboard_smoothed([0.5, float("nan"), 1.0])
    assert math.isnan(smoothed[1])
    assert smoothed[2] == pytest.approx(debiased_ema([0.5, 1.0], 0.9)[1])


def test_accuracy_summary_is_the_last_smoothed_point():
    assert accuracy_summary(ACCURACIES)["smoothed_test_accuracy"] == pytest.approx(debiased_ema(ACCURACIES, 0.9)[-1])
    assert math.isnan(accuracy_summary([])["smoothed_test_accuracy"])


def test_bad_weight_is_rejected():
    with pytest.raises(ValueError):
        tensorboard_smoothed([0.1], weight=1.0)


def test_a_training_cell_records_the_smoothed_accuracy_of_its_epoch_log(tmp_path):
    import json
    import textwrap

    import pandas as pd

    from gmbench.run.cell import RunOptions
    from gmbench.run.folder import cell_dir
    from gmbench.run.results import RESULTS_CSV
    from gmbench.run.suite_runner import run_suite
    from gmbench.suite import parse_suite

    suite = parse_suite(textwrap.dedent("""\
        name: smoothed
        plugins: [runner_plugins]
        cell: {dataset: test_blobs, model: test_meanpool, input: points, n_gaussians: 8, training: {epochs: 4, batch_size: 10}}
        matrix: {seed: [0]}
        """), "smoothed.yaml")
    run_suite(suite, tmp_path / "run", RunOptions(), progress=False)
    folder = cell_dir(tmp_path / "run", suite.cells[0].id)
    history = [json.loads(line)["test_accuracy"] for line in (folder / "epochs.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(history) == 4
    assert metrics["smoothed_test_accuracy"] == pytest.approx(debiased_ema(history, 0.9)[-1], abs=1e-12)
    row = pd.read_csv(tmp_path / "run" / RESULTS_CSV).iloc[0]
    assert row["smoothed_test_accuracy"] == pytest.approx(metrics["smoothed_test_accuracy"])
