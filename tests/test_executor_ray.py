"""The Ray executor (gmbench.run.executors.ray) on a local 2-CPU Ray instance.

One Ray instance serves the whole module (starting one takes ~10 s); every
test runs a tiny suite (digits or blobs, a mean-pooling model, 2-3 epochs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'gmbench[ray]')")

from gmbench.run import results  # noqa: E402
from gmbench.errors import GmbenchError  # noqa: E402
from gmbench.run.executors import create_executor  # noqa: E402
from gmbench.run.executors.ray import RayExecutor, _check_reachable, _check_shared_folder, start_local_ray  # noqa: E402
from gmbench.run.cell import RunOptions  # noqa: E402
from gmbench.run.folder import cell_dir  # noqa: E402
from gmbench.run.suite_runner import run_suite  # noqa: E402
from gmbench.suite import parse_suite  # noqa: E402

# Columns that measure the machine, not the experiment (see the executor's docstring).
TIMING_COLUMNS = {"train_time_s", "samples_per_s", "peak_memory_mb", "input_time_s", "wall_time_s"}

DIGITS_SUITE = """
name: ray-digits
plugins: [runner_plugins]
cell:
  dataset: digits
  model: test_meanpool
  input: points
  n_points: 16
  train_samples: 60
  test_samples: 30
  training: {epochs: 2, batch_size: 20}
matrix:
  seed: [0, 1]
  model_params.hidden: [8, 16]
"""


def blobs_suite(name: str, model: str, variants: list[dict], epochs: int = 3) -> str:
    """60 training samples in batches of 20: 3 steps per epoch."""
    return f"""
name: {name}
plugins: [runner_plugins, executor_test_plugins]
cell:
  dataset: test_blobs
  model: {model}
  input: points
  n_points: 24
  training: {{epochs: {epochs}, batch_size: 20}}
matrix:
  model_params: {json.dumps(variants)}
"""


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_results_match_the_local_executor(local_ray, tmp_path):
    import torch

    # Ray workers compute with the cells' intra-op thread count (1 here); so does the reference.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        suite = parse_suite(DIGITS_SUITE, "ray-digits.yaml")
        local = run_suite(suite, tmp_path / "local", RunOptions(), progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = run_suite(suite, tmp_path / "ray", RunOptions(), executor=RayExecutor(jobs=2), progress=False)

    assert local.failed == remote.failed == [] and remote.ran == 4
    a = results.load_results(tmp_path / "local").set_index("cell_id").sort_index()
    b = results.load_results(tmp_path / "ray").set_index("cell_id").sort_index()
    assert list(a.index) == list(b.index) == sorted(cell.id for cell in suite.cells)
    columns = [c for c in a.columns if c not in TIMING_COLUMNS]
    assert a[columns].fillna("").equals(b[columns].fillna(""))
    for cell in suite.cells:
        losses = [[r["train_loss"] for r in _epochs(tmp_path / run / "cells" / cell.id)] for run in ("local", "ray")]
        assert losses[0] == losses[1] and len(losses[0]) == 2


def test_killed_worker_is_retried_and_the_cell_resumes_from_its_checkpoint(local_ray, tmp_path):
    never = tmp_path / "never-kill"
    never.touch()  # the marker exists: this cell's model never kills
    variants = [
        {"kill_at_step": 5, "marker": str(tmp_path / "killed-once"), "steps_file": str(tmp_path / "steps-killed")},
        {"kill_at_step": 5, "marker": str(never), "steps_file": str(tmp_path / "steps-reference")},
    ]
    suite = parse_suite(blobs_suite("ray-kill", "test_worker_killing", variants), "ray-kill.yaml")
    summary = run_suite(suite, tmp_path / "run", RunOptions(), executor=RayExecutor(jobs=2, max_retries=2), progress=False)

    assert summary.failed == []
    assert (tmp_path / "killed-once").exists()
    killed, reference = (cell_dir(tmp_path / "run", cell.id) for cell in suite.cells)
    # Epoch 1 (steps 1-3) was checkpointed, step 5 killed the worker; the retry trained
    # epochs 2 and 3 only (6 steps) in a new process instead of starting over.
    pids = (tmp_path / "steps-killed").read_text().split()
    first, second = pids[:5], pids[5:]
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]
    assert len(second) == 6
    # Resuming is bit-identical to the uninterrupted run of the same experiment.
    strip = lambda records: [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "lr")} for r in records]  # noqa: E731
    assert strip(_epochs(killed)) == strip(_epochs(reference))
    assert len(_epochs(killed)) == 3
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (killed, reference)]
    assert metrics[0]["status"] == metrics[1]["status"] == "ok"
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]


@pytest.mark.slow
def test_cell_whose_worker_keeps_dying_is_recorded_failed_and_the_rest_finish(local_ray, tmp_path):
    variants = [{"kill_at_step": 2}, {"kill_at_step": 10_000}]
    suite = parse_suite(blobs_suite("ray-doomed", "test_worker_killing", variants, epochs=1), "ray-doomed.yaml")
    summary = run_suite(suite, tmp_path / "run", RunOptions(), executor=RayExecutor(jobs=2, max_retries=1), progress=False)

    doomed, healthy = (cell.id for cell in suite.cells)
    assert summary.failed == [doomed]
    frame = results.load_results(tmp_path / "run").set_index("cell_id")
    assert frame.loc[doomed, "status"] == "failed"
    assert "died 2 time(s)" in frame.loc[doomed, "error"]
    assert frame.loc[healthy, "status"] == "ok"
    assert frame.loc[healthy, "epochs"] == 1


def test_restarted_driver_skips_finished_cells_and_resumes_the_interrupted_one(local_ray, tmp_path):
    suite = parse_suite(blobs_suite("ray-restart", "test_meanpool", [{"hidden": 8}, {"hidden": 12}]), "ray-restart.yaml")
    run_dir = tmp_path / "run"
    run_suite(suite, run_dir, RunOptions(), executor=RayExecutor(jobs=2), progress=False)
    finished, interrupted = (cell_dir(run_dir, cell.id) for cell in suite.cells)
    before = json.loads((interrupted / "metrics.json").read_text())
    # As if the driver died while the second cell was in its last epoch: its checkpoint
    # holds epochs 1-3 but it has no metrics yet.
    (interrupted / "metrics.json").unlink()
    finished_mtime = (finished / "metrics.json").stat().st_mtime

    summary = run_suite(suite, run_dir, RunOptions(), executor=RayExecutor(jobs=2), progress=False)

    assert (summary.skipped, summary.ran, summary.failed) == (1, 1, [])
    assert (finished / "metrics.json").stat().st_mtime == finished_mtime
    after = json.loads((interrupted / "metrics.json").read_text())
    assert after["status"] == "ok" and after["epochs"] == 3
    assert after["test_accuracy"] == before["test_accuracy"]
    assert after["train_time_s"] == pytest.approx(before["train_time_s"])  # no epoch re-ran


def test_cli_runs_a_suite_on_ray(local_ray, tmp_path, capsys):
    from gmbench.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(blobs_suite("ray-cli", "test_meanpool", [{"hidden": 8}], epochs=1))
    code = main(["run", str(path), "--executor", "ray", "--jobs", "2", "--out", str(tmp_path / "run"), "--no-report", "--no-progress"])
    assert code == 0
    frame = results.load_results(tmp_path / "run")
    assert list(frame["status"]) == ["ok"]
    assert "1 cells: 0 already done, 1 run, 0 failed" in capsys.readouterr().out


def test_run_folder_invisible_to_workers_is_a_clear_error(local_ray, tmp_path):
    with pytest.raises(GmbenchError, match="shared by all nodes"):
        _check_shared_folder(tmp_path / "not-there")


def test_unreachable_cluster_address_is_a_clear_error():
    # Checked before ray.init, which would wait for minutes on an address nobody listens on.
    with pytest.raises(GmbenchError, match="cannot reach the Ray cluster at --address 127.0.0.1:9"):
        _check_reachable("127.0.0.1:9")
    _check_reachable("auto")  # resolved by Ray itself


def test_cells_ask_ray_for_their_resources():
    gpu = RunOptions(device="cuda")
    assert RayExecutor(cpus_per_cell=2).resources(RunOptions()).ray_options() == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert RayExecutor().resources(gpu).gpus == 1.0
    assert RayExecutor(gpus_per_cell=0.5, memory_gb_per_cell=4).resources(gpu).ray_options() == {
        "num_cpus": 1.0, "num_gpus": 0.5, "memory": 4 * 2**30,
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({"jobs": 0}, "--jobs"),
        ({"cpus_per_cell": 0}, "--cpus-per-cell"),
        ({"gpus_per_cell": -1}, "--gpus-per-cell"),
        ({"memory_gb_per_cell": 0}, "--memory-per-cell"),
        ({"max_retries": -1}, "--max-retries"),
    ],
)
def test_bad_executor_options_are_user_errors(options, message):
    with pytest.raises(GmbenchError, match=message):
        create_executor("ray", **options)


def _epochs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "epochs.jsonl").read_text().splitlines()]
