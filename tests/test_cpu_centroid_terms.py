"""The C++ form of the evaluation's inputs (`cpu_kernel.CPUCentroidTerms`) against the PyTorch form
(`gmbench.backends.torch.centroid_terms`): values, gradients, float64 gradcheck, degenerate covariances."""

import pytest
import torch
from torch.autograd import gradcheck

from gmbench import mixture as gm
from gmbench.backends import cpu_kernel
from gmbench.backends.torch import TorchBackend, centroid_terms

pytestmark = pytest.mark.skipif(
    cpu_kernel.load() is None, reason=f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}"
)


def mixtures(groups, n, dims, seed=0, dtype=torch.float64):
    """``[G, N, K]`` with SPD covariances (Eq. 9 factors), off the origin; the centre of each mixture."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(groups, n, dims, dims, generator=g, dtype=dtype) * 0.5
    m = gm.pack(
        torch.randn(groups, n, generator=g, dtype=dtype),
        torch.randn(groups, n, dims, generator=g, dtype=dtype) + 2.0,
        gm.covariance_from_factor(factor),
    )
    return m, gm.positions(m).mean(-2, keepdim=True)


def weight_sets(m, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*m.shape[:-1], count, generator=g, dtype=m.dtype)


def gradients(terms, m, centre, sets, probes):
    """Gradients of ``sum(terms(m, centre, sets) * probes)`` w.r.t. ``m`` (and ``sets``)."""
    m = m.detach().clone().requires_grad_()
    sets = None if sets is None else sets.detach().clone().requires_grad_()
    outputs = terms(m, centre, sets)
    leaves = [m] if sets is None else [m, sets]
    return torch.autograd.grad(sum((t * p).sum() for t, p in zip(outputs, probes)), leaves)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sets", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_equal_the_pytorch_form(dims, sets, dtype):
    m, centre = mixtures(3, 41, dims, dtype=dtype)
    s = weight_sets(m, sets) if sets else None
    expected = centroid_terms(m, centre, s)
    got = cpu_kernel.CPUCentroidTerms.apply(m, centre, s)
    # The same operations in the same order (no contraction into fused multiply-adds): X and A
    # are bit-identical; c goes through the C library's exp and log instead of PyTorch's.
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got[2], expected[2], rtol=rtol, atol=0)

    probes = [torch.randn_like(t) for t in expected]
    reference = gradients(centroid_terms, m, centre, s, probes)
    for g, g_ref in zip(gradients(cpu_kernel.CPUCentroidTerms.apply, m, centre, s, probes), reference):
        scale = g_ref.abs().max()
        assert ((g - g_ref).abs().max() / scale) < (1e-13 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sets", [0, 2])
def test_gradcheck(dims, sets):
    m, centre = mixtures(2, 7, dims, seed=3)
    m.requires_grad_()
    s = weight_sets(m, sets).requires_grad_() if sets else None
    # Every output, every input: the covariance's lower triangle gets no gradient, as in the PyTorch form.
    assert gradcheck(lambda m, s: cpu_kernel.CPUCentroidTerms.apply(m, centre, s), (m, s))


def test_only_the_upper_triangle_of_a_covariance_gets_a_gradient():
    m, centre = mixtures(1, 5, 3, seed=5)
    m.requires_grad_()
    X, A, c = cpu_kernel.CPUCentroidTerms.apply(m, centre, None)
    (X.sum() + A.sum() + c.sum()).backward()
    lower = [1 + 3 + r * 3 + k for r in range(3) for k in range(r)]
    upper = [1 + 3 + r * 3 + k for r in range(3) for k in range(r, 3)]
    assert torch.all(m.grad[..., lower] == 0) and torch.all(m.grad[..., upper] != 0)


def test_singular_and_nan_covariances_behave_as_in_the_pytorch_form():
    m, centre = mixtures(1, 4, 3, seed=6)
    m = m.clone()
    m[0, 1, 4:] = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=m.dtype)  # det 0: clamped
    m[0, 2, 4] = float("nan")
    probes = [torch.randn(1, 4, 10, dtype=m.dtype), torch.randn(1, 4, 10, dtype=m.dtype), torch.randn(1, 4, dtype=m.dtype)]
    expected = centroid_terms(m, centre)
    got = cpu_kernel.CPUCentroidTerms.apply(m, centre, None)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0, equal_nan=True)
    reference = gradients(centroid_terms, m, centre, None, probes)[0]
    torch.testing.assert_close(gradients(cpu_kernel.CPUCentroidTerms.apply, m, centre, None, probes)[0], reference,
                               rtol=1e-12, atol=0, equal_nan=True)
    # NaN stays in its own Gaussian; the others keep finite gradients.
    assert torch.isnan(reference[0, 2]).any() and torch.isfinite(reference[0, [0, 3]]).all()


def test_the_backend_uses_it_and_its_gemm_choice_keeps_the_pytorch_form():
    m, _ = mixtures(2, 30, 3, seed=7)
    s = weight_sets(m, 2)
    fast = TorchBackend().evaluate_weight_sets_at_centroids(m.unsqueeze(0), s.unsqueeze(0))
    gemm = TorchBackend(cpu_kernel="gemm").evaluate_weight_sets_at_centroids(m.unsqueeze(0), s.unsqueeze(0))
    torch.testing.assert_close(fast, gemm, rtol=1e-12, atol=1e-14)


def test_second_derivatives_raise_instead_of_being_silently_zero():
    m, centre = mixtures(1, 6, 2, seed=8)
    m.requires_grad_()
    X, A, c = cpu_kernel.CPUCentroidTerms.apply(m, centre, None)
    (g,) = torch.autograd.grad((A * A).sum() + (c * c).sum(), m, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()
    # The same for the mat-vec kernel these terms feed.
    a = A.detach().requires_grad_()
    out = cpu_kernel.CPUExpKernelMatVec.apply(X.detach(), a, c.detach(), None, 4, 8)
    (g,) = torch.autograd.grad(out.square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()
