"""Two runs of the same suite on the same machine give the same results (docs/reports.md,
"Determinism"): every results.csv value apart from times and memory, every epoch's loss and
accuracy, and the trained weights, bit for bit."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import torch
from suite_texts import DIGITS_SMOKE_CELL

from gmbench import io
from gmbench.run.cell import RunOptions
from gmbench.run.executors import LocalExecutor
from gmbench.run.folder import cell_dir
from gmbench.run.results import RESULTS_CSV, VARYING_COLUMNS
from gmbench.run.suite_runner import run_suite
from gmbench.suite import parse_suite

# A --smoke-sized GMCN cell: k-means input fitting, two convolution layers, two epochs.
GMCN_SUITE = "name: determinism\ncell:\n" + DIGITS_SMOKE_CELL + """\
  model: gmcn
  input: gm
  model_params: {layout: "1/{n_gaussians}->4/2->{num_classes}", kernel_gaussians: 2}
"""
EPOCH_TIMING = ("epoch_time_s", "samples_per_s", "peak_memory_mb")


def _run(tmp_path, name: str):
    suite = parse_suite(textwrap.dedent(GMCN_SUITE), "determinism.yaml")
    out = tmp_path / name
    # Each run fits its input mixtures itself (its own cache): the fitting is compared too.
    summary = run_suite(suite, out, RunOptions(cache_dir=str(tmp_path / f"cache-{name}")), executor=LocalExecutor(), progress=False)
    assert summary.failed == []
    return out, cell_dir(out, suite.cells[0].id)


def test_two_runs_of_a_gmcn_cell_give_identical_results(tmp_path):
    first, first_cell = _run(tmp_path, "first")
    second, second_cell = _run(tmp_path, "second")

    a, b = pd.read_csv(first / RESULTS_CSV), pd.read_csv(second / RESULTS_CSV)
    assert list(a.columns) == list(b.columns)
    compared = [column for column in a.columns if column not in VARYING_COLUMNS]
    assert "test_accuracy" in compared and a.loc[0, "status"] == "ok"
    pd.testing.assert_frame_equal(a[compared], b[compared], check_exact=True)

    def epochs(cell):
        records = [json.loads(line) for line in (cell / "epochs.jsonl").read_text().splitlines()]
        return [{key: value for key, value in record.items() if key not in EPOCH_TIMING} for record in records]

    assert epochs(first_cell) == epochs(second_cell)  # losses and accuracies, exactly

    weights_a = io.load_torch(first_cell / "checkpoint.pt")["model"]
    weights_b = io.load_torch(second_cell / "checkpoint.pt")["model"]
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
