"""Input fitting (paper Section 5): batched EM / k-means / Eckart against known mixtures and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import DataError, PluginError
from gmbench.input_fitting import em
from gmbench.input_fitting.eckart import hierarchy_levels
from gmbench.input_fitting.kmeans import farthest_point_sampling

METHODS = {
    "kmeans": {},
    "kmeans_em": {},
    "random_em": {"init": "responsibilities", "iterations": 500, "tolerance": 1e-6},
    "eckart": {"per_node": 2, "levels": 2},
}


def sample_known_mixture(batch, n_points, dims, generator, grouped=False, count=4):
    """``count`` (<= 4) well separated Gaussians per sample (two pairs of two when ``grouped``)."""
    if grouped:
        group = torch.tensor([[-12.0] + [0.0] * (dims - 1), [12.0] + [0.0] * (dims - 1)])
        offset = torch.tensor([[0.0, -3.5] + [0.0] * (dims - 2), [0.0, 3.5] + [0.0] * (dims - 2)])
        means = (group[:, None] + offset[None]).reshape(4, dims)
    else:
        means = torch.tensor([[-6.0, -6.0, 0.0], [6.0, -6.0, 0.0], [-6.0, 6.0, 1.0], [6.0, 6.0, -1.0]])[:, :dims]
    means = means.expand(batch, 4, dims) + torch.randn(batch, 1, dims, generator=generator)
    factors = 0.3 * torch.randn(batch, 4, dims, dims, generator=generator, dtype=torch.float64).float()
    covs = factors @ factors.transpose(-1, -2) + 0.5 * torch.eye(dims)
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    keep = [0, 3, 1, 2][:count]
    means, covs, pi = means[:, keep], covs[:, keep], pi[keep].expand(batch, count) / pi[keep].sum()
    labels = torch.multinomial(pi, n_points, replacement=True, generator=generator)
    chol = torch.linalg.cholesky(covs)
    z = torch.randn(batch, n_points, dims, 1, generator=generator)
    pick = lambda t: torch.gather(t, 1, labels.reshape(batch, n_points, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
    points = pick(means) + (pick(chol) @ z).squeeze(-1)
    return points, em.MixtureParameters(pi.clone(), means.clone(), covs)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dims", [2, 3])
def test_each_method_recovers_a_known_mixture(method, dims):
    generator = torch.Generator().manual_seed(dims)
    # Random initialisation has local optima with several separated clusters (that
    # is the point of Table 4); with two it must find the truth.
    count = 2 if method == "random_em" else 4
    points, truth = sample_known_mixture(3, 3000, dims, generator, grouped=method == "eckart", count=count)
    fitter = plugins.create("input_fitting", method, normalize=False, reg_covar=1e-6, dtype="float64",
                            **METHODS[method])
    fitted = fitter.fit_parameters(points.double(), count)
    w = em.normalize_point_weights(points.double(), None)
    truth64 = em.MixtureParameters(truth.pi.double(), truth.mu.double(), truth.cov.double())
    ll_truth = em.mean_log_likelihood(points.double(), w, truth64)
    ll_fit = em.mean_log_likelihood(points.double(), w, fitted)
    # k-means uses hard assignments (biased covariances); the EM methods reach the optimum.
    tolerance = 0.08 if method == "kmeans" else 0.01
    assert torch.all(ll_fit > ll_truth - tolerance), (ll_fit, ll_truth)
    for b in range(3):
        cost = torch.cdist(truth.mu[b].double(), fitted.mu[b]).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert cost[rows, cols].max() < 0.2
        np.testing.assert_allclose(fitted.pi[b, cols].numpy(), truth.pi[b, rows].numpy(), atol=0.03)
        np.testing.assert_allclose(fitted.cov[b, cols].numpy(), truth.cov[b, rows].numpy(), atol=0.25)


def test_em_matches_sklearn_gaussian_mixture_from_the_same_initialisation():
    generator = torch.Generator().manual_seed(7)
    points, _ = sample_known_mixture(1, 1500, 3, generator)
    x = points[0].double()
    n = 6
    rng = np.random.default_rng(0)
    means0 = x[rng.choice(len(x), n, replace=False)].numpy()
    covs0 = np.stack([np.eye(3) * 4.0] * n)
    pi0 = np.full(n, 1.0 / n)
    reg = 1e-4
    reference = GaussianMixture(n, covariance_type="full", reg_covar=reg, max_iter=25, tol=0.0,
                                weights_init=pi0, means_init=means0, precisions_init=np.linalg.inv(covs0))
    with pytest.warns(Warning):  # "did not converge": tol=0 forces all 25 iterations
        reference.fit(x.numpy())
    init = em.MixtureParameters(torch.tensor(pi0)[None], torch.tensor(means0)[None], torch.tensor(covs0)[None])
    w = em.normalize_point_weights(x[None], None)
    ours, ll, steps = em.run_em(x[None], w, init, reg, iterations=25)
    assert steps.item() == 25
    assert ll.item() == pytest.approx(reference.score(x.numpy()), abs=1e-8)
    np.testing.assert_allclose(ours.mu[0].numpy(), reference.means_, atol=1e-6)
    np.testing.assert_allclose(ours.cov[0].numpy(), reference.covariances_, atol=1e-6)
    np.testing.assert_allclose(ours.pi[0].numpy(), reference.weights_, atol=1e-8)


def test_em_log_gaussians_match_scipy():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 3, generator=generator, dtype=torch.float64) * 3
    mu = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    a = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.1 * torch.eye(3, dtype=torch.float64)
    ours = em.log_gaussians(x, mu, cov)
    for b in range(2):
        for k in range(4):
            expected = multivariate_normal(mu[b, k].numpy(), cov[b, k].numpy()).logpdf(x[b].numpy())
            np.testing.assert_allclose(ours[b, :, k].numpy(), expected, rtol=1e-9, atol=1e-8)


def test_em_tolerance_stops_like_sklearn():
    generator = torch.Generator().manual_seed(3)
    points, _ = sample_known_mixture(1, 1000, 2, generator)
    x = points[0].double()
    init = em.MixtureParameters(
        torch.full((1, 4), 0.25, dtype=torch.float64), x[:4][None].clone(), torch.eye(2, dtype=torch.float64).expand(1, 4, 2, 2)
    )
    reference = GaussianMixture(4, reg_covar=1e-6, max_iter=500, tol=1e-3, weights_init=init.pi[0].numpy(),
                                means_init=init.mu[0].numpy(), precisions_init=np.linalg.inv(init.cov[0].numpy()))
    reference.fit(x.numpy())
    w = em.normalize_point_weights(x[None], None)
    _, ll, steps = em.run_em(x[None], w, init, 1e-6, iterations=500, tolerance=1e-3)
    assert steps.item() == reference.n_iter_
    assert ll.item() == pytest.approx(reference.score(x.numpy()), abs=1e-9)


def test_fitting_in_standardised_coordinates_is_exact():
    """EM is affine-equivariant: the plugin's standardise -> fit -> map back equals EM on raw points."""
    generator = torch.Generator().manual_seed(5)
    points, truth = sample_known_mixture(2, 800, 3, generator)
    x = points.double() * 40 + 1000  # far from the origin, large scale
    w = em.normalize_point_weights(x, None)
    init = em.MixtureParameters(truth.pi.double(), truth.mu.double() * 40 + 1000, truth.cov.double() * 1600)
    raw, _, _ = em.run_em(x, w, init, 0.5, iterations=10)
    xs, centre, scale = em.standardize(x, w)
    init_s = em.MixtureParameters(init.pi, (init.mu - centre) / scale[:, None, None],
                                  init.cov / (scale**2)[:, None, None, None])
    fitted, _, _ = em.run_em(xs, w, init_s, 0.5 / scale**2, iterations=10)
    back = em.unstandardize(fitted, centre, scale)
    torch.testing.assert_close(back.mu, raw.mu, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(back.cov, raw.cov, rtol=1e-9, atol=1e-6)


def test_point_weights_act_like_repeated_points():
    generator = torch.Generator().manual_seed(2)
    points, _ = sample_known_mixture(1, 400, 2, generator)
    repeats = torch.randint(1, 4, (400,), generator=generator)
    repeated = points[0].repeat_interleave(repeats, 0)[None]
    padded = torch.cat([points, torch.full((1, 30, 2), 99.0)], 1)
    weights = torch.cat([repeats.float(), torch.zeros(30)])[None]
    # Explicit reg_covar: "auto" sees the repeated points as spacing 0.
    fitter = plugins.create("input_fitting", "kmeans", init="fps", em_steps=3, normalize=False, dtype="float64",
                            reg_covar=1e-3)
    a = fitter.fit_parameters(repeated.double(), 5)
    b = fitter.fit_parameters(padded.double(), 5, weights=weights.double())
    torch.testing.assert_close(a.mu, b.mu)
    torch.testing.assert_close(a.cov, b.cov)
    torch.testing.assert_close(a.pi, b.pi)


def test_a_batch_is_fitted_like_its_samples_one_by_one():
    generator = torch.Generator().manual_seed(4)
    points, _ = sample_known_mixture(3, 500, 3, generator)
    fitter = plugins.create("input_fitting", "kmeans_em", init="fps", tolerance=0.0, iterations=15, dtype="float64")
    together = fitter.fit(points.double(), 6)
    alone = torch.cat([fitter.fit(points[i : i + 1].double(), 6) for i in range(3)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("method", list(METHODS))
def test_output_is_normalised_as_the_paper_describes(method):
    generator = torch.Generator().manual_seed(6)
    points, _ = sample_known_mixture(3, 600, 3, generator, grouped=method == "eckart")
    points = points * torch.tensor([1.0, 10.0, 0.1])[:, None, None]  # very different scales per sample
    params = dict(METHODS[method])
    m = plugins.create("input_fitting", method, **params).fit(points, 4)
    assert m.shape == (3, 1, 4, 13) and m.dtype == torch.float32
    torch.testing.assert_close(gm.mean_covariance_trace(m), torch.full((3, 1), 3.0))
    torch.testing.assert_close(gm.evaluate_at_centroids(m).mean(-1), torch.ones(3, 1), rtol=1e-4, atol=1e-4)
    raw = plugins.create("input_fitting", method, normalize=False, **params).fit(points, 4)
    ratio = gm.weights(m) / gm.weights(raw)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=0)
    torch.testing.assert_close(gm.weights(raw).sum(-1), torch.ones(3, 1))


def test_kmeans_authors_variant_gives_isotropic_covariances_at_fps_centres():
    generator = torch.Generator().manual_seed(8)
    points, _ = sample_known_mixture(2, 500, 3, generator)
    points = points.double()
    fitted = plugins.create("input_fitting", "kmeans", init="fps", iterations=0, covariance="isotropic",
                            normalize=False, dtype="float64").fit_parameters(points, 16)
    cov = fitted.cov
    diagonal = torch.diagonal(cov, dim1=-2, dim2=-1)
    torch.testing.assert_close(cov, torch.diag_embed(diagonal))
    torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal))
    # With zero Lloyd iterations the means are those of the points nearest to the FPS centres.
    w = em.normalize_point_weights(points, None)
    labels = torch.cdist(points, farthest_point_sampling(points, w, 16)).argmin(-1)
    for b in range(2):
        for k in range(16):
            torch.testing.assert_close(fitted.mu[b, k], points[b][labels[b] == k].mean(0))


def test_farthest_point_sampling_spreads_points():
    x = torch.tensor([[[0.0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 10], [5, 5]]])
    chosen = farthest_point_sampling(x, torch.ones(1, 6), 3)
    assert {tuple(p) for p in chosen[0].tolist()} == {(0.0, 10.0), (10.0, 0.0), (0.0, 0.0)}


def test_reg_covar_bounds_covariances_of_degenerate_clusters():
    points = torch.cat([torch.zeros(1, 50, 3), torch.ones(1, 50, 3) * 5], 1)  # two single-point clusters
    fitted = plugins.create("input_fitting", "kmeans_em", reg_covar=0.01, normalize=False,
                            dtype="float64").fit_parameters(points, 2)
    eigenvalues = torch.linalg.eigvalsh(fitted.cov.double())
    torch.testing.assert_close(eigenvalues, torch.full_like(eigenvalues, 0.01), rtol=1e-3, atol=1e-5)


def test_eckart_levels_follow_the_paper_figure_six():
    assert hierarchy_levels(128, 5) == 3  # 125 Gaussians + 3 padding
    generator = torch.Generator().manual_seed(9)
    points, _ = sample_known_mixture(2, 2000, 3, generator)
    m = plugins.create("input_fitting", "eckart").fit(points, 128)
    assert m.shape == (2, 1, 128, 13)
    assert torch.all(gm.weights(m)[..., 125:] == 0)
    assert torch.all(gm.weights(m)[..., :125] >= 0) and bool(torch.isfinite(m).all())


def test_input_fitting_rejects_bad_input_with_clear_errors():
    fitter = plugins.create("input_fitting", "kmeans")
    with pytest.raises(DataError, match="NaN"):
        fitter.fit(torch.full((1, 10, 3), math.nan), 2)
    with pytest.raises(DataError, match="positive weight"):
        fitter.fit(torch.randn(2, 10, 3), 2, weights=torch.cat([torch.ones(1, 10), torch.zeros(1, 10)]))
    with pytest.raises(DataError, match=r"\[B, P, 2\|3\]"):
        fitter.fit(torch.randn(10, 3), 2)
    with pytest.raises(PluginError, match="init must be"):
        plugins.create("input_fitting", "kmeans", init="random")
    with pytest.raises(PluginError, match="reg_covar"):
        plugins.create("input_fitting", "kmeans_em", reg_covar=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", list(METHODS))
def test_fitting_runs_on_cuda(method):
    generator = torch.Generator().manual_seed(10)
    points, _ = sample_known_mixture(4, 1000, 3, generator, grouped=method == "eckart")
    m = plugins.create("input_fitting", method, **METHODS[method]).fit(points.cuda(), 4)
    assert m.device.type == "cuda" and bool(torch.isfinite(m).all())
    cpu = plugins.create("input_fitting", method, device="cuda", **METHODS[method]).fit(points, 4)
    assert cpu.device.type == "cpu"


def test_auto_reg_covar_is_the_sampling_cell_variance():
    from gmbench.input_fitting.base import sampling_cell_variance

    # A pixel grid (spacing 1) with padding: each pixel is a unit cell of variance 1/12.
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    grid = torch.stack([cols.reshape(-1) + 0.5, rows.reshape(-1) + 0.5], -1)[None]
    points = torch.cat([grid, torch.zeros(1, 4, 2)], 1) * 3.0  # spacing 3 -> variance 9/12
    weights = torch.cat([torch.rand(1, 30) + 0.1, torch.zeros(1, 4)], 1)
    w = em.normalize_point_weights(points, weights)
    torch.testing.assert_close(sampling_cell_variance(points, w), torch.tensor([9 / 12]))
    fitted = plugins.create("input_fitting", "kmeans", normalize=False).fit_parameters(points, 30, weights)
    # One Gaussian per pixel: covariance = the cell variance.
    torch.testing.assert_close(fitted.cov, torch.eye(2).expand(1, 30, 2, 2) * 9 / 12, rtol=1e-4, atol=1e-4)


def _no_fitting(*args, **kwargs):
    raise AssertionError("the size should have been refused before any fitting work")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("n_components", [51, 10**6, 10**11])
def test_more_gaussians_than_points_is_refused_before_fitting(method, n_components, monkeypatch):
    from gmbench.input_fitting.base import InfeasibleFit

    fitter = plugins.create("input_fitting", method, **{**METHODS[method], "levels": None} if method == "eckart" else METHODS[method])
    monkeypatch.setattr(type(fitter), "fit_standardized", _no_fitting)  # k-means++ of 10**6 seeds took minutes
    with pytest.raises(InfeasibleFit, match=rf"n_gaussians \(n_components\) = {n_components} is more than the 50 "
                                            r"points per sample.*use n_gaussians <= 50"):
        fitter.fit(torch.randn(2, 50, 3), n_components)


def test_a_fit_that_needs_more_memory_than_the_machine_has_is_refused(monkeypatch):
    from gmbench.input_fitting.base import InfeasibleFit

    # [P, N] float64 responsibilities for P = N = 10**6: 8 TB, on any machine more than it has.
    fitter = plugins.create("input_fitting", "random_em", dtype="float64")
    monkeypatch.setattr(type(fitter), "fit_standardized", _no_fitting)
    with pytest.raises(InfeasibleFit, match=r"'random_em' of n_gaussians \(n_components\) = 1000000 to 1000000 "
                                            r"points per sample needs at least 745\d.\d GiB for one sample, more than the .* GiB of cpu memory"):
        fitter.fit(torch.randn(1, 10**6, 2), 10**6)


def test_memory_bound_counts_the_full_responsibilities_only_for_methods_that_hold_them(monkeypatch):
    from gmbench.input_fitting import base

    # P=400, N=200, D=3 float32: k-means tiles its distances (~78 kB), k-means+EM holds the
    # [P, N] responsibilities (+320 kB).  With 200 kB of "memory" only k-means fits.
    monkeypatch.setattr(base, "device_memory_bytes", lambda device: 200_000)
    points = torch.randn(4, 400, 3, generator=torch.Generator().manual_seed(0))
    kmeans = plugins.create("input_fitting", "kmeans", iterations=2)
    assert kmeans.fit(points[:1], 200).shape == (1, 1, 200, 13)
    with pytest.raises(base.InfeasibleFit, match=r"'kmeans_em' .* needs at least 3\d\d.\d KiB for one sample, more than the 195.3 KiB"):
        plugins.create("input_fitting", "kmeans_em").fit(points[:1], 200)
    with pytest.raises(base.InfeasibleFit, match="'kmeans' of 4 samples at once .* fit at most 2 samples per call"):
        kmeans.fit(points, 200)


def test_eckart_hierarchy_that_does_not_fit_in_n_components_is_refused():
    from gmbench.input_fitting.base import InfeasibleFit

    points = torch.randn(1, 200, 3)
    with pytest.raises(InfeasibleFit, match=r"n_gaussians \(n_components\) = 4 is less than per_node = 5"):
        plugins.create("input_fitting", "eckart").fit(points, 4)
    with pytest.raises(InfeasibleFit, match=r"per_node \*\* levels = 5\*\*4 = 625 Gaussians exceed .* = 128"):
        plugins.create("input_fitting", "eckart", levels=4).fit(points, 128)


@pytest.mark.parametrize("gaussians", ["65", "65536"])  # digits: at most 64 lit pixels per image
def test_gmbench_fit_with_more_gaussians_than_points_is_one_line_exit_2(gaussians, tmp_path, capsys):
    from gmbench.cli import main

    code = main(["fit", "digits", "-n", gaussians, "--cache-dir", str(tmp_path), "--split", "test", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"n_gaussians (n_components) = {gaussians} is more than the" in err and "use n_gaussians <=" in err
    assert not list(tmp_path.iterdir())  # nothing cached
