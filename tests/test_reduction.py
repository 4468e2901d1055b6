"""Reduction plugins: MEM and TreeHEM (paper Section 4.1, Appendix D)."""

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from gmbench import metrics
from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import PluginError
from gmbench.reduction import em
from gmbench.reduction.morton import morton_codes
from gmbench.reduction.node_fit import single_linkage_labels

# The default implementation (the native kernel where it builds) and the PyTorch reference.
METHODS = [
    ("treehem", {"T": 2}), ("treehem", {"T": 4}), ("mem", {}),
    ("treehem", {"T": 2, "implementation": "torch"}), ("mem", {"implementation": "torch"}),
]
IDS = ["treehem-T2", "treehem-T4", "mem", "treehem-T2-torch", "mem-torch"]


def random_mixture(batch, channels, n, dims, seed=0, dtype=torch.float64, signed=False, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    if signed:
        w = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    else:
        w = torch.rand(batch, channels, n, generator=g, dtype=dtype) + 0.05
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=dtype) * spread
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.4
    f = f + 0.6 * torch.eye(dims, dtype=dtype)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


def mean_position(m):
    return (gm.weights(m).unsqueeze(-1) * gm.positions(m)).sum(-2) / gm.integrate(m).unsqueeze(-1)


def reducer(name, params):
    return plugins.create("reduction", name, **params)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_preserves_mass_and_mean(name, params, dims):
    m = random_mixture(2, 3, 57, dims, seed=dims)
    out = reducer(name, params).reduce(m, 9)
    assert out.shape == (2, 3, 9, gm.n_features(dims))
    torch.testing.assert_close(gm.integrate(out), gm.integrate(m), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean_position(out), mean_position(m), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
@pytest.mark.parametrize("n_out", [1, 2, 3, 7, 16, 31, 39])
def test_reduction_returns_exactly_n_real_gaussians(name, params, n_out):
    m = random_mixture(2, 2, 40, 2, seed=n_out)
    out = reducer(name, params).reduce(m, n_out)
    assert out.shape[-2] == n_out
    assert bool((gm.weights(out) > 0).all())
    assert torch.isfinite(out).all()
    # Covariances stay symmetric positive definite.
    assert bool((torch.linalg.eigvalsh(gm.covariances(out)) > 0).all())


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_fewer_gaussians_than_requested_are_padded_with_zero_weights(name, params):
    m = random_mixture(1, 2, 5, 3)
    out = reducer(name, params).reduce(m, 8)
    torch.testing.assert_close(out[..., :5, :], m)
    assert bool((gm.weights(out)[..., 5:] == 0).all())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_zero_weight_padding_is_ignored(name, params):
    real = random_mixture(1, 1, 20, 2, seed=3)
    padded = gm.pad(real, 50)
    shuffled = padded[..., torch.randperm(50, generator=torch.Generator().manual_seed(1)), :]
    out = reducer(name, params).reduce(shuffled, 6)
    assert int((gm.weights(out) != 0).sum()) == 6
    torch.testing.assert_close(gm.integrate(out), gm.integrate(real))
    # Fewer real Gaussians than requested: all kept, the rest is zero padding.
    out = reducer(name, params).reduce(shuffled, 30)
    assert int((gm.weights(out) != 0).sum()) == 20
    torch.testing.assert_close(gm.integrate(out), gm.integrate(real))


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_batched_mixtures_with_different_real_counts_match_each_alone(name, params):
    # TreeHEM fits only the node prefix that holds real Gaussians (the batch's
    # largest count decides its length): a mixture that is mostly zero padding
    # next to a full one must still get exactly the result it gets alone.
    counts = [70, 9, 33, 6]
    mixtures = [gm.pad(random_mixture(1, 1, c, 3, seed=c), 70)[0, 0] for c in counts]
    batch = torch.stack(mixtures)
    out = reducer(name, params).reduce(batch, 5)
    for mixture, count, got in zip(mixtures, counts, out):
        alone = reducer(name, params).reduce(mixture[:count].unsqueeze(0), 5)[0]
        real = gm.weights(alone) != 0
        torch.testing.assert_close(got[real], alone[real], rtol=1e-9, atol=1e-9)
        assert int((gm.weights(got) != 0).sum()) == 5


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_duplicated_centroids_give_finite_output(name, params):
    base = random_mixture(1, 1, 6, 3, seed=5)
    m = torch.cat([base, base, base], dim=-2)  # every centroid three times
    m.requires_grad_(True)
    out = reducer(name, params).reduce(m, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(gm.integrate(out), gm.integrate(m))
    out.sum().backward()
    assert torch.isfinite(m.grad).all()


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_all_zero_input_gives_an_empty_valid_output(name, params):
    # What the dense ReLU fit returns for an all-negative input.
    m = gm.with_weights(random_mixture(2, 1, 30, 2), torch.zeros(2, 1, 30, dtype=torch.float64))
    m.requires_grad_(True)
    out = reducer(name, params).reduce(m, 5)
    assert out.shape == (2, 1, 5, 7)
    assert torch.isfinite(out).all()
    assert bool((gm.weights(out) == 0).all())
    assert bool((torch.linalg.eigvalsh(gm.covariances(out)) > 0).all())
    out.sum().backward()
    assert torch.isfinite(m.grad).all()


def test_treehem_T2_and_T4_differ():
    m = random_mixture(1, 2, 64, 3, seed=11)
    out2 = reducer("treehem", {"T": 2}).reduce(m, 8)
    out4 = reducer("treehem", {"T": 4}).reduce(m, 8)
    assert (out2 - out4).abs().max() > 1e-3


def _canonical(m):
    """Gaussians sorted by weight, so outputs compare as sets."""
    order = torch.argsort(gm.weights(m), dim=-1)
    return m.gather(-2, order.unsqueeze(-1).expand_as(m))


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_is_invariant_to_permuting_the_input(name, params):
    m = random_mixture(2, 2, 48, 2, seed=7)  # continuous positions: no Morton ties
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    out = reducer(name, params).reduce(m, 10)
    out_perm = reducer(name, params).reduce(m[..., perm, :], 10)
    torch.testing.assert_close(_canonical(out_perm), _canonical(out))


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_is_scale_equivariant(name, params):
    m = random_mixture(1, 2, 40, 3, seed=2)
    factor = torch.tensor(7.5, dtype=torch.float64)
    out = reducer(name, params).reduce(gm.scale(m, factor), 6)
    expected = gm.scale(reducer(name, params).reduce(m, 6), factor)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_gradcheck_float64(name, params):
    m = random_mixture(1, 1, 12, 2, seed=4).requires_grad_(True)
    red = reducer(name, params)
    assert torch.autograd.gradcheck(lambda x: red.reduce(x, 3), (m,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_treehem_gradcheck_3d_with_partial_node():
    # With T = 2 every full node holds 2 Gaussians, so an odd count
    # needs the partial expansion of one node (13 -> 5).
    m = random_mixture(1, 1, 13, 3, seed=9).requires_grad_(True)
    red = reducer("treehem", {"T": 2})
    assert torch.autograd.gradcheck(lambda x: red.reduce(x, 5), (m,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_treehem_recompute_gives_the_same_values_and_gradients():
    m = random_mixture(2, 2, 40, 3, seed=12)
    results = []
    for recompute in (True, False):
        x = m.clone().requires_grad_(True)
        out = reducer("treehem", {"T": 2, "recompute": recompute, "implementation": "torch"}).reduce(x, 7)
        (out * torch.linspace(0.5, 1.5, out.shape[-1], dtype=out.dtype)).sum().backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def keep_largest(m, n):
    order = torch.argsort(gm.weights(m), dim=-1, descending=True)[..., :n]
    return m.gather(-2, order.unsqueeze(-1).expand(*order.shape, m.shape[-1]))


# Regression guards: mean exact L2 error (metrics.l2_distance) of TreeHEM on fixed
# random mixtures, measured when the implementation was written.
# (keep-largest baseline: 7.7257 in 2D, 2.9576 in 3D; MEM: 2.3443 and 1.5396.)
TREEHEM_L2 = {
    (2, 2): 2.1916,
    (2, 4): 2.1920,
    (3, 2): 1.6818,
    (3, 4): 1.6657,
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("T", [2, 4])
def test_treehem_beats_keeping_the_largest_gaussians(dims, T):
    m = random_mixture(4, 4, 128, dims, seed=100 + dims, spread=2.0)
    out = reducer("treehem", {"T": T}).reduce(m, 16)
    error = metrics.l2_distance(out, m).mean().item()
    baseline = metrics.l2_distance(keep_largest(m, 16), m).mean().item()
    assert error < 0.6 * baseline
    assert error == pytest.approx(TREEHEM_L2[(dims, T)], rel=0.01)


def test_mem_beats_keeping_the_largest_gaussians():
    m = random_mixture(4, 4, 128, 3, seed=103, spread=2.0)
    error = metrics.l2_distance(reducer("mem", {}).reduce(m, 16), m).mean().item()
    baseline = metrics.l2_distance(keep_largest(m, 16), m).mean().item()
    assert error < baseline


def test_m_step_merges_by_moment_matching():
    # All responsibility on one fitting Gaussian: the M step is the moment match
    # of the weighted Gaussians (Eq. 16).
    target = random_mixture(1, 1, 3, 2, seed=1)[0]  # [1, 3, K]
    w = gm.weights(target)[0]
    mu = gm.positions(target)[0]
    cov = gm.covariances(target)[0]
    r = torch.tensor([[[1.0], [1.0], [1.0]]], dtype=torch.float64)
    merged, nonzero = em.m_step(target, r, target[:, :1])
    mean = (w[:, None] * mu).sum(0) / w.sum()
    second = sum(w[i] * (cov[i] + torch.outer(mu[i] - mean, mu[i] - mean)) for i in range(3)) / w.sum()
    assert bool(nonzero.all())
    torch.testing.assert_close(gm.weights(merged)[0, 0], w.sum())
    torch.testing.assert_close(gm.positions(merged)[0, 0], mean)
    torch.testing.assert_close(gm.covariances(merged)[0, 0], second)


def test_e_step_matches_preiner_likelihood_by_hand():
    from scipy.stats import multivariate_normal

    target = random_mixture(1, 1, 4, 2, seed=2)[0]
    fitting = target[:, [0, 2]]
    valid_t = torch.ones(1, 4, dtype=torch.bool)
    valid_f = torch.ones(1, 2, dtype=torch.bool)
    r = em.responsibilities(target, valid_t, fitting, valid_f, virtual_points=4.0, kl_threshold=None)
    w = gm.weights(target)[0].numpy()
    mu, cov = gm.positions(target)[0].numpy(), gm.covariances(target)[0].numpy()
    expected = torch.zeros(4, 2, dtype=torch.float64)
    for i in range(4):
        w_hat = 4.0 * w[i] / w.sum()
        for j, s in enumerate([0, 2]):
            g = multivariate_normal(mu[s], cov[s]).pdf(mu[i])
            trace = (torch.linalg.inv(torch.tensor(cov[s])) @ torch.tensor(cov[i])).trace().item()
            expected[i, j] = (g * torch.exp(torch.tensor(-0.5 * trace)).item()) ** w_hat * w[s]
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(r[0], expected)


def test_morton_codes_interleave_bits():
    # 2 bits per axis on a 4 x 4 grid spanning the box: axis 0 takes the higher bit.
    coords = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [1.0, 2.0]])
    codes = morton_codes(coords.unsqueeze(0), bits=2)[0]
    assert codes.tolist() == [0, 0b1010, 0b0101, 0b1111, 0b0110]


def test_single_linkage_matches_scipy():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(20, 8, 2, generator=g, dtype=torch.float64)
    weights = torch.ones(20, 8, dtype=torch.float64)
    valid = torch.ones(20, 8, dtype=torch.bool)
    labels = single_linkage_labels(points, weights, valid, torch.full((20,), 3))
    for row in range(20):
        reference = fcluster(linkage(points[row].numpy(), "single"), 3, criterion="maxclust")
        ours = labels[row].tolist()
        pairs = [(ours[i] == ours[j]) == (reference[i] == reference[j]) for i in range(8) for j in range(8)]
        assert all(pairs)


def test_single_linkage_never_merges_opposite_signs():
    points = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]]])
    weights = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    labels = single_linkage_labels(points, weights, torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]))
    assert labels[0, 0] != labels[0, 1]
    assert labels[0, 2] == labels[0, 3]


@pytest.mark.parametrize(
    "name,params",
    [("treehem", {"T": 3}), ("treehem", {"T": 1}), ("treehem", {"kl_threshold": -1.0}), ("mem", {"virtual_points": 0})],
)
def test_bad_parameters_raise_plugin_error(name, params):
    with pytest.raises(PluginError, match=name):
        plugins.create("reduction", name, **params)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_bad_component_count_is_rejected(name, params):
    with pytest.raises(ValueError, match="positive integer"):
        reducer(name, params).reduce(random_mixture(1, 1, 4, 2), 0)


def test_treehem_accepts_larger_powers_of_two():
    m = random_mixture(1, 1, 100, 2, seed=8)
    out = reducer("treehem", {"T": 8}).reduce(m, 20)
    assert int((gm.weights(out) > 0).sum()) == 20
    torch.testing.assert_close(gm.integrate(out), gm.integrate(m))


def authors_mhem(weights, positions, covariances, n_components, virtual_points=20.0, eps=1e-5):
    """The authors' Python MHEM (``mhem_fit_a_to_b`` after ``representative_select_for_relu``)
    written independently in NumPy, with their KL gate commented out as in their code:
    the ``n_components`` largest integrals as initial mixture, weights normalised by the
    sum of |integrals| (at least 0.05), Preiner likelihoods to the power of
    ``virtual_points * w_i``, times the fitting weight and the sign match, responsibilities
    normalised by ``max(sum, eps)``, moment-matched M step, weights scaled back."""
    import numpy as np
    from scipy.stats import multivariate_normal

    abs_integral = max(np.abs(weights).sum(), 0.05)
    w = weights / abs_integral
    init = np.argsort(-np.abs(weights), kind="stable")[:n_components]
    w_s = weights[init] / max(np.abs(weights[init]).sum(), 0.05)  # the initial mixture, normalised alike
    likelihood = np.zeros((len(w), n_components))
    for i in range(len(w)):
        for j, s in enumerate(init):
            g = multivariate_normal(positions[s], covariances[s]).pdf(positions[i])
            trace = np.trace(np.linalg.solve(covariances[s], covariances[i]))
            same_sign = np.sign(w[i]) == np.sign(w_s[j])
            likelihood[i, j] = (g * np.exp(-0.5 * trace)) ** (virtual_points * np.abs(w[i])) * np.abs(w_s[j]) * same_sign
    sums = likelihood.sum(1, keepdims=True)
    r = likelihood / np.maximum(sums, eps) * np.abs(w)[:, None]
    new_w = r.sum(0)
    r = r / np.maximum(new_w, eps)
    mu = r.T @ positions
    cov = np.stack([
        sum(r[i, j] * (covariances[i] + np.outer(positions[i] - mu[j], positions[i] - mu[j])) for i in range(len(w)))
        for j in range(n_components)
    ])
    return new_w * np.sign(w_s) * abs_integral, mu, cov, sums


@pytest.mark.parametrize("dims", [2, 3])
def test_mem_without_kl_gate_equals_the_authors_mhem_on_positive_mixtures(dims):
    m = random_mixture(1, 1, 24, dims, seed=40 + dims, spread=0.8)
    weights, positions, covariances = (t[0, 0].numpy() for t in (gm.weights(m), gm.positions(m), gm.covariances(m)))
    expected_w, expected_mu, expected_cov, sums = authors_mhem(weights, positions, covariances, 6)
    assert sums.min() > 1e-5  # their max(sum, 1e-5) clamp is inactive: the comparison is exact
    out = reducer("mem", {"kl_threshold": None}).reduce(m, 6)
    order = [int((gm.positions(out)[0, 0] - torch.tensor(p)).norm(dim=-1).argmin()) for p in expected_mu]
    assert sorted(order) == list(range(6))
    torch.testing.assert_close(gm.weights(out)[0, 0, order], torch.tensor(expected_w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.positions(out)[0, 0, order], torch.tensor(expected_mu), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.covariances(out)[0, 0, order], torch.tensor(expected_cov), rtol=1e-10, atol=1e-10)
    # gmbench's default keeps Preiner's KL gate (its documented choice): a different fit.
    gated = reducer("mem", {}).reduce(m, 6)
    assert (gm.weights(gated) - gm.weights(out)).abs().max() > 1e-6
