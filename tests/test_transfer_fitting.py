"""Transfer-function fitting plugins: dense heuristic (Eq. 6-7) and least squares (Appendix B)."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import PluginError
from gmbench.fitting.dense import fit_relu_dense


def mixture(weights, positions, covariances, dtype=torch.float64):
    return gm.pack(
        torch.tensor(weights, dtype=dtype)[None, None],
        torch.tensor(positions, dtype=dtype)[None, None],
        torch.tensor(covariances, dtype=dtype)[None, None],
    )


def random_mixture(batch, channels, n, dims, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=dtype) * 2
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.4 + 0.6 * torch.eye(dims, dtype=dtype)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


TOY = dict(
    weights=[1.0, -0.7, 0.4],
    positions=[[0.0, 0.0], [0.8, 0.3], [-1.0, 1.2]],
    covariances=[[[1.0, 0.2], [0.2, 0.5]], [[0.6, 0.0], [0.0, 0.9]], [[0.3, -0.1], [-0.1, 0.4]]],
)


def scipy_mixture(weights, positions, covariances, x):
    return sum(w * multivariate_normal(p, c).pdf(x) for w, p, c in zip(weights, positions, covariances))


def test_dense_matches_equations_6_and_7_by_hand():
    eps = 1e-3
    m = mixture(**TOY)
    out = plugins.create("transfer_fitting", "dense", eps=eps).fit(m)
    w, p, c = TOY["weights"], TOY["positions"], TOY["covariances"]
    coarse = [a if a > 0 else eps for a in w]  # Eq. 6
    expected = [
        coarse[i] * max(scipy_mixture(w, p, c, p[i]), 0.0) / scipy_mixture(coarse, p, c, p[i])  # Eq. 7
        for i in range(3)
    ]
    np.testing.assert_allclose(gm.weights(out)[0, 0].numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(out[..., 1:], m[..., 1:])  # positions and covariances unchanged


def authors_pipeline_weights(weights, positions, covariances):
    """The authors' published pipeline, written independently with SciPy: their
    ``initial_approx_to_relu`` (constant 0: non-positive weights become 0), then one
    fixed-point step ``x = relu(w) + 0.1``, ``x <- x (relu(f(mu_i)) + 0.05) / (g_x(mu_i) + 0.05)``."""
    initial = [a if a > 0 else 0.0 for a in weights]  # initial_approx_to_relu
    x = [a + 0.1 for a in initial]
    target = [max(scipy_mixture(weights, positions, covariances, mu), 0.0) for mu in positions]
    current = [scipy_mixture(x, positions, covariances, mu) for mu in positions]
    return [x_i * (t + 0.05) / (g + 0.05) for x_i, t, g in zip(x, target, current)]


def test_smoothed_variant_equals_the_authors_pipeline():
    m = mixture(**TOY)
    out = plugins.create("transfer_fitting", "dense", variant="smoothed").fit(m)
    expected = authors_pipeline_weights(TOY["weights"], TOY["positions"], TOY["covariances"])
    np.testing.assert_allclose(gm.weights(out)[0, 0].numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(out[..., 1:], m[..., 1:])


def test_smoothed_variant_equals_the_authors_pipeline_on_a_random_mixture():
    m = random_mixture(1, 1, 12, 2, seed=3)
    out = plugins.create("transfer_fitting", "dense", variant="smoothed").fit(m)
    w, p, c = (t[0, 0].numpy() for t in (gm.weights(m), gm.positions(m), gm.covariances(m)))
    expected = authors_pipeline_weights(list(w), list(p), list(c))
    np.testing.assert_allclose(gm.weights(out)[0, 0].numpy(), expected, rtol=1e-12)
    # The start relu(w) + 0.1 differs from |w| + 0.1 wherever a weight is negative.
    assert (gm.weights(m) < 0).any()
    abs_start = [abs(a) + 0.1 for a in w]
    wrong = [x * (max(scipy_mixture(w, p, c, mu), 0) + 0.05) / (scipy_mixture(abs_start, p, c, mu) + 0.05)
             for x, mu in zip(abs_start, p)]
    assert np.abs(gm.weights(out)[0, 0].numpy() - wrong).max() > 1e-2


def test_smoothed_variant_differs_from_the_paper_default():
    m = mixture(**TOY)
    smoothed = plugins.create("transfer_fitting", "dense", variant="smoothed").fit(m)
    paper = plugins.create("transfer_fitting", "dense").fit(m)
    assert (gm.weights(smoothed) - gm.weights(paper)).abs().max() > 1e-2
    assert plugins.create("transfer_fitting", "dense").variant == "paper"


def test_single_positive_gaussian_passes_through_unchanged():
    m = mixture([2.5], [[1.0, -1.0]], [[[0.7, 0.1], [0.1, 0.3]]])
    out = fit_relu_dense(m)
    torch.testing.assert_close(out, m)


def test_single_negative_gaussian_vanishes():
    m = mixture([-2.5], [[1.0, -1.0]], [[[0.7, 0.1], [0.1, 0.3]]])
    out = fit_relu_dense(m)
    assert gm.weights(out).abs().max() == 0
    assert torch.isfinite(out).all()


def test_all_negative_input_gives_zero_weights_and_finite_gradients():
    m = gm.with_weights(random_mixture(2, 3, 20, 3), -torch.rand(2, 3, 20, dtype=torch.float64) - 0.1)
    m.requires_grad_(True)
    out = fit_relu_dense(m)
    assert bool((gm.weights(out) == 0).all())
    out.sum().backward()
    assert torch.isfinite(m.grad).all()


@pytest.mark.parametrize("variant", ["paper", "smoothed"])
def test_dense_output_is_non_negative_everywhere_sampled(variant):
    m = random_mixture(2, 2, 30, 2, seed=3)
    out = plugins.create("transfer_fitting", "dense", variant=variant).fit(m)
    assert bool((gm.weights(out) >= 0).all())
    grid = torch.stack(torch.meshgrid(torch.linspace(-8, 8, 60), torch.linspace(-8, 8, 60), indexing="ij"), -1)
    values = gm.evaluate(out, grid.reshape(-1, 2).to(torch.float64))
    assert bool((values >= 0).all())


def test_dense_fit_is_exact_at_isolated_gaussians():
    # Far-apart Gaussians: at each centre the mixture is one Gaussian, so the
    # ReLU fit keeps positive ones and drops negative ones.
    m = mixture([1.0, -2.0, 0.5], [[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]], [np.eye(2).tolist()] * 3)
    out = fit_relu_dense(m)
    np.testing.assert_allclose(gm.weights(out)[0, 0].numpy(), [1.0, 0.0, 0.5], atol=1e-12)


def test_dense_handles_zero_weight_padding_and_duplicated_centroids():
    base = random_mixture(1, 1, 5, 2, seed=1)
    m = gm.pad(torch.cat([base, base], -2), 16)
    m.requires_grad_(True)
    out = fit_relu_dense(m)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(m.grad).all()


@pytest.mark.parametrize("variant", ["paper", "smoothed"])
def test_dense_gradcheck_float64(variant):
    m = random_mixture(1, 2, 6, 2, seed=5).requires_grad_(True)
    fitting = plugins.create("transfer_fitting", "dense", variant=variant)
    assert torch.autograd.gradcheck(fitting.fit, (m,), eps=1e-6, atol=1e-6)


def test_dense_coarse_mixture_is_equation_6():
    m = mixture(**TOY)
    coarse = plugins.create("transfer_fitting", "dense", eps=0.01).coarse(m)
    np.testing.assert_allclose(gm.weights(coarse)[0, 0].numpy(), [1.0, 0.01, 0.4])


@pytest.mark.parametrize("samples", ["centres", "random", "centres+random"])
def test_lstsq_weights_are_the_least_squares_solution(samples):
    m = random_mixture(2, 1, 8, 2, seed=2)
    fitting = plugins.create("transfer_fitting", "lstsq", samples=samples, random_factor=3.0, seed=4)
    out = fitting.fit(m)
    from gmbench.fitting.lstsq import sample_positions, unit_gaussian_matrix

    flat = m.reshape(-1, 8, 7)
    points = sample_positions(flat, samples, 3.0, torch.Generator().manual_seed(4))
    for row in range(2):
        pts = points[row].numpy()
        w, p, c = gm.weights(flat)[row].numpy(), gm.positions(flat)[row].numpy(), gm.covariances(flat)[row].numpy()
        a = np.stack([multivariate_normal(p[i], c[i]).pdf(pts) for i in range(8)], -1)
        np.testing.assert_allclose(unit_gaussian_matrix(flat[row : row + 1], points[row : row + 1])[0].numpy(), a, rtol=1e-9)
        t = np.maximum(a @ w, 0)
        reference = np.linalg.lstsq(a, t, rcond=None)[0]
        residual = np.linalg.norm(a @ gm.weights(out)[row, 0].numpy() - t)
        assert residual <= np.linalg.norm(a @ reference - t) + 1e-8


def test_lstsq_and_pinv_agree_for_full_rank_systems():
    m = random_mixture(3, 1, 6, 3, seed=6)
    a = plugins.create("transfer_fitting", "lstsq", samples="centres+random", random_factor=2.0, solver="lstsq").fit(m)
    b = plugins.create("transfer_fitting", "lstsq", samples="centres+random", random_factor=2.0, solver="pinv").fit(m)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lstsq_random_samples_are_reproducible_by_seed():
    m = random_mixture(1, 1, 10, 2, seed=7)
    make = lambda seed: plugins.create("transfer_fitting", "lstsq", samples="random", seed=seed).fit(m)  # noqa: E731
    torch.testing.assert_close(make(1), make(1))
    assert (make(1) - make(2)).abs().max() > 0


def test_lstsq_pinv_is_differentiable():
    m = random_mixture(1, 1, 4, 2, seed=8).requires_grad_(True)
    fitting = plugins.create("transfer_fitting", "lstsq", samples="centres+random", random_factor=2.0, solver="pinv")
    assert torch.autograd.gradcheck(fitting.fit, (m,), eps=1e-6, atol=1e-5)


def test_lstsq_chunking_does_not_change_the_result():
    m = random_mixture(5, 2, 6, 2, seed=9)
    whole = plugins.create("transfer_fitting", "lstsq", samples="centres+random").fit(m)
    chunked = plugins.create("transfer_fitting", "lstsq", samples="centres+random", chunk_elements=10).fit(m)
    torch.testing.assert_close(whole, chunked)


@pytest.mark.parametrize(
    "name,params",
    [("dense", {"variant": "fancy"}), ("dense", {"eps": 0.0}), ("lstsq", {"solver": "qr"}), ("lstsq", {"samples": "grid"})],
)
def test_bad_parameters_raise_plugin_error(name, params):
    with pytest.raises(PluginError, match=name):
        plugins.create("transfer_fitting", name, **params)


def test_weight_relu_clamps_the_weights_and_keeps_the_gaussians():
    m = random_mixture(2, 3, 7, 3, seed=5)
    out = plugins.create("transfer_fitting", "weight_relu").fit(m)
    torch.testing.assert_close(gm.weights(out), gm.weights(m).clamp_min(0))
    torch.testing.assert_close(out[..., 1:], m[..., 1:])


def test_weight_relu_overshoots_where_a_negative_gaussian_overlaps_a_positive_one():
    # Appendix G's argument: relu(1.0 g1 - 0.9 g2) with g1, g2 almost on top of each other is
    # nearly 0, but relu on the weights keeps g1 whole; the dense heuristic sees the sum.
    m = mixture([1.0, -0.9], [[0.0, 0.0], [0.1, 0.0]], [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1).reshape(1, 1, -1, 2)
    target = gm.evaluate(m, points).clamp_min(0)

    def rmse(fitted):
        return float((gm.evaluate(fitted, points) - target).pow(2).mean().sqrt())

    weight_relu = rmse(plugins.create("transfer_fitting", "weight_relu").fit(m))
    dense = rmse(plugins.create("transfer_fitting", "dense").fit(m))
    assert weight_relu > 5 * dense
