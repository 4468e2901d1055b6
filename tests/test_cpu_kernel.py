"""The C++ CPU kernel of the torch backend (`gmbench.backends.cpu_kernel`): values, gradients, fallback."""

import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck

from gmbench import backends
from gmbench import mixture as gm
from gmbench.backends import cpu_kernel
from gmbench.backends.torch import ExpKernelMatVec

pytestmark = pytest.mark.skipif(
    cpu_kernel.load() is None, reason=f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}"
)


def features(groups, m, n, f, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(groups, m, f, generator=g, dtype=dtype)
    A = torch.randn(groups, n, f, generator=g, dtype=dtype) * 0.3
    c = torch.randn(groups, n, generator=g, dtype=dtype)
    X[..., -1] = 1.0
    A[..., -1] -= 6.0  # exponents negative: the clamp at 0 (identity in backward) is not hit
    return X, A, c


@pytest.mark.parametrize("f", [6, 10])
def test_forward_matches_gemm_form_in_float64(f):
    X, A, c = features(3, 37, 300, f)
    expected = ExpKernelMatVec.apply(X, A, c, 50)
    out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 16, 64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f", [6, 10])
def test_float32_exponential_is_accurate(f):
    # The vectorised expf replacement: float32 result within a few ulp of float64.
    X, A, c = features(2, 50, 200, f, seed=1)
    expected = ExpKernelMatVec.apply(X, A, c, 200)
    out = cpu_kernel.CPUExpKernelMatVec.apply(X.float(), A.float(), c.float(), None, 64, 256)
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < 2e-6


@pytest.mark.parametrize("f", [6, 10])
@pytest.mark.parametrize("groups", [1, 5])  # fewer groups than threads: chunked backward path
def test_gradcheck(f, groups):
    X, A, c = (t.requires_grad_() for t in features(groups, 9, 21, f, seed=2))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert gradcheck(lambda X, A, c: cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 4, 8), (X, A, c))
    finally:
        torch.set_num_threads(previous)


def test_gradcheck_with_a_tile_mask():
    X, A, c = (t.requires_grad_() for t in features(2, 10, 20, 10, seed=3))
    mask = (torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.4).to(torch.uint8)
    assert 0 < mask.sum() < mask.numel()
    assert gradcheck(lambda X, A, c: cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, mask, 4, 4), (X, A, c))


def test_tile_mask_drops_exactly_the_masked_pairs():
    X, A, c = features(2, 10, 20, 6, seed=4)
    mask = (torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1)) > 0.5).to(torch.uint8)
    pair_mask = mask.repeat_interleave(4, 1)[:, :10].repeat_interleave(4, 2)[:, :, :20].double()
    expected = ((X @ A.transpose(1, 2)).clamp_max(0).exp() * pair_mask * c[:, None, :]).sum(-1)
    out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, mask, 4, 4)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)


def test_results_do_not_depend_on_the_thread_count():
    X, A, c = (t.requires_grad_() for t in features(3, 40, 90, 10, seed=5))
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 8, 32)
            results.append((out, *torch.autograd.grad(out.sin().sum(), (X, A, c))))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_nan_propagates():
    X, A, c = features(1, 4, 8, 10, seed=6, dtype=torch.float32)
    A[0, 3, 0] = float("nan")
    out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 4, 4)
    assert torch.isnan(out).all()


def test_backend_falls_back_to_gemm_form_without_the_kernel(tmp_path):
    # A fresh process with the kernel disabled: the backend still evaluates, via the GEMM form.
    code = (
        "import torch; from gmbench import mixture as gm, backends\n"
        "from gmbench.backends import cpu_kernel\n"
        "m = gm.pack(torch.ones(1, 1, 1), torch.zeros(1, 1, 1, 2), torch.eye(2).expand(1, 1, 1, 2, 2))\n"
        "print(cpu_kernel.load() is None, cpu_kernel.unavailable_reason())\n"
        "print(float(gm.evaluate_at_centroids(m)))\n"
    )
    env = dict(os.environ, GMBENCH_DISABLE_CPU_KERNEL="1", GMBENCH_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = result.stdout.splitlines()
    assert first == "True disabled by GMBENCH_DISABLE_CPU_KERNEL"
    assert abs(float(second) - 1 / (2 * torch.pi)) < 1e-7


def test_cpp_choice_is_validated_and_gemm_choice_matches():
    g = torch.Generator().manual_seed(7)
    m = gm.pack(
        torch.randn(2, 3, 50, generator=g),
        torch.randn(2, 3, 50, 3, generator=g),
        gm.covariance_from_factor(torch.randn(2, 3, 50, 3, 3, generator=g), 0.05),
    ).double()
    with backends.use("torch", cpu_kernel="cpp"):
        fast = gm.evaluate_at_centroids(m)
    with backends.use("torch", cpu_kernel="gemm"):
        reference = gm.evaluate_at_centroids(m)
    assert torch.allclose(fast, reference, rtol=1e-11, atol=1e-13)
    from gmbench.errors import PluginError

    with pytest.raises(PluginError, match="cpu_kernel must be one of"):
        backends.use("torch", cpu_kernel="openmp")


@pytest.mark.parametrize("sets", [1, 2])
def test_non_contiguous_inputs_match_contiguous_copies(sets):
    # The wrapper packs copies of A and c; the copies must outlive the C call (a freed
    # temporary would be read after its memory was reused).
    X, A, c = features(4, 150, 150, 10, seed=8)
    A_wide = torch.stack([A, -A], -1)[..., 0]  # strided views of the same values
    c_wide = torch.stack([c] * 3, -1)[..., 1] if sets == 1 else torch.stack([c, -c, c], -1)[..., 1:]
    assert not A_wide.is_contiguous() and not c_wide.is_contiguous()
    expected = ExpKernelMatVec.apply(X, A, c_wide.contiguous(), 64)
    for _ in range(3):
        out = cpu_kernel.CPUExpKernelMatVec.apply(X, A_wide, c_wide, None, 64, 256)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)


def matches_gemm_form(f, sets, dtype, last_feature=None, seed=9):
    """Values and gradients of the kernel against the GEMM form (float64), relative to the largest."""
    X, A, c = features(3, 37, 300, f, seed=seed)
    if last_feature is not None:
        X[..., -1] = last_feature
    if sets == 2:
        c = torch.stack([c, c.flip(-1)], -1)
    probe = torch.randn(3, 37, *c.shape[2:], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = []
    for apply, cast in ((lambda *t: ExpKernelMatVec.apply(*t, 64), torch.float64),
                        (lambda *t: cpu_kernel.CPUExpKernelMatVec.apply(*t, None, 16, 64), dtype)):
        leaves = [t.to(cast).requires_grad_() for t in (X, A, c)]
        out = apply(*leaves)
        results.append((out, *torch.autograd.grad((out * probe.to(cast)).sum(), leaves)))
    return [float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())
            for want, got in zip(*results)]


@pytest.mark.parametrize("f", [6, 10])
def test_points_without_a_unit_last_feature(f):
    # The backend's features end in 1 ([x x^T, x, 1]); the kernel takes any value there.
    last = torch.linspace(0.5, 1.5, 37, dtype=torch.float64)[None, :]
    assert max(matches_gemm_form(f, 1, torch.float64, last_feature=last)) < 1e-12
    assert max(matches_gemm_form(f, 2, torch.float64, last_feature=last)) < 1e-12


def test_exponentials_far_below_zero_are_tiny_not_nan():
    X, A, c = features(1, 20, 40, 10, seed=10, dtype=torch.float32)
    A[0, :20, -1] = -1e4  # 2^(-14427): underflows
    A[0, 20:30, -1] = float("-inf")
    out_far = cpu_kernel.CPUExpKernelMatVec.apply(X, A[:, :30], c[:, :30], None, 16, 64)
    assert torch.isfinite(out_far).all() and out_far.abs().max() < 1e-36
    expected = ExpKernelMatVec.apply(X.double(), A[:, 30:].double(), c[:, 30:].double(), 64)
    out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 16, 64)
    assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("flags", [["-DGMBENCH_PORTABLE_EXP"], ["-mno-avx512f"]], ids=["portable-exp", "no-avx512"])
def test_builds_without_the_avx512_exponential_agree(flags, monkeypatch):
    # The exponential without AVX-512 intrinsics (vector-extension code only) and, with
    # -mno-avx512f, 32-byte vectors: both built here and compared against the GEMM form.
    from gmbench.backends.native import NativeLibrary

    variant = NativeLibrary(cpu_kernel.SOURCE_FILE, cpu_kernel._symbols(), cpu_kernel.FLAGS + flags,
                            description="C++ CPU kernel (test build)", fallback="skipping the test")
    library = variant.load()
    if library is None:  # e.g. a compiler without -mno-avx512f, or no compiler at all
        pytest.skip(f"the {' '.join(flags)} build is not possible here: {variant.unavailable_reason()}")
    monkeypatch.setattr(cpu_kernel, "load", lambda: library)
    for f in (6, 10):
        for sets in (1, 2):
            assert max(matches_gemm_form(f, sets, torch.float64)) < 1e-12
            assert max(matches_gemm_form(f, sets, torch.float32)) < 2e-5
    X, A, c = features(1, 4, 8, 10, seed=6, dtype=torch.float32)
    A[0, 3, 0] = float("nan")
    assert torch.isnan(cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 4, 4)).all()


def test_float32_error_is_the_gemm_forms_on_ill_conditioned_mixtures():
    # Random covariance factors give nearly singular covariances: the feature form's terms
    # cancel and its float32 rounding dominates.  The kernel must add nothing to it (scaling
    # the coefficients by log2(e) in float32, or summing the constant term first, doubled it).
    g = torch.Generator().manual_seed(11)
    m = gm.pack(torch.randn(2, 2, 1200, generator=g), torch.randn(2, 2, 1200, 3, generator=g) * 2.0,
                gm.covariance_from_factor(torch.randn(2, 2, 1200, 3, 3, generator=g) * 0.3))
    with backends.use("torch", cpu_kernel="gemm"):
        exact = gm.evaluate_at_centroids(m.double())
        gemm_error = (gm.evaluate_at_centroids(m).double() - exact).abs()
    with backends.use("torch", cpu_kernel="cpp"):
        kernel_error = (gm.evaluate_at_centroids(m).double() - exact).abs()
    assert gemm_error.max() > 1e-4 * exact.abs().max()  # the case is ill-conditioned
    assert kernel_error.max() < 1.25 * gemm_error.max()
    assert kernel_error.mean() < 1.25 * gemm_error.mean()
