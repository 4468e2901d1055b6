"""Fitting-error metrics: sampled RMSE (Table 10) and the exact L2 distance."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from gmbench import metrics
from gmbench import mixture as gm


def random_mixture(batch, channels, n, dims, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=dtype)
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.3 + 0.6 * torch.eye(dims, dtype=dtype)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


def test_inner_product_of_two_gaussians_is_a_gaussian_of_the_mean_difference():
    a = random_mixture(1, 1, 1, 3, seed=1)
    b = random_mixture(1, 1, 1, 3, seed=2)
    expected = (
        gm.weights(a)[0, 0, 0] * gm.weights(b)[0, 0, 0]
        * multivariate_normal(
            gm.positions(b)[0, 0, 0].numpy(), (gm.covariances(a) + gm.covariances(b))[0, 0, 0].numpy()
        ).pdf(gm.positions(a)[0, 0, 0].numpy())
    )
    assert metrics.inner_products(a, b).item() == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_l2_distance_matches_monte_carlo(dims):
    a = random_mixture(2, 1, 5, dims, seed=3)
    b = random_mixture(2, 1, 4, dims, seed=4)
    exact = metrics.l2_distance(a, b)
    # Importance sampling from a proposal q made of all Gaussians of a and b,
    # widened so that q has heavier tails than (a - b)^2.
    both = torch.cat([a, b], -2)
    n = both.shape[-2]
    proposal = gm.pack(
        torch.full(both.shape[:-1], 1.0 / n, dtype=torch.float64), gm.positions(both), 1.5 * gm.covariances(both)
    )
    points = metrics.sample_points(proposal, 400_000, seed=0)
    ratio = (gm.evaluate(a, points) - gm.evaluate(b, points)).pow(2) / gm.evaluate(proposal, points)
    torch.testing.assert_close(exact.pow(2), ratio.mean(-1), rtol=0.02, atol=0)


def test_l2_distance_of_a_mixture_to_itself_is_zero_and_symmetric():
    a = random_mixture(2, 3, 6, 2, seed=5)
    b = random_mixture(2, 3, 6, 2, seed=6)
    assert metrics.l2_distance(a, a).max() < 1e-6
    torch.testing.assert_close(metrics.l2_distance(a, b), metrics.l2_distance(b, a))
    # Splitting a Gaussian into two halves does not change the function.
    halves = torch.cat([gm.with_weights(a, gm.weights(a) / 2)] * 2, -2)
    assert metrics.l2_distance(a, halves).max() < 1e-6


def test_l2_norm_of_a_single_gaussian_has_the_closed_form():
    # ||w g||^2 = w^2 / sqrt((4 pi)^D det C)
    a = random_mixture(1, 1, 1, 2, seed=7)
    w, cov = gm.weights(a)[0, 0, 0], gm.covariances(a)[0, 0, 0]
    zero = gm.with_weights(a, torch.zeros_like(gm.weights(a)))
    expected = w**2 / math.sqrt((4 * math.pi) ** 2 * torch.linalg.det(cov).item())
    assert metrics.l2_distance(a, zero).item() ** 2 == pytest.approx(expected.item(), rel=1e-12)


def test_sample_points_follow_the_input_gaussians():
    m = gm.pack(
        torch.tensor([[[1.0, 0.0]]], dtype=torch.float64),  # the zero-weight Gaussian is never sampled
        torch.tensor([[[[2.0, -1.0], [50.0, 50.0]]]], dtype=torch.float64),
        torch.tensor([[[[[1.0, 0.3], [0.3, 0.5]], [[1.0, 0.0], [0.0, 1.0]]]]], dtype=torch.float64),
    )
    points = metrics.sample_points(m, 50_000, seed=1)[0, 0].numpy()
    np.testing.assert_allclose(points.mean(0), [2.0, -1.0], atol=0.02)
    np.testing.assert_allclose(np.cov(points.T), [[1.0, 0.3], [0.3, 0.5]], atol=0.03)


def test_rmse_sampled_is_reproducible_by_seed_and_matches_a_direct_computation():
    a = random_mixture(2, 2, 5, 2, seed=8)
    b = random_mixture(2, 2, 3, 2, seed=9)
    first = metrics.rmse_sampled(a, b, n_samples=2000, seed=3)
    torch.testing.assert_close(first, metrics.rmse_sampled(a, b, n_samples=2000, seed=3))
    assert (first - metrics.rmse_sampled(a, b, n_samples=2000, seed=4)).abs().max() > 0
    points = metrics.sample_points(a, 2000, seed=3)
    direct = (gm.evaluate(a, points) - gm.evaluate(b, points)).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(first, direct)
    assert metrics.rmse_sampled(a, a, n_samples=500).max() < 1e-12


def test_rmse_sampled_accepts_a_target_function():
    a = random_mixture(1, 2, 5, 2, seed=10)
    relu_fit = gm.with_weights(a, gm.weights(a).clamp_min(0))
    error = metrics.rmse_sampled(metrics.relu_of(a), relu_fit, sample_from=a, n_samples=3000)
    points = metrics.sample_points(a, 3000, seed=0)
    direct = (gm.evaluate(a, points).clamp_min(0) - gm.evaluate(relu_fit, points)).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(error, direct)


def test_fitting_errors_report_the_three_table_10_figures():
    m_in = random_mixture(1, 2, 6, 2, seed=11)
    positive = gm.with_weights(m_in, gm.weights(m_in).abs())
    # Exact ReLU (an all-positive input is its own ReLU) and exact reduction.
    errors = metrics.fitting_errors(positive, positive, positive, n_samples=1000)
    assert set(errors) == {"all", "relu", "reduction", "reduction_l2"}
    assert max(errors.values()) < 1e-6
    reduced = positive[..., :3, :]
    errors = metrics.fitting_errors(positive, positive, reduced, n_samples=20_000, seed=2)
    assert errors["relu"] < 1e-9
    assert errors["all"] == pytest.approx(errors["reduction"])
    assert errors["reduction_l2"] == pytest.approx(metrics.l2_distance(reduced, positive).mean().item())
