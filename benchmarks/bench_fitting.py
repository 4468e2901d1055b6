"""Transfer fitting cost, paper Table 7: 800 mixtures x 256 Gaussians in 2D.

Run:  python -m pytest benchmarks/bench_fitting.py -q -s
      (GMBENCH_BENCH_MIXTURES=80 for a quick run; the ratios barely change)

Methods: the dense heuristic (Eq. 6-7, through the backend's tiled
``evaluate_at_centroids``), a naive dense heuristic that materialises the
N x N matrix of Gaussian values (reference for the ratio), and the
least-squares fit of Appendix B with ``torch.linalg.lstsq`` and
``torch.linalg.pinv`` for each sample choice of Table 7:
``D = B`` (centres), ``concat(B, rand(N))`` (centres+random, factor 1) and
``rand(4N)`` (random, factor 4).

Paper (RTX 2080 Ti): heuristic 3.8 ms; lstsq 1.1 / 1.5 / 2.0 s; pinv 10.2 / 10.9 / 11.3 s.
The printed summary gives every time relative to the heuristic of the same run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins

N_MIXTURES = int(os.environ.get("GMBENCH_BENCH_MIXTURES", "800"))
N_GAUSSIANS = 256
SAMPLE_CHOICES = {"D=B": ("centres", 1.0), "D=concat(B,rand(N))": ("centres+random", 1.0), "D=rand(4N)": ("random", 4.0)}
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def mixtures():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N_MIXTURES, 1, N_GAUSSIANS, generator=g)
    p = torch.rand(N_MIXTURES, 1, N_GAUSSIANS, 2, generator=g) * 10
    f = torch.randn(N_MIXTURES, 1, N_GAUSSIANS, 2, 2, generator=g) * 0.3 + 0.7 * torch.eye(2)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.01))


def naive_dense_heuristic(m: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 6-7 with the full N x N matrix of Gaussian values (the straightforward way)."""
    d = gm.n_dims(m)
    precision, logdet = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    diff = gm.positions(m).unsqueeze(-2) - gm.positions(m).unsqueeze(-3)  # [.., i (at), j (Gaussian), D]
    exponent = -0.5 * torch.einsum("...ija,...jab,...ijb->...ij", diff, precision, diff)
    values = torch.exp(exponent - 0.5 * (logdet.unsqueeze(-2) + d * math.log(2 * math.pi)))
    a = gm.weights(m)
    coarse = a.where(a > 0, a.new_tensor(eps))
    target = (values @ a.unsqueeze(-1)).squeeze(-1).clamp_min(0)
    current = (values @ coarse.unsqueeze(-1)).squeeze(-1)
    return gm.with_weights(m, coarse * target / current)


def two_pass_dense_heuristic(m: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 6-7 with one ``evaluate_at_centroids`` per weight vector (what the shared pass replaces)."""
    a = gm.weights(m)
    coarse = a.where(a > 0, a.new_tensor(eps))
    target = gm.evaluate_at_centroids(m).clamp_min(0)
    current = gm.evaluate_at_centroids(gm.with_weights(m, coarse))
    return gm.with_weights(m, coarse * target / current.clamp_min(1e-30))


def layer_activations(n: int = 2560) -> torch.Tensor:
    """A GMCN-sized convolution output: 8 x 8 mixtures of ``n`` 3D Gaussians, signed weights."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, n, generator=g)
    p = torch.randn(8, 8, n, 3, generator=g) * 2.0
    f = torch.randn(8, 8, n, 3, 3, generator=g) * 0.3 + 0.5 * torch.eye(3)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.01))


def record(benchmark, key):
    RESULTS[key] = benchmark.stats.stats.min
    benchmark.extra_info["min_s"] = benchmark.stats.stats.min


def test_dense_heuristic(benchmark, mixtures):
    fitting = plugins.create("transfer_fitting", "dense")
    with torch.no_grad():
        result = benchmark.pedantic(fitting.fit, args=(mixtures,), rounds=5, warmup_rounds=1)
    assert bool((gm.weights(result) >= 0).all())
    record(benchmark, "heuristic")


def test_naive_dense_heuristic(benchmark, mixtures):
    with torch.no_grad():
        result = benchmark.pedantic(naive_dense_heuristic, args=(mixtures,), rounds=3, warmup_rounds=1)
        reference = plugins.create("transfer_fitting", "dense").fit(mixtures)
    # float32: the two summation orders differ where relu(target) cancels to ~0.
    torch.testing.assert_close(result, reference, rtol=1e-2, atol=5e-4)
    record(benchmark, "heuristic (naive N x N)")


def test_two_pass_dense_heuristic(benchmark, mixtures):
    with torch.no_grad():
        result = benchmark.pedantic(two_pass_dense_heuristic, args=(mixtures,), rounds=5, warmup_rounds=1)
        reference = plugins.create("transfer_fitting", "dense").fit(mixtures)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6)
    record(benchmark, "heuristic (two evaluation passes)")


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("method", ["shared pass", "two passes"])
def test_dense_heuristic_gmcn_layer(benchmark, method, mode):
    """8 x 8 mixtures of 2560 3D Gaussians (a GMCN layer's convolution output)."""
    m = layer_activations()
    fit = plugins.create("transfer_fitting", "dense").fit if method == "shared pass" else two_pass_dense_heuristic

    def run():
        x = m.clone().requires_grad_(mode != "forward")
        with torch.set_grad_enabled(mode != "forward"):
            out = fit(x)
            if mode != "forward":
                gm.weights(out).sum().backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    record(benchmark, f"8x8 N=2560 3D {mode}: {method}")


@pytest.mark.parametrize("choice", list(SAMPLE_CHOICES))
@pytest.mark.parametrize("solver", ["lstsq", "pinv"])
def test_least_squares(benchmark, mixtures, solver, choice):
    samples, factor = SAMPLE_CHOICES[choice]
    fitting = plugins.create("transfer_fitting", "lstsq", samples=samples, random_factor=factor, solver=solver)
    with torch.no_grad():
        benchmark.pedantic(fitting.fit, args=(mixtures,), rounds=1, iterations=1)
    record(benchmark, f"{solver} {choice}")


@pytest.fixture(scope="module", autouse=True)
def print_summary():
    yield
    if "heuristic" not in RESULTS:
        return
    base = RESULTS["heuristic"]
    for mode in ("forward", "forward+backward"):
        shared, two = (RESULTS.get(f"8x8 N=2560 3D {mode}: {m}") for m in ("shared pass", "two passes"))
        if shared and two:
            print(f"\ndense heuristic, 8x8 N=2560 3D {mode}: shared pass {shared:.3f} s, two passes {two:.3f} s ({two / shared:.2f}x)")
    print(f"\nTable 7 setting: {N_MIXTURES} mixtures x {N_GAUSSIANS} Gaussians, 2D, CPU threads={torch.get_num_threads()}")
    print(f"{'method':<48}{'time s':>10}{'x heuristic':>13}")
    for key, value in RESULTS.items():
        print(f"{key:<48}{value:>10.3f}{value / base:>13.1f}")
