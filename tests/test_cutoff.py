"""The spatial cut-off: pair lists over kd tiles (`cutoff_native`, the CPU path), Morton tile masks
(`cutoff`, the GEMM and Triton paths), both conservative; the error bound on random and fitted mixtures."""

import pytest
import torch
from torch.autograd import gradcheck

from gmbench import backends, plugins
from gmbench import mixture as gm
from gmbench.backends import cutoff, cutoff_native
from gmbench.backends import torch as torch_backend
from gmbench.errors import PluginError

TOLERANCE = 1e-5


def random_mixture(n, dims, seed=0, spread=4.0, groups=2):
    g = torch.Generator().manual_seed(seed)
    return gm.pack(
        torch.randn(groups, n, generator=g, dtype=torch.float64),
        torch.randn(groups, n, dims, generator=g, dtype=torch.float64) * spread,
        gm.covariance_from_factor(torch.randn(groups, n, dims, dims, generator=g, dtype=torch.float64) * 0.5, 0.02),
    )


def pair_contributions(m, points):
    """``[G, M, N]`` |c_j| g_j(x_i) / |c_j| peak-scaled, brute force."""
    precision, _ = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    d = points[:, :, None, :] - gm.positions(m)[:, None, :, :]
    dims = d.shape[-1]
    # The quadratic form term by term (D^2 elementwise products): einsum contracts it through
    # a [G, M, N, D] intermediate that is ten times slower on fitted layers of 64 x 640 x 640.
    q = sum(d[..., a] * precision[:, None, :, a, b] * d[..., b] for a in range(dims) for b in range(dims))
    return gm.normalisation_factors(m).abs()[:, None, :] * torch.exp(-0.5 * q)


def test_morton_order_follows_the_z_curve_on_a_grid():
    xs, ys = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1)[torch.randperm(16)]
    ordered = points[cutoff.morton_order(points[None])[0]]
    # Z-order with x in the lowest bit: (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) ...
    expected = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1),
                (0, 2), (1, 2), (0, 3), (1, 3), (2, 2), (3, 2), (2, 3), (3, 3)]
    assert [tuple(int(v) for v in p) for p in ordered] == expected


def test_morton_order_keeps_elongated_clusters_contiguous():
    # One scale for all axes: two clusters far apart along x are not interleaved along y.
    g = torch.Generator().manual_seed(0)
    points = torch.randn(1, 200, 2, generator=g)
    points[0, 100:, 0] += 30
    order = cutoff.morton_order(points)[0]
    second = (order >= 100).int()
    assert (second[1:] != second[:-1]).sum() == 1


def test_influence_box_contains_every_point_above_the_threshold():
    m = random_mixture(30, 3, seed=1, spread=1.0)
    peaks = gm.normalisation_factors(m)
    half = cutoff.influence_half_widths(gm.covariances(m), peaks, TOLERANCE)
    points = torch.randn(2, 20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    contribution = pair_contributions(m, points)  # [G, P, N]
    tau = TOLERANCE * peaks.abs().amax(-1)[:, None, None]
    inside = ((points[:, :, None, :] - gm.positions(m)[:, None]).abs() <= half[:, None]).all(-1)
    above = contribution >= tau
    assert above.any() and (~above).any()
    assert not (above & ~inside).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_plan_is_conservative_every_significant_pair_is_evaluated(dims):
    m = random_mixture(300, dims, seed=3, spread=10.0)
    points = torch.randn(2, 250, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 10
    peaks = gm.normalisation_factors(m)
    plan = cutoff.make_plan(points, gm.positions(m), gm.covariances(m), peaks, TOLERANCE, 16, 16)
    assert 0.05 < plan.active_fraction < 0.95  # the test is not vacuous
    contribution = pair_contributions(m, points)
    tau = TOLERANCE * peaks.abs().amax(-1)[:, None, None]
    # Pair (i, j) is evaluated iff its tiles in the sorted orders are active.
    rank_points = torch.argsort(plan.point_order, 1) // 16
    rank_gaussians = torch.argsort(plan.gaussian_order, 1) // 16
    groups = torch.arange(2)[:, None, None]
    evaluated = plan.mask[groups, rank_points[:, :, None], rank_gaussians[:, None, :]].bool()
    assert not ((contribution >= tau) & ~evaluated).any()


@pytest.mark.parametrize("cpu_kernel", ["cpp", "gemm"])
def test_error_is_below_the_stated_bound_on_random_mixtures(cpu_kernel):
    m = random_mixture(500, 3, seed=5)[:, None]
    with backends.use("torch", compute_dtype="float64", cpu_kernel=cpu_kernel):
        exact = gm.evaluate_at_centroids(m)
    with backends.use("torch", compute_dtype="float64", cpu_kernel=cpu_kernel, cutoff=TOLERANCE):
        truncated = gm.evaluate_at_centroids(m)
    peak = gm.normalisation_factors(m).abs().amax(-1, keepdim=True)
    error = ((truncated - exact).abs() / peak).max().item()
    assert 0 < error < 10 * TOLERANCE


@pytest.fixture(scope="module")
def digits_activations():
    """Mixtures a GMCN evaluates: fitted digits inputs and each block's convolution output."""
    split = plugins.create("dataset", "digits", samples_per_class=2, n_points=256).load("test")
    fitter = plugins.create("input_fitting", "kmeans", seed=0)
    inputs = fitter.fit(split.points, 32)
    torch.manual_seed(0)
    model = plugins.create("model", "gmcn", num_classes=10, dims=2, layout="1/32->8/16->10").eval()
    with torch.no_grad(), backends.use("torch"):
        trace = model.trace(inputs)
    normalized, _ = gm.normalize_scale(inputs.double())
    return [normalized] + [block.convolved.double() for block in trace]


def test_error_is_below_the_stated_bound_on_fitted_digits_after_each_layer(digits_activations):
    skipped_somewhere = False
    for m in digits_activations:
        with backends.use("torch", compute_dtype="float64"):
            exact = gm.evaluate_at_centroids(m)
        with backends.use("torch", compute_dtype="float64", cutoff=TOLERANCE) as backend:
            truncated = gm.evaluate_at_centroids(m)
            flat = m.reshape(-1, *m.shape[2:])
            plan = cutoff.make_plan(gm.positions(flat), gm.positions(flat), gm.covariances(flat),
                                    gm.normalisation_factors(flat), TOLERANCE, 16, 16, same_set=True)
        peak = gm.normalisation_factors(m).abs().amax(-1, keepdim=True)
        error = ((truncated - exact).abs() / peak).max().item()
        assert error < 10 * TOLERANCE, f"N={m.shape[2]}: error {error:.2e} x max|c|"
        skipped_somewhere |= plan.active_fraction < 0.9
    assert backend.cutoff == TOLERANCE
    assert skipped_somewhere, "no layer skipped 10% of its tiles: the test would not test the cut-off"


def test_gradients_of_the_truncated_sum_pass_gradcheck():
    # Two well-separated clusters: the mask is the same for every finite-difference step.
    m = random_mixture(40, 2, seed=6, spread=0.7, groups=1)
    shift = torch.zeros_like(gm.positions(m))
    shift[:, 20:, 0] = 40.0
    leaf = gm.pack(gm.weights(m), gm.positions(m) + shift, gm.covariances(m))[:, None].requires_grad_()
    for kernel in ("cpp", "gemm"):
        with backends.use("torch", cpu_kernel=kernel, cutoff=TOLERANCE):
            assert gradcheck(gm.evaluate_at_centroids, (leaf,))


def test_cutoff_parameter_is_validated():
    with pytest.raises(PluginError, match="cutoff must be a relative tolerance"):
        backends.use("torch", cutoff=0.0)
    with pytest.raises(PluginError, match="cutoff must be a relative tolerance"):
        backends.use("torch", cutoff=2.0)


@pytest.mark.parametrize("dims, bits", [(2, 31), (3, 21)])
def test_bit_spreading_matches_the_bit_by_bit_definition(dims, bits):
    values = torch.randint(0, 1 << bits, (1000,), generator=torch.Generator().manual_seed(8))
    expected = torch.zeros_like(values)
    for bit in range(bits):
        expected |= ((values >> bit) & 1) << (bit * dims)
    assert torch.equal(cutoff._spread_bits(values, dims), expected)


needs_pair_lists = pytest.mark.skipif(cutoff_native.load() is None, reason="no C++ compiler for the cut-off kernel")


def listed_pairs(plan, n_gaussians):
    """``[G, M, N]`` bool: the pairs the pair-list plan evaluates."""
    G, M = plan.point_order.shape
    tiles = -(-M // plan.tile_m)
    offsets = torch.as_tensor(plan.offsets).long()
    # List entry k belongs to tile t when offsets[t] <= k < offsets[t + 1]; the last tile's
    # missing rows point at a spare row M, dropped at the end.
    tile = torch.repeat_interleave(torch.arange(G * tiles), offsets[1:] - offsets[:-1])
    rows = torch.nn.functional.pad(plan.point_order.long(), (0, tiles * plan.tile_m - M), value=M)
    listed = torch.zeros(G, M + 1, n_gaussians, dtype=torch.bool)
    gaussians = plan.index[offsets[0] : offsets[-1]].long()
    listed[(tile // tiles)[:, None], rows.view(G * tiles, plan.tile_m)[tile], gaussians[:, None]] = True
    return listed[:, :M]


def plan_listing_every_pair_above_the_threshold(m, points):
    """The pair-list plan of ``points`` against ``m`` and its listed pairs, after asserting that its
    point order is a permutation and that it lists every pair above tau (brute force)."""
    peaks = gm.normalisation_factors(m)
    plan = cutoff_native.make_plan(points, gm.positions(m), gm.covariances(m), peaks, TOLERANCE)
    groups, n_points = points.shape[:2]
    assert torch.equal(plan.point_order.sort(1).values, torch.arange(n_points).expand(groups, -1))
    listed = listed_pairs(plan, m.shape[-2])
    above = pair_contributions(m, points) >= TOLERANCE * peaks.abs().amax(-1)[:, None, None]
    assert not (above & ~listed).any()
    return plan, listed


@needs_pair_lists
@pytest.mark.parametrize("dims", [2, 3])
def test_pair_lists_hold_every_pair_above_the_threshold(dims):
    m = random_mixture(300, dims, seed=3, spread=10.0)
    points = torch.randn(2, 250, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 10
    plan, listed = plan_listing_every_pair_above_the_threshold(m, points)
    assert 0.02 < plan.active_fraction < 0.5  # the test is not vacuous
    assert plan.pairs_evaluated == int(listed.sum())  # tiles are disjoint: no pair is listed twice


@needs_pair_lists
def test_kd_split_of_points_with_repeated_coordinates_gives_a_permutation_and_conservative_lists():
    # The split selects on float keys (ties broken by position): coordinates on a coarse grid repeat
    # along every axis, several points coincide, and two differ only beyond float precision.
    g = torch.Generator().manual_seed(16)
    points = torch.randint(0, 4, (2, 300, 3), generator=g).double()
    points[:, :40] = points[:, :1]  # 40 copies of one point
    points[:, 40, 0] = points[:, 41, 0] + 1e-12
    m = random_mixture(200, 3, seed=17, spread=2.0)
    plan, _ = plan_listing_every_pair_above_the_threshold(m, points)
    assert 0.02 < plan.active_fraction < 0.9  # the test is not vacuous
    # The kd order is spatial: the first half of the tiles and the second are split along one axis
    # (in float: the two points 1e-12 apart may fall on either side).
    ordered = torch.gather(points, 1, plan.point_order[..., None].expand(-1, -1, 3)).float()
    half = 16 * (-(-300 // 16) // 2)
    assert any(bool((ordered[0, :half, d].max() <= ordered[0, half:, d].min())) for d in range(3))


@needs_pair_lists
def test_pair_lists_of_fitted_digits_evaluate_under_half_the_pairs_of_morton_tiles(digits_activations):
    # Measured (tiles of 16 points): 2.8x / 1.6x the pairs above tau at N = 160 / 640; Morton 16 x 16: 6.0x / 3.7x.
    for m in digits_activations[1:]:
        flat = m.reshape(-1, *m.shape[2:])
        positions, peaks = gm.positions(flat), gm.normalisation_factors(flat)
        plan = cutoff_native.make_plan(positions, positions, gm.covariances(flat), peaks, TOLERANCE)
        above = pair_contributions(flat, positions) >= TOLERANCE * peaks.abs().amax(-1)[:, None, None]
        assert not (above & ~listed_pairs(plan, flat.shape[1])).any()
        assert plan.pairs_evaluated < 3 * int(above.sum()), f"N={flat.shape[1]}"
        morton = cutoff.make_plan(positions, positions, gm.covariances(flat), peaks, TOLERANCE, 16, 16, same_set=True)
        assert plan.pairs_evaluated < 0.5 * morton.active_fraction * flat.shape[0] * flat.shape[1] ** 2


@needs_pair_lists
def test_both_weight_sets_share_one_plan_and_stay_within_the_bound():
    m = random_mixture(400, 3, seed=9)[:, None]
    sets = torch.stack([gm.weights(m), gm.weights(m).abs() + 0.1], -1)
    with backends.use("torch", compute_dtype="float64"):
        exact = gm.evaluate_weight_sets_at_centroids(m, sets)
    with backends.use("torch", compute_dtype="float64", cutoff=TOLERANCE):
        truncated = gm.evaluate_weight_sets_at_centroids(m, sets)
    precision_peak = gm.normalisation_factors(m).abs() / gm.weights(m).abs()
    for k in range(2):
        peak = (sets[..., k].abs() * precision_peak).amax(-1, keepdim=True)
        error = ((truncated[..., k] - exact[..., k]).abs() / peak).max().item()
        assert 0 < error < 10 * TOLERANCE


@needs_pair_lists
def test_gradients_of_the_truncated_sum_at_other_points_pass_gradcheck():
    m = random_mixture(30, 3, seed=10, spread=0.7, groups=1)
    shift = torch.zeros_like(gm.positions(m))
    shift[:, 15:, 0] = 40.0
    leaf = gm.pack(gm.weights(m), gm.positions(m) + shift, gm.covariances(m))[:, None].requires_grad_()
    points = (torch.randn(1, 1, 20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 0.7
              ).requires_grad_()
    with backends.use("torch", cpu_kernel="cpp", cutoff=TOLERANCE):
        assert gradcheck(gm.evaluate, (leaf, points))


def test_without_the_pair_list_kernel_the_tile_masks_keep_the_bound(monkeypatch):
    monkeypatch.setattr(cutoff_native, "load", lambda: None)
    m = random_mixture(300, 2, seed=12)[:, None]
    with backends.use("torch", compute_dtype="float64"):
        exact = gm.evaluate_at_centroids(m)
    with backends.use("torch", compute_dtype="float64", cutoff=TOLERANCE):
        truncated = gm.evaluate_at_centroids(m)
    peak = gm.normalisation_factors(m).abs().amax(-1, keepdim=True)
    assert 0 < ((truncated - exact).abs() / peak).max().item() < 10 * TOLERANCE


@needs_pair_lists
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_float_plan_lists_every_pair_above_the_threshold_of_small_gaussians_far_from_the_origin(offset):
    # The plan tests boxes in float: its rounding allowance must hold where coordinates are large
    # against the Gaussians (offset 1e4, standard deviations about 0.1) and at the dense fit's points
    # (the centroids themselves).
    g = torch.Generator().manual_seed(13)
    n = 400
    m = gm.pack(torch.randn(2, n, generator=g, dtype=torch.float64).abs() + 0.1,
                torch.randn(2, n, 3, generator=g, dtype=torch.float64) * 3 + offset,
                gm.covariance_from_factor(torch.randn(2, n, 3, 3, generator=g, dtype=torch.float64) * 0.1, 1e-3))
    positions, peaks = gm.positions(m), gm.normalisation_factors(m)
    plan = cutoff_native.make_plan(positions, positions, gm.covariances(m), peaks, TOLERANCE)
    listed = listed_pairs(plan, n)
    above = pair_contributions(m, positions) >= TOLERANCE * peaks.abs().amax(-1)[:, None, None]
    assert 0.01 < plan.active_fraction < 0.5  # the test is not vacuous
    assert not (above & ~listed).any()


@needs_pair_lists
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sets", [1, 2])
@pytest.mark.parametrize("n_points", [250, 245])
def test_pair_list_kernel_matches_the_brute_force_sum_over_the_listed_pairs(sets, dtype, n_points):
    # The last tile is partial: 10 points (without AVX-512 the float32 forward sweeps a tile in halves
    # of 8: a full and a partial half) or 5 (one partial half); the kernel reads rows through the plan's
    # order.  float32 takes the forward vectorised over each tile's points (its own exponential) and the
    # backward over the same coefficient rows (transposed 16 Gaussians at a time: lists of 1 to 15
    # Gaussians past a multiple of 16 are padded), float64 the gathering ones.
    assert_pair_list_kernel_matches_the_brute_force_sum(sets, dtype, n_points)


@needs_pair_lists
@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2"]], ids=["avx2", "no-avx2"])
def test_pair_list_kernel_builds_for_other_instruction_sets_agree(flags, monkeypatch):
    # Without AVX-512 the plan compacts with AVX2 (or scalar code), the float32 forward sweeps tiles in
    # halves of 8 points and the float32 backward transposes in 8 x 8 blocks (or scalar code).
    from gmbench.backends.native import NativeLibrary

    variant = NativeLibrary(cutoff_native.SOURCE_FILE, cutoff_native._symbols(), cutoff_native.FLAGS + flags,
                            description="C++ cut-off kernel (test build)", fallback="skipping the test")
    library = variant.load()
    if library is None:
        pytest.skip(f"the {' '.join(flags)} build is not possible here: {variant.unavailable_reason()}")
    monkeypatch.setattr(cutoff_native, "load", lambda: library)
    for dtype in (torch.float32, torch.float64):
        for sets in (1, 2):
            assert_pair_list_kernel_matches_the_brute_force_sum(sets, dtype, 245)


def assert_pair_list_kernel_matches_the_brute_force_sum(sets, dtype, n_points):
    g = torch.Generator().manual_seed(14)
    m = random_mixture(300, 3, seed=15, spread=6.0)
    points = torch.randn(2, n_points, 3, dtype=torch.float64, generator=g) * 6
    peaks = gm.normalisation_factors(m)
    plan = cutoff_native.make_plan(points, gm.positions(m), gm.covariances(m), peaks, TOLERANCE)
    centre = gm.positions(m).mean(-2, keepdim=True)
    weight_sets = torch.randn(2, 300, sets, dtype=torch.float64, generator=g)
    A, c = torch_backend.gaussian_coefficients(m, centre, weight_sets)
    X = gm.quadratic_features(points - centre)
    c = c if sets == 2 else c[..., 0]
    X, A, c = (t.clone().requires_grad_() for t in (X, A, c))
    out = cutoff_native.matvec_sets(X.to(dtype), A.to(dtype), c.to(dtype), plan)
    mask = listed_pairs(plan, 300).double()
    e = torch.exp(torch.einsum("gif,gjf->gij", X, A).clamp_max(0)) * mask
    expected = torch.einsum("gij,gjw->giw", e, c.reshape(2, 300, sets)).reshape(out.shape)
    # float32: the feature form's rounding (exponents of several hundred, about 1e-4 absolute), relative
    # to the sum of |terms|; a wrongly included or dropped pair would be of the order of a whole term.
    scale = torch.einsum("gij,gjw->giw", e, c.reshape(2, 300, sets).abs()).reshape(out.shape)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-3
    floor = 0.0 if dtype == torch.float64 else 1e-35 * float(c.detach().abs().max())  # float exp(q < -87) is 1e-38, not 0
    assert ((out.double() - expected).abs() <= tolerance * scale + floor).all()
    assert (mask.sum() > 0) and (out != 0).any()
    upstream = torch.randn_like(expected)
    got = torch.autograd.grad(out, (X, A, c), upstream.to(dtype))
    want = torch.autograd.grad(expected, (X, A, c), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-10 if dtype == torch.float64 else 2e-3,
                                   atol=1e-12 if dtype == torch.float64 else 2e-3 * float(b.abs().max()))
