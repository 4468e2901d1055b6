"""The mixture core (`gmbench.mixture`) against closed forms, SciPy and numerical integration."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from gmbench import mixture as gm


def random_mixture(batch, channels, n, dims, dtype=torch.float64, seed=0, spread=2.0, eps=0.05):
    """Mixture ``[batch, channels, n, 1+D+D*D]`` with weights of both signs and random SPD covariances."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=dtype) * spread
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.6
    return gm.pack(w, p, gm.covariance_from_factor(f, eps=eps))


def scipy_evaluate(m: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Reference: sum of a_i * multivariate_normal(b_i, C_i).pdf for one mixture ``[N, K]`` at ``[M, D]``."""
    d = gm.n_dims(m)
    m = m.detach().double().numpy()
    total = np.zeros(len(points))
    for g in m:
        total += g[0] * multivariate_normal(g[1 : 1 + d], g[1 + d :].reshape(d, d)).pdf(points)
    return total


# ---------------------------------------------------------------- layout


def test_pack_and_accessors_round_trip():
    w = torch.randn(2, 3, 4)
    p = torch.randn(2, 3, 4, 3)
    c = gm.covariance_from_factor(torch.randn(2, 3, 4, 3, 3))
    m = gm.pack(w, p, c)
    assert m.shape == (2, 3, 4, 13)
    assert gm.n_dims(m) == 3
    assert torch.equal(gm.weights(m), w)
    assert torch.equal(gm.positions(m), p)
    assert torch.equal(gm.covariances(m), c)
    assert gm.n_features(2) == 7 and gm.n_features(3) == 13


def test_with_weights_keeps_positions_and_covariances():
    m = random_mixture(1, 2, 5, 2)
    new = torch.arange(10.0, dtype=m.dtype).reshape(1, 2, 5)
    m2 = gm.with_weights(m, new)
    assert torch.equal(gm.weights(m2), new)
    assert torch.equal(m2[..., 1:], m[..., 1:])


@pytest.mark.parametrize("dims", [2, 3])
def test_scalar_columns_are_the_weights_positions_and_covariance_entries(dims):
    m = random_mixture(2, 3, 4, dims)
    weight, position, covariance = gm.scalar_columns(m)
    assert torch.equal(weight, gm.weights(m))
    assert torch.equal(torch.stack(position, -1), gm.positions(m))
    assert torch.equal(torch.stack([torch.stack(row, -1) for row in covariance], -2), gm.covariances(m))


def test_with_weights_does_not_touch_its_input_and_passes_gradients_to_both():
    m = random_mixture(1, 2, 5, 2).requires_grad_(True)
    before = m.detach().clone()
    new = torch.randn(1, 2, 5, dtype=m.dtype, requires_grad=True)
    out = gm.with_weights(m, new)
    assert torch.equal(m.detach(), before) and out.data_ptr() != m.data_ptr()
    probe = torch.randn_like(out)
    grad_m, grad_new = torch.autograd.grad((out * probe).sum(), (m, new))
    assert torch.equal(grad_new, probe[..., 0])
    assert torch.equal(grad_m[..., 1:], probe[..., 1:]) and torch.equal(grad_m[..., 0], torch.zeros_like(new))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="7 \\(2D\\) or 13 \\(3D\\)"):
        gm.n_dims(torch.zeros(1, 1, 1, 8))
    with pytest.raises(ValueError, match="2 or 3 coordinates"):
        gm.pack(torch.zeros(1), torch.zeros(1, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="covariances must be"):
        gm.pack(torch.zeros(1), torch.zeros(1, 3), torch.zeros(1, 2, 2))


def test_covariance_from_factor_is_eq9_and_positive_definite():
    factor = torch.randn(50, 3, 3, dtype=torch.float64)
    factor[0] = 0  # a degenerate factor still gives eps * I
    cov = gm.covariance_from_factor(factor, eps=1e-3)
    assert torch.allclose(cov, factor.transpose(-1, -2) @ factor + 1e-3 * torch.eye(3, dtype=torch.float64))
    assert torch.allclose(cov, cov.transpose(-1, -2))
    assert torch.linalg.eigvalsh(cov).min() >= 1e-3 - 1e-12


@pytest.mark.parametrize("dims", [2, 3])
def test_symmetric_inverse_and_logdet_match_linalg(dims):
    cov = gm.covariances(random_mixture(4, 2, 6, dims))
    inverse, logdet = gm.symmetric_inverse_and_logdet(cov)
    assert torch.allclose(inverse, torch.linalg.inv(cov), rtol=1e-10, atol=1e-10)
    assert torch.allclose(logdet, torch.linalg.slogdet(cov).logabsdet, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_shared_points_matches_scipy(dims):
    m = random_mixture(2, 3, 7, dims)
    assert (gm.weights(m) < 0).any() and (gm.weights(m) > 0).any()
    points = torch.randn(11, dims, dtype=torch.float64) * 2.5
    out = gm.evaluate(m, points)
    assert out.shape == (2, 3, 11)
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(out[b, c].numpy(), scipy_evaluate(m[b, c], points.numpy()), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_batched_points_matches_scipy(dims):
    m = random_mixture(3, 2, 5, dims, seed=1)
    points = torch.randn(3, 2, 9, dims, dtype=torch.float64) * 2
    out = gm.evaluate(m, points)
    assert out.shape == (3, 2, 9)
    for b in range(3):
        for c in range(2):
            expected = scipy_evaluate(m[b, c], points[b, c].numpy())
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_float32_matches_scipy(dims):
    m = random_mixture(2, 2, 16, dims, seed=2).float()
    points = (torch.randn(20, dims) * 2).float()
    out = gm.evaluate(m, points)
    assert out.dtype == torch.float32
    for b in range(2):
        for c in range(2):
            expected = scipy_evaluate(m[b, c], points.double().numpy())
            scale = np.abs(expected).max()
            np.testing.assert_allclose(out[b, c].double().numpy(), expected, rtol=0, atol=1e-5 * scale)


def test_evaluate_rejects_mismatched_points():
    m = random_mixture(2, 1, 3, 3)
    with pytest.raises(ValueError, match="coordinates"):
        gm.evaluate(m, torch.zeros(4, 2, dtype=m.dtype))
    with pytest.raises(ValueError, match="do not match"):
        gm.evaluate(m, torch.zeros(3, 1, 4, 3, dtype=m.dtype))


def test_zero_weight_padding_contributes_nothing():
    m = random_mixture(1, 2, 5, 3)
    points = torch.randn(8, 3, dtype=m.dtype)
    padded = gm.pad(m, 9)
    assert padded.shape == (1, 2, 9, 13)
    assert torch.all(gm.weights(padded)[..., 5:] == 0)
    assert torch.allclose(gm.evaluate(padded, points), gm.evaluate(m, points), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_at_centroids_is_evaluate_at_own_positions(dims):
    m = random_mixture(2, 3, 6, dims, seed=3)
    out = gm.evaluate_at_centroids(m)
    assert out.shape == (2, 3, 6)
    for b in range(2):
        for c in range(3):
            expected = scipy_evaluate(m[b, c], gm.positions(m[b, c]).numpy())
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- integrate


def test_integrate_is_sum_of_weights():
    m = random_mixture(2, 3, 4, 3)
    assert torch.allclose(gm.integrate(m), gm.weights(m).sum(-1))


def test_integrate_matches_numerical_integral_2d():
    m = random_mixture(1, 2, 4, 2, spread=1.0, eps=0.3)
    axis = torch.linspace(-12, 12, 481, dtype=torch.float64)
    h = (axis[1] - axis[0]).item()
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    numeric = gm.evaluate(m, grid).sum(-1) * h * h
    assert torch.allclose(numeric, gm.integrate(m), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- convolve


def test_convolve_shapes_and_eq3_parameters():
    data = random_mixture(2, 3, 4, 3, seed=4)
    kernels = random_mixture(5, 3, 2, 3, seed=5)  # [F_o=5, F_i=3, N_k=2, K]
    out = gm.convolve(data, kernels)
    assert out.shape == (2, 5, 3 * 4 * 2, 13)
    # Output Gaussian (i, n, k) of channel o: a*alpha, b+beta, C+Gamma (Eq. 3), ordered input-channel-major.
    b, o, i, n, k = 1, 4, 2, 3, 1
    g = out[b, o, (i * 4 + n) * 2 + k]
    x, y = data[b, i, n], kernels[o, i, k]
    assert torch.allclose(gm.weights(g), gm.weights(x) * gm.weights(y))
    assert torch.allclose(gm.positions(g), gm.positions(x) + gm.positions(y))
    assert torch.allclose(gm.covariances(g), gm.covariances(x) + gm.covariances(y))


def test_convolve_channel_mismatch_is_an_error():
    with pytest.raises(ValueError, match="channels"):
        gm.convolve(random_mixture(1, 2, 3, 2), random_mixture(4, 3, 2, 2))


def test_convolve_matches_numerical_convolution_on_2d_grid():
    # Eq. 4: channel o of the output is sum_i data_i * kernel_{o,i}.
    data = random_mixture(1, 2, 3, 2, seed=6, spread=1.0, eps=0.2)
    kernels = random_mixture(2, 2, 2, 2, seed=7, spread=0.5, eps=0.2)
    out = gm.convolve(data, kernels)

    axis = torch.linspace(-14, 14, 321, dtype=torch.float64)
    h = (axis[1] - axis[0]).item()
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    queries = torch.randn(6, 2, dtype=torch.float64) * 1.5
    data_on_grid = gm.evaluate(data, grid)[0]  # [F_i, G]
    # kernel_{o,i}(x - y) for every query x and grid point y: evaluate at x - grid.
    shifted = (queries[:, None, :] - grid[None, :, :]).reshape(-1, 2)
    kernel_values = gm.evaluate(kernels, shifted).reshape(2, 2, 6, -1)  # [F_o, F_i, Q, G]
    numeric = torch.einsum("ig,oiqg->oq", data_on_grid, kernel_values) * h * h
    analytic = gm.evaluate(out, queries)[0]
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_convolve_matches_monte_carlo_in_3d():
    # (f * g)(x) = sum_j a_j E_{y ~ N(b_j, C_j)}[g(x - y)] for f = sum_j a_j N(b_j, C_j).
    data = random_mixture(1, 1, 3, 3, seed=8, spread=1.0, eps=0.3)
    kernel = random_mixture(1, 1, 2, 3, seed=9, spread=0.5, eps=0.3)
    analytic_mixture = gm.convolve(data, kernel)
    queries = torch.randn(5, 3, dtype=torch.float64)
    analytic = gm.evaluate(analytic_mixture, queries)[0, 0]

    g = torch.Generator().manual_seed(123)
    samples = 200_000
    estimate = torch.zeros(5, dtype=torch.float64)
    standard_error_sq = torch.zeros(5, dtype=torch.float64)
    for j in range(3):
        chol = torch.linalg.cholesky(gm.covariances(data)[0, 0, j])
        y = gm.positions(data)[0, 0, j] + torch.randn(samples, 3, generator=g, dtype=torch.float64) @ chol.T
        values = gm.evaluate(kernel, (queries[:, None, :] - y[None]).reshape(-1, 3))[0, 0].reshape(5, samples)
        a = gm.weights(data)[0, 0, j]
        estimate += a * values.mean(-1)
        standard_error_sq += a**2 * values.var(-1) / samples
    # 5 standard errors: fails with probability < 1e-5 for a correct convolution.
    assert torch.all((analytic - estimate).abs() <= 5 * standard_error_sq.sqrt() + 1e-12)


# ---------------------------------------------------------------- normalize_scale


@pytest.mark.parametrize("dims", [2, 3])
def test_normalize_scale_gives_mean_trace_d(dims):
    m = random_mixture(3, 4, 10, dims, seed=10)
    scaled, factor = gm.normalize_scale(m)
    assert factor.shape == (3, 4)
    assert torch.allclose(gm.mean_covariance_trace(scaled), torch.full((3, 4), float(dims), dtype=m.dtype))
    # Weights (and therefore integrals) are kept; positions scale with s, covariances with s^2.
    assert torch.equal(gm.weights(scaled), gm.weights(m))
    assert torch.allclose(gm.positions(scaled), gm.positions(m) * factor[..., None, None])
    assert torch.allclose(gm.covariances(scaled), gm.covariances(m) * factor[..., None, None, None] ** 2)


def test_normalize_scale_factor_reproduces_the_scaling():
    m = random_mixture(2, 3, 8, 3, seed=11)
    scaled, factor = gm.normalize_scale(m)
    again, same_factor = gm.normalize_scale(m, factor)
    assert same_factor is factor
    assert torch.equal(again, scaled)
    assert torch.allclose(gm.scale(m, factor), scaled)
    # The factor applied to another mixture (e.g. its fitting) scales it consistently.
    other = random_mixture(2, 3, 5, 3, seed=12)
    other_scaled, _ = gm.normalize_scale(other, factor)
    assert torch.allclose(gm.positions(other_scaled), gm.positions(other) * factor[..., None, None])


def test_normalize_scale_is_a_change_of_variables():
    # g_s(s x) = g(x) / s^D for a domain scaling by s with kept weights.
    m = random_mixture(1, 1, 6, 2, seed=13)
    scaled, factor = gm.normalize_scale(m)
    s = factor[0, 0]
    x = torch.randn(7, 2, dtype=m.dtype)
    assert torch.allclose(gm.evaluate(scaled, x * s), gm.evaluate(m, x) / s**2, rtol=1e-10)


def test_check_finite_names_the_problem():
    m = random_mixture(1, 1, 2, 2)
    assert gm.check_finite(m) is m
    m[0, 0, 1, 0] = math.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        gm.check_finite(m, "input")


@pytest.mark.parametrize("d", [2, 3])
def test_quadratic_features_and_coefficients_give_the_log_density_of_a_normalised_gaussian(d):
    """The one form every exponent-as-a-dot-product path uses (EM fitting, the torch backend)."""
    g = torch.Generator().manual_seed(d)
    mean = torch.randn(5, d, generator=g, dtype=torch.float64)
    cov = gm.covariance_from_factor(torch.randn(5, d, d, generator=g, dtype=torch.float64), 0.1)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    precision, logdet = gm.symmetric_inverse_and_logdet(cov)
    expected = torch.distributions.MultivariateNormal(mean, cov).log_prob(x[:, None, :])  # [7, 5]
    with_normaliser = gm.quadratic_features(x) @ gm.quadratic_coefficients(precision, mean, logdet).T
    torch.testing.assert_close(with_normaliser, expected, rtol=1e-12, atol=1e-12)
    exponent_only = gm.quadratic_features(x) @ gm.quadratic_coefficients(precision, mean).T
    torch.testing.assert_close(exponent_only + gm.log_normaliser(logdet, d), expected, rtol=1e-12, atol=1e-12)
