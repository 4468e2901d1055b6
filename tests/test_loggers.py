"""Experiment tracking: what the tensorboard and mlflow loggers wrote, read back with
TensorBoard's EventAccumulator and MLflow's MlflowClient, against the run folder's files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gmbench import plugins
from gmbench.cli import main
from gmbench.errors import SuiteError
from gmbench.loggers import CellLoggers, LoggerChoice, choose
from gmbench.loggers.records import flatten, param_text
from gmbench.run.folder import LOCK_FILE

TRACKED_SUITE = """\
name: blobs-tracked
plugins: [runner_plugins]
{loggers}
cell:
  dataset: test_blobs
  model: test_meanpool
  input: points
  n_gaussians: 8
  training: {{epochs: 3, batch_size: 10}}
matrix:
  seed: [0, 1]
"""

# float32 in the event files
TENSORBOARD_TOLERANCE = 1e-6


def _tensorboard():
    return pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard package is not installed (pip install 'gmbench[tensorboard]')",
    )


def _mlflow():
    return pytest.importorskip("mlflow.tracking", reason="MLflow is not installed (pip install 'gmbench[mlflow]')")


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _write_suite(tmp_path: Path, loggers: str = "", text: str = TRACKED_SUITE) -> Path:
    suite = tmp_path / "suite.yaml"
    suite.write_text(text.format(loggers=loggers))
    return suite


def _epochs(cell_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (cell_dir / "epochs.jsonl").read_text().splitlines()]


def _cell_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "cells").iterdir() if p.is_dir())


def _accumulator(folder: Path):
    event_accumulator = _tensorboard()
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- tensorboard


def test_tensorboard_scalars_and_hparams_are_those_of_the_run_folder(tmp_path, capsys):
    _tensorboard()
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    code, printed, _ = _run(["run", str(_write_suite(tmp_path, "loggers: [tensorboard]")), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, printed
    cells = _cell_dirs(out)
    assert len(cells) == 2
    for cell in cells:
        epochs = _epochs(cell)
        metrics = json.loads((cell / "metrics.json").read_text())
        accumulator = _accumulator(out / "tensorboard" / cell.name)
        for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "epoch_time_s", "samples_per_s", "peak_memory_mb"):
            logged = [(event.step, event.value) for event in accumulator.Scalars(key)]
            assert [step for step, _ in logged] == [record["epoch"] for record in epochs] == [1, 2, 3]
            assert [value for _, value in logged] == pytest.approx([record[key] for record in epochs], rel=TENSORBOARD_TOLERANCE)
        for key in ("test_accuracy", "smoothed_test_accuracy", "train_time_s", "params"):
            (final,) = accumulator.Scalars(f"final/{key}")
            assert (final.step, final.value) == (3, pytest.approx(metrics[key], rel=TENSORBOARD_TOLERANCE))
        content = accumulator.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        config = json.loads((cell / "config.json").read_text())
        assert start.hparams["training.epochs"].number_value == config["training"]["epochs"] == 3
        assert start.hparams["model"].string_value == "test_meanpool"
        assert start.hparams["seed"].number_value == config["seed"]
        end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
        assert end.status == 1  # STATUS_SUCCESS
    # The report's figures, as images of a run of their own.
    report = _accumulator(out / "tensorboard" / "report")
    figures = sorted(p.stem for p in (out / "report" / "figures").glob("*.png"))
    assert figures and sorted(tag.removeprefix("figures/") for tag in report.Tags()["images"]) == figures


def test_the_jsonl_results_are_written_the_same_with_and_without_a_logger(tmp_path, capsys):
    _tensorboard()
    plain, tracked = tmp_path / "plain", tmp_path / "tracked"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert _run(["run", str(_write_suite(tmp_path / "a")), "--out", str(plain), "--no-progress", "--no-report"], capsys)[0] == 0
    assert _run(["run", str(_write_suite(tmp_path / "b")), "--out", str(tracked), "--no-progress", "--no-report", "--logger", "tensorboard"], capsys)[0] == 0
    assert [p.name for p in _cell_dirs(plain)] == [p.name for p in _cell_dirs(tracked)]
    drop = ("epoch_time_s", "samples_per_s", "peak_memory_mb")
    for a, b in zip(_cell_dirs(plain), _cell_dirs(tracked)):
        assert [{k: v for k, v in r.items() if k not in drop} for r in _epochs(a)] == [{k: v for k, v in r.items() if k not in drop} for r in _epochs(b)]
    assert not (plain / "tensorboard").exists() and (tracked / "tensorboard").is_dir()


def _first_cell_of_a_new_run(tmp_path: Path):
    """The suite of ``_write_suite``, its first cell, a new run folder (``run.json`` written, the
    suite's plugins loaded) and the cell's folder in it, for tests that call ``run_cell`` directly."""
    from gmbench.suite import load_suite

    suite = load_suite(_write_suite(tmp_path))
    cell = suite.cells[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(suite.to_json()))
    plugins.load_modules(suite.plugins)
    return suite, cell, run_dir, run_dir / "cells" / cell.id


class _Interrupt(BaseException):
    """Stands for Ctrl-C after an epoch (not an Exception: run_cell records those as failures)."""


def _interrupted_then_resumed(tmp_path: Path, choices: tuple[LoggerChoice, ...], stop_after: int) -> Path:
    """Run one cell's first ``stop_after`` epochs, stop the process's work there, run it again."""
    from gmbench.run.cell import RunOptions, run_cell

    suite, cell, _, cell_dir = _first_cell_of_a_new_run(tmp_path)
    options = RunOptions(plugins=tuple(suite.plugins), loggers=choices)

    def stop(record: dict) -> None:
        if record["epoch"] == stop_after:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_cell(cell.config, cell_dir, options, on_epoch=stop)
    assert [r["epoch"] for r in _epochs(cell_dir)] == list(range(1, stop_after + 1))
    metrics = run_cell(cell.config, cell_dir, options)
    assert metrics["status"] == "ok" and [r["epoch"] for r in _epochs(cell_dir)] == [1, 2, 3]
    return cell_dir


def test_a_resumed_cell_continues_its_tensorboard_log_without_duplicate_epochs(tmp_path):
    cell_dir = _interrupted_then_resumed(tmp_path, (LoggerChoice("tensorboard"),), stop_after=2)
    folder = cell_dir.parent.parent / "tensorboard" / cell_dir.name
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per process, the second purging
    accumulator = _accumulator(folder)
    epochs = _epochs(cell_dir)
    for key in ("train_loss", "test_accuracy", "lr"):
        logged = accumulator.Scalars(key)
        assert [event.step for event in logged] == [1, 2, 3]
        assert [event.value for event in logged] == pytest.approx([r[key] for r in epochs], rel=TENSORBOARD_TOLERANCE)
    assert [event.step for event in accumulator.Scalars("final/test_accuracy")] == [3]


# --------------------------------------------------------------------------- mlflow


def _mlflow_runs(client, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def _check_mlflow_cell(client, run, cell: Path) -> None:
    epochs = _epochs(cell)
    metrics = json.loads((cell / "metrics.json").read_text())
    config = json.loads((cell / "config.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.tags["gmbench.cell_id"] == cell.name
    assert run.data.params == {key: param_text(value) for key, value in flatten(config).items()}
    assert run.data.params["diagnostics"] == "false" and run.data.params["training.epochs"] == "3"
    for key in ("train_loss", "train_accuracy", "test_accuracy", "lr", "epoch_time_s", "samples_per_s", "peak_memory_mb"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["epoch"], pytest.approx(r[key])) for r in epochs]
    assert run.data.metrics["final/smoothed_test_accuracy"] == pytest.approx(metrics["smoothed_test_accuracy"])
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"config.json", "environment.json", "metrics.json"}


def test_mlflow_default_store_is_sqlite_in_the_run_folder_with_one_run_per_cell(tmp_path, capsys, no_tracking_env):
    tracking = _mlflow()
    out = tmp_path / "run"
    code, printed, _ = _run(["run", str(_write_suite(tmp_path)), "--out", str(out), "--no-progress", "--logger", "mlflow"], capsys)
    assert code == 0, printed
    assert (out / "mlflow.db").is_file()
    client = tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = _mlflow_runs(client, "blobs-tracked")
    cells = _cell_dirs(out)
    recorded = {json.loads((cell / "mlflow.json").read_text())["run_id"] for cell in cells}
    assert {run.info.run_id for run in runs.values()} == recorded | {runs["report"].info.run_id}  # one run per cell + the report
    for cell in cells:
        run = client.get_run(json.loads((cell / "mlflow.json").read_text())["run_id"])
        _check_mlflow_cell(client, run, cell)
    report = runs["report"]
    logged = {f.path for f in client.list_artifacts(report.info.run_id, "report/figures")}
    assert logged and logged == {f"report/figures/{p.name}" for p in (out / "report" / "figures").iterdir()}


def test_mlflow_file_store_from_the_command_line_and_a_resumed_cell_keeps_its_run(tmp_path, capsys, no_tracking_env, monkeypatch):
    tracking = _mlflow()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store otherwise
    store = (tmp_path / "mlruns").as_uri()
    (choice,) = choose((), ["mlflow"], store)
    cell_dir = _interrupted_then_resumed(tmp_path, (choice,), stop_after=1)
    record = json.loads((cell_dir / "mlflow.json").read_text())
    client = tracking.MlflowClient(tracking_uri=store)
    runs = _mlflow_runs(client, "blobs-tracked")
    assert list(runs) == [cell_dir.name + " test_meanpool"]  # the second process continued the first one's run
    (run,) = runs.values()
    assert run.info.run_id == record["run_id"] and record["tracking_uri"] == store
    _check_mlflow_cell(client, run, cell_dir)


# --------------------------------------------------------------------------- choices and errors


@pytest.mark.parametrize(("logger", "package"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_stops_the_run_with_one_line_and_the_install_command(tmp_path, capsys, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    out = tmp_path / "run"
    code, _, err = _run(["run", str(_write_suite(tmp_path)), "--out", str(out), "--no-progress", "--logger", logger], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and f"pip install 'gmbench[{logger}]'" in err
    assert not out.exists()  # before any cell


def test_suite_loggers_are_checked_against_the_logger_plugins_with_their_line(tmp_path):
    from gmbench.suite import load_suite

    with pytest.raises(SuiteError, match=r"suite.yaml:3: unknown logger plugin 'tensorbored'; available: mlflow, tensorboard"):
        load_suite(_write_suite(tmp_path, "loggers: [tensorbored]"))
    with pytest.raises(SuiteError, match=r"suite.yaml:4: loggers.mlflow.tracking_url: logger plugin 'mlflow' has no parameter 'tracking_url'"):
        load_suite(_write_suite(tmp_path, "loggers:\n  - mlflow: {tracking_url: x}"))
    suite = load_suite(_write_suite(tmp_path, "loggers:\n  - tensorboard\n  - mlflow: {experiment: study}"))
    assert suite.loggers == [{"name": "tensorboard", "params": {}}, {"name": "mlflow", "params": {"experiment": "study"}}]
    assert suite.to_json()["loggers"] == suite.loggers


def test_command_line_loggers_join_the_suites_and_mlflow_uri_needs_an_mlflow_logger():
    _mlflow()
    assert choose([{"name": "mlflow", "params": {"experiment": "x"}}], ["mlflow"], "sqlite:///t.db") == (
        LoggerChoice("mlflow", {"experiment": "x", "tracking_uri": "sqlite:///t.db"}),
    )
    with pytest.raises(Exception, match="add --logger mlflow"):
        choose((), [], "sqlite:///t.db")
    with pytest.raises(Exception, match="--logger wandb: unknown logger; available: mlflow, tensorboard"):
        choose((), ["wandb"])


def test_a_logger_that_fails_is_warned_about_and_the_cell_goes_on(tmp_path, caplog):
    class Broken:
        name = "broken"

        def start_cell(self, cell):
            pass

        def log_epoch(self, record):
            raise ConnectionError("tracking server gone")

        def resume(self, history):
            pass

    tracking = CellLoggers((), {"task": "train"}, tmp_path / "cells" / "c")
    tracking.active = [Broken()]
    seen = []
    callback = tracking.epoch_callback(seen.append)
    callback({"epoch": 1, "train_loss": 1.0})
    callback({"epoch": 2, "train_loss": 0.5})
    assert [r["epoch"] for r in seen] == [1, 2] and tracking.active == []
    assert sum("logger broken failed in log_epoch" in m for m in caplog.messages) == 1


def test_every_builtin_logger_satisfies_the_logger_contract():
    from gmbench import plugin_contracts

    for name in ("tensorboard", "mlflow"):
        assert plugin_contracts.problems("logger", plugins.get("logger", name).cls) == []


DIAGNOSED_SUITE = """\
name: digits-diagnosed
loggers: [tensorboard]
cell:
  dataset: digits
  n_gaussians: 4
  train_samples: 42
  test_samples: 21
  model: gmcn
  model_params: {{layout: "1/{{n_gaussians}}->4/2->{{num_classes}}", kernel_gaussians: 2}}
  training: {{epochs: 1, batch_size: 21}}
  diagnostics: true
  diagnostics_samples: 2
  diagnostics_points: 500
"""


def test_per_layer_fitting_rmse_is_logged_when_diagnostics_are_on(tmp_path, capsys, no_tracking_env, monkeypatch):
    import pandas as pd

    _tensorboard()
    tracking = _mlflow()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    suite = _write_suite(tmp_path, text=DIAGNOSED_SUITE)  # loggers: [tensorboard] in the suite, mlflow from the command line
    code, printed, _ = _run(
        ["run", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-report", "--logger", "mlflow", "--mlflow-uri", store],
        capsys,
    )
    assert code == 0, printed
    (cell,) = _cell_dirs(out)
    frame = pd.read_csv(cell / "diagnostics.csv")
    assert len(frame) >= 4  # one reducing block x four metrics
    accumulator = _accumulator(out / "tensorboard" / cell.name)
    for row in frame.itertuples():
        (logged,) = accumulator.Scalars(f"rmse/{row.metric}/{row.layer}")
        assert (logged.step, logged.value) == (1, pytest.approx(row.value, rel=TENSORBOARD_TOLERANCE))
    client = tracking.MlflowClient(tracking_uri=store)
    run = client.get_run(json.loads((cell / "mlflow.json").read_text())["run_id"])
    for row in frame.itertuples():
        layer = row.layer.replace("->", "_to_")  # MLflow does not allow '>' in a metric name
        assert run.data.metrics[f"rmse/{row.metric}/{layer}"] == pytest.approx(row.value)


def test_gmbench_report_gives_the_report_to_the_loggers_of_the_run(tmp_path, capsys):
    _tensorboard()
    out = tmp_path / "run"
    assert _run(["run", str(_write_suite(tmp_path)), "--out", str(out), "--no-progress", "--no-report", "--logger", "tensorboard"], capsys)[0] == 0
    assert not (out / "tensorboard" / "report").exists()
    code, printed, _ = _run(["report", str(out)], capsys)
    assert code == 0 and "report logged to tensorboard" in printed
    images = _accumulator(out / "tensorboard" / "report").Tags()["images"]
    assert sorted(images) == sorted(f"figures/{p.stem}" for p in (out / "report" / "figures").glob("*.png"))
    # Again: the images are replaced (purge_step=1), not doubled.
    assert _run(["report", str(out)], capsys)[0] == 0
    report = _accumulator(out / "tensorboard" / "report")
    assert all(len(report.Images(tag)) == 1 for tag in images)


def test_a_cell_that_trains_again_from_scratch_replaces_its_logged_epochs(tmp_path, no_tracking_env, monkeypatch):
    tracking = _mlflow()
    _tensorboard()
    from gmbench.run.cell import RunOptions, run_cell

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    suite, cell, run_dir, cell_dir = _first_cell_of_a_new_run(tmp_path)
    options = RunOptions(plugins=tuple(suite.plugins), loggers=choose((), ["tensorboard", "mlflow"], store))
    assert run_cell(cell.config, cell_dir, options)["status"] == "ok"
    first_run = json.loads((cell_dir / "mlflow.json").read_text())["run_id"]
    (cell_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")  # set aside: the cell trains from scratch
    (cell_dir / "metrics.json").unlink()
    assert run_cell(cell.config, cell_dir, options)["status"] == "ok"
    epochs = _epochs(cell_dir)
    assert (cell_dir / "checkpoint.pt.rejected").is_file() and [r["epoch"] for r in epochs] == [1, 2, 3]

    logged = _accumulator(run_dir / "tensorboard" / cell.id).Scalars("epoch_time_s")
    assert [(e.step, e.value) for e in logged] == [(r["epoch"], pytest.approx(r["epoch_time_s"], rel=TENSORBOARD_TOLERANCE)) for r in epochs]
    client = tracking.MlflowClient(tracking_uri=store)
    second_run = json.loads((cell_dir / "mlflow.json").read_text())["run_id"]
    assert second_run != first_run
    old = client.get_run(first_run)
    assert old.info.status == "KILLED" and "gmbench.superseded" in old.data.tags
    history = sorted((m.step, m.value) for m in client.get_metric_history(second_run, "epoch_time_s"))
    assert history == [(r["epoch"], pytest.approx(r["epoch_time_s"])) for r in epochs]


def test_a_damaged_run_json_or_environment_json_does_not_stop_the_loggers(tmp_path):
    _tensorboard()
    run_dir = tmp_path / "my-run"
    cell_dir = run_dir / "cells" / "abc"
    cell_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("[1, 2]")  # valid JSON, not an object
    (run_dir / "environment.json").write_text("{torn")
    tracking = CellLoggers((LoggerChoice("tensorboard"),), {"task": "footprint", "layout": "1/4->2"}, cell_dir)
    assert [logger.name for logger in tracking.active] == ["tensorboard"]
    tracking.end({"status": "ok", "memory_mb": 1.5})
    accumulator = _accumulator(run_dir / "tensorboard" / "abc")
    assert [(e.step, e.value) for e in accumulator.Scalars("final/memory_mb")] == [(1, 1.5)]


def test_a_failed_cell_is_logged_with_its_status_and_error(tmp_path, capsys, no_tracking_env, monkeypatch):
    _tensorboard()
    tracking = _mlflow()
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    suite = _write_suite(tmp_path, "loggers: [tensorboard]", text=TRACKED_SUITE.replace("  n_gaussians: 8\n", "  n_gaussians: 8\n  model_params: {{fail: true}}\n"))
    out = tmp_path / "run"
    code, printed, _ = _run(["run", str(suite), "--out", str(out), "--no-progress", "--no-report", "--logger", "mlflow", "--mlflow-uri", store], capsys)
    assert code == 1, printed
    for cell in _cell_dirs(out):
        error = json.loads((cell / "metrics.json").read_text())["error"]
        assert "fails on purpose" in error
        run = tracking.MlflowClient(tracking_uri=store).get_run(json.loads((cell / "mlflow.json").read_text())["run_id"])
        assert run.info.status == "FAILED"
        assert (run.data.tags["gmbench.status"], run.data.tags["gmbench.error"]) == ("failed", error)
        accumulator = _accumulator(out / "tensorboard" / cell.name)
        (status,) = accumulator.Tensors("status/text_summary")
        assert tensor_util.make_ndarray(status.tensor_proto).item().decode() == f"failed: {error}"
        content = accumulator.PluginTagToContent("hparams")["_hparams_/session_end_info"]
        assert plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info.status == 2  # STATUS_FAILURE


def test_a_tracking_store_that_cannot_be_used_stops_the_run_with_one_line_before_any_cell(tmp_path, capsys, no_tracking_env):
    _mlflow()
    out = tmp_path / "run"
    code, _, err = _run(["run", str(_write_suite(tmp_path)), "--out", str(out), "--no-progress", "--logger", "mlflow", "--mlflow-uri", "bogus://nowhere"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "tracking store bogus://nowhere cannot be used" in err and "--mlflow-uri" in err
    assert [p.name for p in out.iterdir()] in ([], [LOCK_FILE])  # nothing of the run was written


def test_an_unusable_tracking_store_on_update_leaves_the_run_folder_as_it_was(tmp_path, capsys, no_tracking_env):
    _mlflow()
    out = tmp_path / "run"
    suite = _write_suite(tmp_path)
    assert _run(["run", str(suite), "--out", str(out), "--no-progress"], capsys)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    suite.write_text(suite.read_text().replace("seed: [0, 1]", "seed: [0, 1, 2]"))
    code, _, err = _run(["run", str(suite), "--out", str(out), "--update", "--no-progress", "--logger", "mlflow", "--mlflow-uri", "bogus://nowhere"], capsys)
    assert code == 2 and "tracking store bogus://nowhere cannot be used" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # run.json and suite.yaml still the old suite's; no new cell started
