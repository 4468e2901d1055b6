"""Gradients of the C++ CPU kernel's blocked backward against the GEMM form (backends/torch.py).

The backward takes points in blocks of 8 against chunks of 512 Gaussians;
these cases cut both unevenly (37 points, 1100 Gaussians), with one and two
weight sets, 2D and 3D features, float64 and float32, with a tile mask.
"""

import pytest
import torch

from gmbench.backends import cpu_kernel
from gmbench.backends.torch import ExpKernelMatVec

pytestmark = pytest.mark.skipif(
    cpu_kernel.load() is None, reason=f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}"
)


def features(groups, m, n, f, sets, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(groups, m, f, generator=g, dtype=dtype)
    A = torch.randn(groups, n, f, generator=g, dtype=dtype) * 0.3
    c = torch.randn(groups, n, *((sets,) if sets > 1 else ()), generator=g, dtype=dtype)
    X[..., -1] = 1.0
    A[..., -1] -= 6.0  # exponents negative: the clamp at 0 is not hit
    return X, A, c


def gradients(apply, X, A, c, seed=1):
    leaves = [t.clone().requires_grad_(True) for t in (X, A, c)]
    out = apply(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weight.to(out.dtype)).sum().backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sets", [1, 2])
@pytest.mark.parametrize("f", [6, 10])
@pytest.mark.parametrize("groups", [1, 3])  # fewer than 4 groups per thread: mixtures split into summed chunks
def test_blocked_backward_matches_gemm_form(dtype, sets, f, groups):
    X, A, c = features(groups, 37, 1100, f, sets)
    expected = gradients(lambda X, A, c: ExpKernelMatVec.apply(X, A, c, 128), X, A, c)
    got = gradients(lambda X, A, c: cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 16, 64), X.to(dtype),
                    A.to(dtype), c.to(dtype))
    tolerance = 1e-11 if dtype == torch.float64 else 2e-5
    for g_expected, g_got in zip(expected, got):
        scale = g_expected.abs().max()
        assert ((g_got.double() - g_expected).abs().max() / scale) < tolerance


@pytest.mark.parametrize("sets", [1, 2])
def test_blocked_backward_skips_exactly_the_masked_tiles(sets):
    X, A, c = features(2, 37, 1100, 10, sets, seed=3)
    tile_m, tile_n = 16, 64
    mask = torch.rand(2, 3, 18, generator=torch.Generator().manual_seed(4)) > 0.4
    # The same sum with the masked pairs' coefficients zeroed, per point tile, in the GEMM form.
    rows = []
    for pt in range(3):
        keep = mask[:, pt].repeat_interleave(tile_n, dim=1)[:, :1100].to(c.dtype)
        c_pt = c * (keep if sets == 1 else keep.unsqueeze(-1))
        rows.append(ExpKernelMatVec.apply(X[:, pt * tile_m : (pt + 1) * tile_m], A, c_pt, 128))
    expected_out = torch.cat(rows, 1)
    out = cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, mask, tile_m, tile_n)
    torch.testing.assert_close(out, expected_out, rtol=1e-11, atol=1e-11)
    # Gradient w.r.t. X: masked pairs contribute nothing.
    Xg = X.clone().requires_grad_(True)
    cpu_kernel.CPUExpKernelMatVec.apply(Xg, A, c, mask, tile_m, tile_n).sum().backward()
    Xr = X.clone().requires_grad_(True)
    rows = []
    for pt in range(3):
        keep = mask[:, pt].repeat_interleave(tile_n, dim=1)[:, :1100].to(c.dtype)
        c_pt = c * (keep if sets == 1 else keep.unsqueeze(-1))
        rows.append(ExpKernelMatVec.apply(Xr[:, pt * tile_m : (pt + 1) * tile_m], A, c_pt, 128))
    torch.cat(rows, 1).sum().backward()
    torch.testing.assert_close(Xg.grad, Xr.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("groups", [1, 3, 13])  # split into chunks (1, 3) or one work item per mixture (13)
def test_backward_is_bitwise_reproducible_with_more_threads_than_cores(threads, groups):
    # Work items are handed out dynamically; a split mixture's chunk sums are added in
    # chunk order, not in the order threads finish, so repeated runs agree bit for bit.
    X, A, c = features(groups, 150, 700, 10, 1, seed=7, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        runs = [gradients(lambda X, A, c: cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, 16, 64), X, A, c)
                for _ in range(6)]
    finally:
        torch.set_num_threads(previous)
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)
    expected = gradients(lambda X, A, c: ExpKernelMatVec.apply(X, A, c, 128), X.double(), A.double(), c.double())
    for g_expected, g_got in zip(expected, runs[0]):
        assert ((g_got.double() - g_expected).abs().max() / g_expected.abs().max()) < 2e-5
