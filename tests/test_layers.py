"""ReLUFitting: transfer fitting followed by reduction, both chosen as plugins."""

import pytest
import torch

from gmbench import metrics
from gmbench import mixture as gm
from gmbench.errors import PluginError
from gmbench.fitting.dense import fit_relu_dense
from gmbench.layers import ReLUFitting


def random_mixture(batch, channels, n, dims, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=dtype) * 2
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.4 + 0.6 * torch.eye(dims, dtype=dtype)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


def test_relu_fitting_is_dense_fit_then_reduction():
    m = random_mixture(2, 3, 40, 3)
    layer = ReLUFitting("dense", "treehem", n_out=8, reduction_params={"T": 4})
    reduced, dense = layer(m, return_dense=True)
    torch.testing.assert_close(dense, fit_relu_dense(m))
    from gmbench.reduction.treehem import TreeHEMReduction

    torch.testing.assert_close(reduced, TreeHEMReduction(T=4).reduce(dense, 8))
    assert reduced.shape == (2, 3, 8, 13)
    torch.testing.assert_close(layer(m), reduced)


def test_without_n_out_only_the_dense_fit_runs():
    m = random_mixture(1, 2, 10, 2)
    layer = ReLUFitting(transfer_fitting="dense", transfer_fitting_params={"variant": "smoothed"})
    torch.testing.assert_close(layer(m), fit_relu_dense(m, variant="smoothed"))


@pytest.mark.parametrize("reduction", ["treehem", "mem"])
def test_relu_fitting_is_differentiable_end_to_end(reduction):
    m = random_mixture(1, 1, 10, 2, seed=3).requires_grad_(True)
    layer = ReLUFitting("dense", reduction, n_out=4)
    assert torch.autograd.gradcheck(layer, (m,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("reduction", ["treehem", "mem"])
def test_all_negative_input_gives_an_empty_valid_output(reduction):
    m = random_mixture(2, 2, 24, 3, seed=5)
    m = gm.with_weights(m, -gm.weights(m).abs() - 0.1).requires_grad_(True)
    out = ReLUFitting("dense", reduction, n_out=6)(m)
    assert out.shape == (2, 2, 6, 13)
    assert torch.isfinite(out).all() and bool((gm.weights(out) == 0).all())
    out.sum().backward()
    assert torch.isfinite(m.grad).all()


def test_relu_fitting_approximates_the_relu():
    m = random_mixture(2, 2, 64, 2, seed=4)
    reduced, dense = ReLUFitting("dense", "treehem", n_out=16)(m, return_dense=True)
    errors = metrics.fitting_errors(m, dense, reduced, n_samples=5000)
    zero = gm.with_weights(m, torch.zeros_like(gm.weights(m)))
    baseline = metrics.fitting_errors(m, zero, zero, n_samples=5000)
    # Far better than predicting zero everywhere.
    assert errors["relu"] < 0.5 * baseline["relu"]
    assert errors["all"] < 0.6 * baseline["all"]


def test_unknown_plugins_and_parameters_raise_plugin_error():
    with pytest.raises(PluginError, match="unknown reduction plugin 'nope'"):
        ReLUFitting(reduction="nope")
    with pytest.raises(PluginError, match="has no parameter 'T'"):
        ReLUFitting(transfer_fitting="dense", transfer_fitting_params={"T": 2})
    with pytest.raises(ValueError, match="n_out"):
        ReLUFitting(n_out=0)


def test_figure_fitting_example_writes_five_consistent_panels(tmp_path):
    import matplotlib.image

    from gmbench.cli import main
    from gmbench.report.fitting_figure import fitting_example_panels, random_layer_output

    m = random_layer_output(20, seed=1)
    titles, images, _ = fitting_example_panels(m, "dense", "treehem", 6, 32)
    assert len(titles) == 5 and images.shape == (5, 32, 32)
    torch.testing.assert_close(images[1], images[0].clamp_min(0))  # ReLU target
    assert bool((images[2:] >= 0).all())  # a', a'' and the reduction are non-negative
    out = tmp_path / "figure.png"
    assert main(["figure", "fitting-example", "--out", str(out), "--n-gaussians", "20", "--n-out", "6", "--resolution", "32"]) == 0
    assert matplotlib.image.imread(out).shape[2] in (3, 4)
    assert main(["figure", "fitting-example", "--out", str(out), "--n-out", "0"]) == 2
