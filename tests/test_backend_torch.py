"""The memory-bounded torch backend (`gmbench.backends.torch`): gradients, tiling, numerics, memory."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch.autograd import gradcheck

from gmbench import backends
from gmbench import mixture as gm
from gmbench.backends import cpu_kernel
from gmbench.backends.torch import ExpKernelMatVec
from gmbench.errors import PluginError
from gmbench.profiling import peak_tensor_bytes

# tile_elements small enough that every GEMM-form evaluation below runs over several tiles of 1-3 Gaussians.
SMALL_TILES = 24


@pytest.fixture(params=["gemm", "cpp"])
def cpu_path(request):
    """Both CPU code paths of the torch backend: the tiled GEMM form and the C++ kernel."""
    if request.param == "cpp" and cpu_kernel.unavailable_reason():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
    return request.param


def mixture_parameters(batch, channels, n, dims, seed=0, spread=1.5):
    """Leaf tensors (weights, positions, covariance factors of Eq. 9) in float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g, dtype=torch.float64)
    p = torch.randn(batch, channels, n, dims, generator=g, dtype=torch.float64) * spread
    f = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=torch.float64) * 0.5
    f = f + torch.eye(dims, dtype=torch.float64) * 0.7  # well-conditioned, so finite differences are accurate
    return [t.requires_grad_() for t in (w, p, f)]


def build(w, p, f):
    return gm.pack(w, p, gm.covariance_from_factor(f, eps=0.05))


def scipy_evaluate(m, points):
    d = gm.n_dims(m)
    m = m.detach().double().numpy()
    return sum(g[0] * multivariate_normal(g[1 : 1 + d], g[1 + d :].reshape(d, d)).pdf(points) for g in m)


# ---------------------------------------------------------------- gradients (float64 finite differences)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck_evaluate_wrt_weights_positions_factors_and_points(dims, cpu_path):
    w, p, f = mixture_parameters(2, 1, 5, dims)
    points = (torch.randn(2, 1, 4, dims, dtype=torch.float64) * 1.5).requires_grad_()
    with backends.use("torch", tile_elements=SMALL_TILES, cpu_kernel=cpu_path) as backend:
        assert backend._tile(2, 4) == 3  # GEMM form: tiles of 3 Gaussians, the loop over tiles is exercised
        assert gradcheck(lambda w, p, f, x: gm.evaluate(build(w, p, f), x), (w, p, f, points))


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck_evaluate_at_centroids(dims, cpu_path):
    w, p, f = mixture_parameters(1, 2, 6, dims, seed=1)
    with backends.use("torch", tile_elements=SMALL_TILES, cpu_kernel=cpu_path):
        assert gradcheck(lambda w, p, f: gm.evaluate_at_centroids(build(w, p, f)), (w, p, f))


def test_gradcheck_evaluate_shared_points(cpu_path):
    w, p, f = mixture_parameters(1, 2, 4, 3, seed=2)
    points = torch.randn(5, 3, dtype=torch.float64).requires_grad_()
    with backends.use("torch", tile_elements=SMALL_TILES, cpu_kernel=cpu_path):
        assert gradcheck(lambda w, p, f, x: gm.evaluate(build(w, p, f), x), (w, p, f, points))


def test_gradcheck_convolve_then_evaluate(cpu_path):
    data = mixture_parameters(1, 2, 3, 2, seed=3)
    kernels = mixture_parameters(2, 2, 2, 2, seed=4, spread=0.5)
    queries = torch.randn(4, 2, dtype=torch.float64)

    def convolved(dw, dp, df, kw, kp, kf):
        return gm.evaluate(gm.convolve(build(dw, dp, df), build(kw, kp, kf)), queries)

    with backends.use("torch", tile_elements=SMALL_TILES, cpu_kernel=cpu_path):
        assert gradcheck(convolved, (*data, *kernels))


def exp_kernel_inputs(features, seed=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2, 5, features, generator=g, dtype=torch.float64)
    A = torch.randn(2, 7, features, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(2, 7, generator=g, dtype=torch.float64)
    # Exponents are clamped at 0; keep them negative so the function is smooth at the test point.
    A[..., -1] -= 5.0
    X[..., -1] = 1.0
    return [t.requires_grad_() for t in (X, A, c)]


def test_gradcheck_gemm_exp_kernel_matvec_with_tiles_of_two():
    assert gradcheck(lambda X, A, c: ExpKernelMatVec.apply(X, A, c, 2), exp_kernel_inputs(4))


@pytest.mark.parametrize("features", [6, 10])  # 2D and 3D quadratic features
def test_gradcheck_cpp_exp_kernel_matvec_with_small_tiles(features):
    if cpu_kernel.unavailable_reason():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
    inputs = exp_kernel_inputs(features)
    # Point tiles of 2 and Gaussian tiles of 3: partial tiles at both edges.
    assert gradcheck(lambda X, A, c: cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 2, 3), inputs)


def test_cpp_kernel_matches_gemm_form_beyond_one_tile():
    # 300 points x 700 Gaussians spans several of the C++ kernel's default 64 x 256 tiles.
    if cpu_kernel.unavailable_reason():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
    w, p, f = mixture_parameters(2, 1, 700, 3, seed=12, spread=3.0)
    points = torch.randn(2, 1, 300, 3, dtype=torch.float64) * 3
    results = {}
    for path in ("gemm", "cpp"):
        with backends.use("torch", cpu_kernel=path):
            out = gm.evaluate(build(w, p, f), points)
            grads = torch.autograd.grad(out.cos().sum(), (w, p, f))
        results[path] = (out, *grads)
    for a, b in zip(results["gemm"], results["cpp"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * a.abs().max().item())


def test_gradient_is_correct_in_float32_too(cpu_path):
    w, p, f = mixture_parameters(1, 1, 40, 3, seed=6)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (w, p, f)]
        with backends.use("torch", tile_elements=100, cpu_kernel=cpu_path):
            gm.evaluate_at_centroids(build(*leaves)).square().sum().backward()
        grads[dtype] = [t.grad.double() for t in leaves]
    for g64, g32 in zip(grads[torch.float64], grads[torch.float32]):
        assert torch.allclose(g32, g64, rtol=1e-3, atol=1e-4 * g64.abs().max().item())


# ---------------------------------------------------------------- tiling


def test_gemm_results_do_not_depend_on_tile_size():
    w, p, f = mixture_parameters(2, 3, 33, 3, seed=7)
    m = build(w, p, f)
    results = []
    for tile_elements in (1, 2 * 3 * 33 * 5, 1 << 22):
        with backends.use("torch", tile_elements=tile_elements, cpu_kernel="gemm"):
            out = gm.evaluate_at_centroids(m)
            (grad,) = torch.autograd.grad(out.sin().sum(), p)
        results.append((out, grad))
    for out, grad in results[1:]:
        assert torch.allclose(out, results[0][0], rtol=1e-12, atol=1e-15)
        assert torch.allclose(grad, results[0][1], rtol=1e-10, atol=1e-12)


def test_backend_parameters_are_validated():
    with pytest.raises(PluginError, match="tile_elements must be positive"):
        backends.use("torch", tile_elements=0)
    with pytest.raises(PluginError, match="compute_dtype"):
        backends.use("torch", compute_dtype="float16")
    with pytest.raises(PluginError, match="cpu_kernel must be one of"):
        backends.use("torch", cpu_kernel="fortran")
    with pytest.raises(PluginError, match="unknown backend plugin 'nope'"):
        backends.use("nope")


def test_use_as_context_manager_restores_previous_backend():
    before = backends.active()
    with backends.use("torch", tile_elements=7) as inner:
        assert backends.active() is inner
        assert inner.tile_elements == 7
    assert backends.active() is before


# ---------------------------------------------------------------- numerics


def _relative_error(out, expected):
    return np.abs(out - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_float32_far_from_origin_is_as_accurate_as_at_origin(offset, cpu_path):
    # Centring on the mixture's mean keeps float32 accurate far from the origin.  The
    # reference uses exactly the float32 inputs, so only the computation is tested.
    g = torch.Generator().manual_seed(8)
    p = torch.randn(1, 1, 30, 3, generator=g, dtype=torch.float64) * 2 + offset
    f = torch.randn(1, 1, 30, 3, 3, generator=g, dtype=torch.float64) * 0.5
    m = gm.pack(torch.randn(1, 1, 30, generator=g, dtype=torch.float64), p, gm.covariance_from_factor(f, 1e-2))
    m32 = m.float()
    points = (gm.positions(m32)[0, 0].double() + torch.randn(30, 3, generator=g, dtype=torch.float64) * 0.5).float()
    with backends.use("torch", cpu_kernel=cpu_path):
        out = gm.evaluate(m32, points)[0, 0].double().numpy()
    assert _relative_error(out, scipy_evaluate(m32[0, 0], points.double().numpy())) < 1e-4


def _thin_mixture(smallest_variance, n=20, seed=9):
    """Covariances with eigenvalues (1, 1, smallest_variance) in random orientations, and query
    points half a unit along a wide axis and about one standard deviation along the thin axis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([1.0, 1.0, smallest_variance], dtype=torch.float64)
    cov = q @ torch.diag_embed(eigenvalues.expand(n, 3)) @ q.transpose(-1, -2)
    cov = (cov + cov.transpose(-1, -2)) / 2
    w = torch.randn(1, 1, n, generator=g, dtype=torch.float64)
    p = torch.randn(1, 1, n, 3, generator=g, dtype=torch.float64)
    m = gm.pack(w, p, cov[None, None]).float()
    points = gm.positions(m)[0, 0].double() + q[..., :, 0] * 0.5
    points = points + q[..., :, 2] * smallest_variance**0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return m, points.float()


def test_float32_nearly_singular_covariance_condition_1e3(cpu_path):
    m, points = _thin_mixture(1e-3)
    with backends.use("torch", cpu_kernel=cpu_path):
        out = gm.evaluate(m, points)[0, 0].double().numpy()
    assert _relative_error(out, scipy_evaluate(m[0, 0], points.double().numpy())) < 2e-3


@pytest.mark.parametrize("smallest_variance", [1e-5, 1e-7])
def test_compute_dtype_float64_handles_condition_beyond_float32(smallest_variance, cpu_path):
    # float32 arithmetic loses about eps32 * cond in the exponent (documented); float64
    # compute on the same float32 inputs recovers the exact values and returns float32.
    m, points = _thin_mixture(smallest_variance)
    expected = scipy_evaluate(m[0, 0], points.double().numpy())
    with backends.use("torch", compute_dtype="float64", cpu_kernel=cpu_path):
        out = gm.evaluate(m, points)[0, 0]
    assert out.dtype == torch.float32
    assert _relative_error(out.double().numpy(), expected) < 1e-6


def test_exponent_clamp_never_exceeds_the_peak(cpu_path):
    # At its own centre an isolated Gaussian evaluates to exactly its peak, not above it.
    m = gm.pack(
        torch.ones(1, 1, 1), torch.full((1, 1, 1, 3), 1e4), torch.eye(3).expand(1, 1, 1, 3, 3) * 1e-3
    )
    peak = gm.normalisation_factors(m)
    with backends.use("torch", cpu_kernel=cpu_path):
        assert torch.allclose(gm.evaluate_at_centroids(m), peak, rtol=1e-6)


# ---------------------------------------------------------------- memory


def _centroid_forward_backward(n, dense=False):
    w, p, f = (t.detach().float().requires_grad_() for t in mixture_parameters(1, 1, n, 3, seed=10, spread=3.0))

    def run():
        m = build(w, p, f)
        if dense:  # the naive O(N^2) autograd graph, to check that the measurement sees it
            precision, logdet = gm.symmetric_inverse_and_logdet(gm.covariances(m))
            diff = gm.positions(m)[..., :, None, :] - gm.positions(m)[..., None, :, :]
            quad = (diff.unsqueeze(-2) @ precision[..., None, :, :, :] @ diff.unsqueeze(-1))[..., 0, 0]
            out = (gm.weights(m)[..., None, :] * torch.exp(-0.5 * quad - 0.5 * logdet[..., None, :])).sum(-1)
        else:
            out = gm.evaluate_at_centroids(m)
        out.square().sum().backward()

    return run


def test_peak_memory_measurement_sees_a_dense_implementation():
    n = 1024
    assert peak_tensor_bytes(_centroid_forward_backward(n, dense=True)) > 4 * n * n * 4


def test_evaluate_at_centroids_forward_backward_memory_stays_far_below_n_squared(cpu_path):
    n = 8192
    n_squared_bytes = n * n * 4  # one float32 N x N matrix: 256 MiB; a naive autograd graph keeps several
    with backends.use("torch", cpu_kernel=cpu_path):
        peak = peak_tensor_bytes(_centroid_forward_backward(n))
    assert peak < n_squared_bytes / 4, f"peak {peak / 2**20:.1f} MiB"


def test_saved_for_backward_is_linear_in_n(cpu_path):
    saved = []

    def pack_hook(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    n = 4096
    w, p, f = mixture_parameters(1, 1, n, 3, seed=11)
    with backends.use("torch", cpu_kernel=cpu_path):
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
            gm.evaluate_at_centroids(build(w, p, f)).sum()
    # A few hundred bytes per Gaussian (parameters, features, coefficients), not N per Gaussian.
    assert 0 < sum(saved) < 1000 * n


# ---------------------------------------------------------------- CUDA (runs where a GPU is present)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_values_and_gradients(dtype):
    w, p, f = mixture_parameters(2, 3, 300, 3, seed=13, spread=3.0)
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (w, p, f)]
        with backends.use("torch", tile_elements=50_000):  # several tiles on the GPU path
            out = gm.evaluate_at_centroids(build(*leaves))
            out.square().sum().backward()
        assert out.device.type == device and out.dtype == dtype
        results[device] = [out.detach().cpu()] + [t.grad.cpu() for t in leaves]
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(results["cpu"], results["cuda"]):
        assert torch.allclose(b, a, rtol=tolerance, atol=tolerance * a.abs().max().item())


# ---------------------------------------------------------------- weight sets (the dense fit's shared pass)


def weight_sets(w, n_sets, seed=11):
    """``[..., N, n_sets]``: the mixture's own weights first, then random ones (differentiable in ``w``)."""
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(*w.shape, n_sets - 1, generator=g, dtype=w.dtype)
    return torch.cat([w.unsqueeze(-1), extra * w.detach().abs().unsqueeze(-1) + w.unsqueeze(-1) ** 2], -1)


@pytest.mark.parametrize("n_sets", [1, 2, 3])
def test_weight_sets_equal_separate_evaluations_values_and_gradients(cpu_path, n_sets):
    w, p, f = mixture_parameters(2, 2, 150, 3, seed=12, spread=3.0)

    def shared(w, p, f):
        return gm.evaluate_weight_sets_at_centroids(build(w, p, f), weight_sets(w, n_sets))

    def separate(w, p, f):
        m = build(w, p, f)
        return torch.stack([gm.evaluate_at_centroids(gm.with_weights(m, s)) for s in weight_sets(w, n_sets).unbind(-1)], -1)

    with backends.use("torch", tile_elements=SMALL_TILES * 10, cpu_kernel=cpu_path):
        got = shared(w, p, f)
        expected = separate(w, p, f)
        assert got.shape == (2, 2, 150, n_sets)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        probe = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(13))
        grads = torch.autograd.grad((got * probe).sum(), (w, p, f))
        expected_grads = torch.autograd.grad((expected * probe).sum(), (w, p, f))
    for g_, e in zip(grads, expected_grads):
        torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_sets", [2, 3])
def test_weight_sets_with_cutoff_stay_within_its_error_bound(cpu_path, n_sets):
    # The tile mask serves all sets at once (its threshold uses the largest peak of any
    # set), so the bound of docs/backends.md holds for every set: N * cutoff * max |c|.
    tolerance = 1e-3
    w, p, f = mixture_parameters(2, 2, 150, 3, seed=12, spread=8.0)
    m, sets = build(w, p, f).detach(), weight_sets(w, n_sets).detach()
    with backends.use("torch", cpu_kernel=cpu_path):
        exact = gm.evaluate_weight_sets_at_centroids(m, sets)
    with backends.use("torch", cpu_kernel=cpu_path, cutoff=tolerance):
        truncated = gm.evaluate_weight_sets_at_centroids(m, sets)
    peak = (sets * gm.normalisation_factors(gm.with_weights(m, torch.ones_like(w))).unsqueeze(-1)).abs()
    bound = 150 * tolerance * peak.amax((-2, -1), keepdim=True)
    assert bool(((truncated - exact).abs() <= bound).all())
    assert bool(((truncated - exact).abs() > 0).any())  # the cut-off did drop pairs


@pytest.mark.parametrize("cutoff", [None, 1e-3])
def test_gradcheck_weight_sets_at_centroids(cpu_path, cutoff):
    w, p, f = mixture_parameters(1, 2, 6, 2, seed=14)
    sets = torch.randn(1, 2, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(15)).requires_grad_()
    with backends.use("torch", tile_elements=SMALL_TILES, cpu_kernel=cpu_path, cutoff=cutoff):
        assert gradcheck(lambda w, p, f, s: gm.evaluate_weight_sets_at_centroids(build(w, p, f), s), (w, p, f, sets))


def test_weight_sets_must_match_the_mixtures():
    m = build(*mixture_parameters(1, 2, 6, 2))
    with pytest.raises(ValueError, match=r"weight sets \(1, 2, 5, 2\) do not match mixtures"):
        gm.evaluate_weight_sets_at_centroids(m, torch.ones(1, 2, 5, 2, dtype=m.dtype))


def test_weight_sets_fall_back_to_one_evaluation_per_set_on_backends_without_them(monkeypatch):
    from gmbench.backends.torch import TorchBackend

    class Minimal:  # a third-party backend with only the required methods
        inner = TorchBackend(cpu_kernel="gemm")
        calls = 0

        def evaluate_at_centroids(self, m):
            Minimal.calls += 1
            return self.inner.evaluate_at_centroids(m)

    m = build(*mixture_parameters(1, 1, 9, 3, seed=16))
    sets = weight_sets(gm.weights(m).detach(), 3)
    expected = TorchBackend(cpu_kernel="gemm").evaluate_weight_sets_at_centroids(m, sets)
    monkeypatch.setattr(backends, "active", lambda: Minimal())
    torch.testing.assert_close(gm.evaluate_weight_sets_at_centroids(m, sets), expected, rtol=1e-12, atol=1e-12)
    assert Minimal.calls == 3


@pytest.mark.parametrize("dims", [2, 3])
def test_centroid_terms_equal_the_generic_coefficients_and_features(dims):
    """The per-column fast path of evaluations at the centres (``centroid_terms``) against
    ``gaussian_coefficients`` + ``quadratic_features``: same values (``P b`` may round
    differently, the generic path forms it with ``bmm``) and the same gradients."""
    from gmbench.backends.torch import centroid_terms, gaussian_coefficients

    w, p, f = mixture_parameters(3, 1, 17, dims, seed=4)
    m = build(w, p + 2.0, f).reshape(3, 17, -1)  # off the origin, so the centre matters
    sets = torch.randn(3, 17, 2, dtype=torch.float64, requires_grad=True)
    centre = gm.positions(m).mean(-2, keepdim=True).detach()
    A_ref, c_ref = gaussian_coefficients(m, centre, sets)
    X_ref = gm.quadratic_features(gm.positions(m) - centre)
    X, A, c = centroid_terms(m, centre, sets)
    assert torch.equal(X, X_ref) and torch.equal(c, c_ref)
    torch.testing.assert_close(A, A_ref, rtol=1e-14, atol=0)
    probes = [torch.randn_like(t) for t in (X, A, c)]
    leaves = (w, p, f, sets)
    grads = torch.autograd.grad(sum((t * r).sum() for t, r in zip((X, A, c), probes)), leaves, retain_graph=True)
    grads_ref = torch.autograd.grad(sum((t * r).sum() for t, r in zip((X_ref, A_ref, c_ref), probes)), leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
