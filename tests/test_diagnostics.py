"""Per-layer fitting diagnostics of a GMCN (Tables 10-11)."""

import pandas as pd
import pytest
import torch

from gmbench import metrics
from gmbench import mixture as gm
from gmbench.diagnostics import fitting_diagnostics
from gmbench.models.gmcn import GMCN


def input_batch(batch=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = 2 * torch.randn(batch, 1, n, 2, generator=g)
    weights = torch.rand(batch, 1, n, generator=g) + 0.1
    return gm.pack(weights, positions, 0.5 * torch.eye(2).expand(batch, 1, n, 2, 2))


def test_one_row_per_reducing_layer_and_metric():
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/4->5/2->3", reduction="treehem", reduction_params={"T": 2})
    table = fitting_diagnostics(model, input_batch(), n_samples=2000)
    assert list(table.columns) == ["layer", "method", "metric", "value"]
    # The output block (5->3) does not reduce and is left out, as in the paper's tables.
    assert table["layer"].unique().tolist() == ["1->4", "4->5"]
    assert table.groupby("layer")["metric"].apply(list).tolist() == [["all", "relu", "reduction", "reduction_l2"]] * 2
    assert set(table["method"]) == {"dense+treehem(T=2)"}
    assert table["value"].notna().all() and (table["value"] >= 0).all()
    # Reducing 30 Gaussians to 4 (1->4) or 80 to 2 (4->5) loses something.
    assert (table.query("metric == 'reduction_l2'")["value"] > 0).all()


def test_values_are_the_metrics_of_each_blocks_own_mixtures():
    torch.manual_seed(3)
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/4->3", reduction="mem").eval()
    m = input_batch(seed=1)
    table = fitting_diagnostics(model, m, n_samples=1500, seed=7)
    block = model.trace(m)[0]
    expected = metrics.fitting_errors(block.convolved, block.dense, block.reduced, n_samples=1500, seed=7)
    got = table.set_index("metric")["value"].to_dict()
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("reduction", ["treehem", "mem"])
def test_a_reduction_that_keeps_every_gaussian_has_zero_reduction_error(reduction):
    # 1 channel x 2 Gaussians x 5 kernel Gaussians = 10 Gaussians, "reduced" to 20: nothing to merge.
    model = GMCN(num_classes=3, dims=2, layout="1/2->2/20->3", reduction=reduction)
    table = fitting_diagnostics(model, input_batch(n=2), n_samples=3000).set_index("metric")["value"]
    assert table["reduction"] == pytest.approx(0, abs=1e-6)
    assert table["reduction_l2"] == pytest.approx(0, abs=1e-4)
    assert table["all"] == pytest.approx(table["relu"], rel=1e-5)
    assert table["relu"] > 0  # the dense ReLU fit itself is not exact


def test_diagnostics_leave_the_model_mode_and_running_statistics_untouched():
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/4->3")
    model.train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    result = fitting_diagnostics(model, input_batch(), n_samples=500)
    assert isinstance(result, pd.DataFrame)
    assert model.training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_a_train_cell_diagnoses_test_samples_from_every_part_of_a_class_sorted_split():
    from gmbench.tasks.train import _diagnostics_samples

    labels = torch.arange(10).repeat_interleave(100)  # stored class by class, as mnist5k is
    chosen = _diagnostics_samples(torch.arange(1000), 21)
    assert len(set(chosen.tolist())) == 21 and torch.equal(chosen, _diagnostics_samples(torch.arange(1000), 21))
    assert len(set(labels[chosen].tolist())) >= 8  # the first 21 would all be class 0
    assert torch.equal(_diagnostics_samples(torch.arange(5), 21), torch.arange(5))
