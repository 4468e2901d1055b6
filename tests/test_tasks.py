"""Task objects (gmbench.tasks): what the runner, results, report and progress look up."""

from __future__ import annotations

import pytest

from gmbench.errors import GmbenchError
from gmbench.report.tables import default_tables
from gmbench.run.progress import _planned_epochs
from gmbench.suite import parse_suite
from gmbench.suite.cell_checks import CHECKS
from gmbench.suite.schema import CELL_FIELDS, REQUIRED_FIELDS
from gmbench.suite.schema import TASKS as SUITE_TASKS
from gmbench.tasks import DEFAULT_TASK, TASKS, Task, dataset_parameters, get, task_for
from gmbench.tasks.fields import SEED, Field


def test_every_task_has_a_schema_a_run_function_and_a_default_metric():
    assert SUITE_TASKS == tuple(TASKS)
    for name, task in TASKS.items():
        assert set(task.fields) >= {"label", "seed"} and CELL_FIELDS[name] is task.fields
        assert REQUIRED_FIELDS[name] == task.required and set(task.required) <= set(task.fields)
        assert {f for _, plugin, params in task.plugin_fields for f in (plugin, params)} <= set(task.fields)
        assert set(task.suite_checks) <= set(CHECKS), f"{name}: unknown suite checks"
        assert callable(task.run) and task.run.__module__ == f"gmbench.tasks.{task.module}"
        assert task.default_metric


def test_a_task_defined_only_in_gmbench_tasks_is_validated_expanded_and_shrunk_by_the_suite(monkeypatch):
    def smoke(config, factor):
        config["size"] = 1

    toy = Task("toy", "footprint", "memory_mb", fields={"label": Field((str, type(None)), None), "seed": SEED,
                                                          "size": Field((int,), 10, minimum=1, maximum=100)},
               required=(), suite_checks=(), smoke=smoke, title_parts=lambda config: [f"size={config['size']}"])
    monkeypatch.setitem(TASKS, "toy", toy)
    suite = parse_suite("name: t\ntask: toy\ncell: {size: 5}\nmatrix: {seed: [0, 1]}\n", "t.yaml")
    assert [c.config for c in suite.cells] == [{"label": None, "seed": s, "size": 5, "task": "toy"} for s in (0, 1)]
    assert suite.cells[1].title == "None size=5 seed=1"
    assert parse_suite("name: t\ntask: toy\n", "t.yaml", smoke=True).cells[0].config["size"] == 1
    with pytest.raises(GmbenchError, match=r"t.yaml:3: .*'size'.* between 1 and 100"):
        parse_suite("name: t\ntask: toy\ncell: {size: 500}\n", "t.yaml")
    with pytest.raises(GmbenchError, match="unknown cell field 'layout' for task 'toy'; allowed: label, seed, size"):
        parse_suite("name: t\ntask: toy\ncell: {layout: x}\n", "t.yaml")


def test_an_unknown_task_is_one_line_naming_the_known_ones():
    with pytest.raises(GmbenchError, match="unknown task 'bake'; known tasks: train, footprint, transfer_fitting_timing"):
        get("bake")
    assert task_for({}) is TASKS[DEFAULT_TASK] is TASKS["train"]


def test_planned_epochs_come_from_the_training_section_else_one():
    suite = parse_suite(
        "name: e\ncell: {dataset: digits, model: pointnet, input: points, training: {epochs: 7}}\n", "e.yaml")
    assert _planned_epochs(suite.cells[0]) == 7
    assert TASKS["train"].planned_epochs({"training": {}}) == 60  # the trainer's default
    assert TASKS["footprint"].planned_epochs({"layout": "1/8->10"}) == 1
    assert TASKS["transfer_fitting_timing"].planned_epochs({"training": {"epochs": 9}}) == 1


def test_results_columns_and_labels_of_a_training_cell():
    config = {"task": "train", "model": "gmcn", "input": "points", "input_fitting": "kmeans",
              "training": {"epochs": 5, "batch_size": 8}, "model_params": {"layout": "1/8->10", "reduction": "treehem"}}
    fields = TASKS["train"].result_fields(config)
    assert fields == {"epochs": 5, "batch_size": 8, "layout": "1/8->10", "input_fitting": None, "reduction": "treehem"}
    assert TASKS["train"].label(config) == "gmcn (points)"
    assert TASKS["footprint"].result_fields({"layout": "1/8->10"}) == {}
    assert TASKS["footprint"].label({"task": "footprint", "layout": "1/8->10"}) == "1/8->10"
    assert TASKS["transfer_fitting_timing"].label({"task": "transfer_fitting_timing", "transfer_fitting": "dense"}) == "dense"


@pytest.mark.parametrize(("task", "value", "extra"), [
    ("train", "test_accuracy", ["params", "train_time_s", "peak_memory_mb"]),
    ("footprint", "memory_mb", None),
    ("transfer_fitting_timing", "time_ms", None),
])
def test_the_default_report_table_shows_the_tasks_metric(task, value, extra):
    import pandas as pd

    (spec,) = default_tables(pd.DataFrame({"label": ["a"], "n_gaussians": [4]}), task)
    assert spec["value"] == value and spec.get("extra") == extra


def test_dataset_parameters_take_the_runs_data_root_over_the_cells_without_changing_the_cell():
    cell_params = {"data_root": "/from/the/suite", "n_points": 512}
    assert dataset_parameters(cell_params, "/from/the/command/line") == {"data_root": "/from/the/command/line", "n_points": 512}
    assert dataset_parameters(cell_params, None) == cell_params and dataset_parameters(cell_params, None) is not cell_params
    assert cell_params["data_root"] == "/from/the/suite"
