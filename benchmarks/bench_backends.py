r"""Backends on real GMCN activations: naive dense vs GEMM form vs C++ kernel vs cut-off.

Run:  python -m pytest benchmarks/bench_backends.py -q -s

Data: the Gaussians a GMCN really evaluates.  ``shapes3d`` test samples are
fitted with ``kmeans`` (128 Gaussians, like the paper's ModelNet input) and run
through an untrained ``gmcn`` (layout ``1/128->8/64->8/32->10``, 5 kernel
Gaussians); each block's convolution output is the input of the ReLU fitting,
i.e. what ``evaluate_at_centroids`` gets: block 1 gives N = 640, block 2
N = 2560.  N = 10240 concatenates four channels of block 2 (what a block with
four times the input channels produces).  Batch: 8 samples x 8 channels, 3D,
float32.

Implementations (``evaluate_at_centroids``):

* ``naive``       materialises ``[B, C, N, N]`` (defined below; only N = 640 and
                  N = 2560 forward: it needs tens of GB beyond that),
* ``torch_gemm``  the tiled GEMM form (``cpu_kernel="gemm"``),
* ``torch``       the default: the C++ CPU kernel,
* ``cutoff_1e-5`` / ``cutoff_1e-3`` the C++ kernel with the spatial cut-off.

Each case records ``pairs`` (B C N^2), ``pairs_per_s``, ``peak_mb`` (peak live
CPU tensor memory from the profiler's allocation events; the C++ kernel's own
scratch, (F+1) N floats per thread, is not seen there), ``error_vs_float64``
(max error relative to the largest peak ``max|c|``) and ``speedup_vs_gemm``
from the same run; the session prints a table.

``test_fused_interpreted_matches_torch`` runs the Triton kernels in the
interpreter on a slice of the same data as a correctness check (not timed).
``test_gmcn_training_step`` (paper's ModelNet10 layout, batch 21, torch vs
fused) needs a CUDA GPU and skips without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from gmbench import backends, plugins
from gmbench import mixture as gm
from gmbench.profiling import peak_tensor_bytes

SIZES = (640, 2560, 10240)
MODES = ("forward", "forward_backward")
IMPLEMENTATIONS = {
    "naive": None,
    "torch_gemm": {"cpu_kernel": "gemm"},
    "torch": {},
    "cutoff_1e-5": {"cutoff": 1e-5},
    "cutoff_1e-3": {"cutoff": 1e-3},
}
RESULTS: dict[tuple[str, int, str], dict] = {}


def naive_evaluate_at_centroids(m: torch.Tensor) -> torch.Tensor:
    """Dense reference: the ``[B, C, N, N]`` exponents are materialised (and kept by autograd)."""
    d = gm.n_dims(m)
    precision, _ = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    x = gm.positions(m)
    diff = x[..., :, None, :] - x[..., None, :, :]
    quad = torch.einsum("bcijd,bcjde,bcije->bcij", diff, precision, diff)
    return (gm.normalisation_factors(m)[..., None, :] * torch.exp(-0.5 * quad)).sum(-1)


@pytest.fixture(scope="module")
def activations() -> dict[int, torch.Tensor]:
    """``{N: [8, 8, N, 13]}`` float32 convolution outputs of an untrained GMCN on fitted shapes3d."""
    split = plugins.create("dataset", "shapes3d", samples_per_class=1, test_samples_per_class=1).load("test")
    inputs = plugins.create("input_fitting", "kmeans", seed=0).fit(split.points[:8], 128)
    torch.manual_seed(0)
    model = plugins.create("model", "gmcn", num_classes=10, dims=3, layout="1/128->8/64->8/32->10").eval()
    with torch.no_grad(), backends.use("torch"):
        trace = model.trace(inputs)
    block2 = trace[1].convolved
    wide = torch.cat([block2[:, k::4][:, :2] for k in range(4)], dim=2)  # [8, 2, 10240]: 4 channels -> 1
    wide = wide.repeat(1, 4, 1, 1)  # 8 channels
    return {640: trace[0].convolved.contiguous(), 2560: block2.contiguous(), 10240: wide.contiguous()}


def evaluator(implementation: str):
    if implementation == "naive":
        return naive_evaluate_at_centroids
    return lambda m: backends.active().evaluate_at_centroids(m)


def make_call(implementation: str, mode: str, m: torch.Tensor):
    evaluate = evaluator(implementation)
    if mode == "forward":
        def call():
            with torch.no_grad():
                return evaluate(m)
        return call
    leaf = m.clone().requires_grad_()

    def call():
        leaf.grad = None
        evaluate(leaf).square().sum().backward()
    return call


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_evaluate_at_centroids(benchmark, activations, implementation, n, mode):
    if implementation == "naive" and (n > 2560 or (n == 2560 and mode != "forward")):
        pytest.skip("naive dense needs B*C*N^2 floats several times over (tens of GB)")
    if implementation == "torch_gemm" and n > 2560:
        pytest.skip("GEMM form at N = 10240 takes minutes on 2 cores; the ratio is known from N <= 2560")
    m = activations[n]
    params = IMPLEMENTATIONS[implementation] or {}
    with backends.use("torch", **params):
        call = make_call(implementation, mode, m)
        rounds = 1 if n >= 2560 or mode == "forward_backward" else 3
        peak = peak_tensor_bytes(call) if n <= 2560 else float("nan")
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        with torch.no_grad():
            out = evaluator(implementation)(m).double()
    with torch.no_grad(), backends.use("torch", compute_dtype="float64"):
        exact = backends.active().evaluate_at_centroids(m.double())
    scale = gm.normalisation_factors(m.double()).abs().amax(-1, keepdim=True)
    pairs = m.shape[0] * m.shape[1] * n * n
    info = {"pairs": pairs, "peak_mb": peak / 2**20, "error_vs_float64": ((out - exact).abs() / scale).max().item()}
    if benchmark.stats is not None:
        info["mean_s"] = benchmark.stats.stats.mean
        info["pairs_per_s"] = pairs / info["mean_s"]
        gemm = RESULTS.get(("torch_gemm", n, mode), {}).get("mean_s")
        if gemm:
            info["speedup_vs_gemm"] = gemm / info["mean_s"]
    benchmark.extra_info.update(info)
    RESULTS[(implementation, n, mode)] = info


def test_fused_interpreted_matches_torch(activations, tmp_path):
    """Correctness only: the Triton kernels in Triton's CPU interpreter on 1 x 2 mixtures of N = 640."""
    pytest.importorskip("triton")
    m = activations[640][:1, :2].contiguous()
    path = tmp_path / "m.pt"
    torch.save(m, path)
    code = (
        "import os, sys, torch; os.environ['TRITON_INTERPRET'] = '1'\n"
        "from gmbench import backends, mixture as gm\n"
        f"m = torch.load({str(path)!r}, weights_only=True).requires_grad_()\n"
        "res = {}\n"
        "for name, kind, kw in [('torch', 'torch', {}), ('fused', 'fused', {}), ('fused_cut', 'fused', {'cutoff': 1e-5})]:\n"
        "    with backends.use(kind, **kw):\n"
        "        out = gm.evaluate_at_centroids(m); (g,) = torch.autograd.grad(out.square().sum(), m)\n"
        "    res[name] = (out, g)\n"
        "for name in ('fused', 'fused_cut'):\n"
        "    o, g = res[name]; ro, rg = res['torch']\n"
        "    print(name, float((o - ro).abs().max() / ro.abs().max()), float((g - rg).abs().max() / rg.abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, value_error, grad_error = line.split()
        print(f"\n{name}: relative value error {float(value_error):.2e}, gradient error {float(grad_error):.2e}")
        assert float(value_error) < 1e-4 and float(grad_error) < 1e-3


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_gmcn_training_step(benchmark, backend):
    """Paper's ModelNet10 layout at batch 21 on CUDA: step time, peak memory (goal: 20x under 6 s, < 1 GB)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "fused" and plugins.get("backend", "fused").cls.unavailable_reason():
        pytest.skip(plugins.get("backend", "fused").cls.unavailable_reason())
    device = torch.device("cuda")
    split = plugins.create("dataset", "shapes3d", samples_per_class=3, test_samples_per_class=1).load("train")
    inputs = plugins.create("input_fitting", "kmeans", seed=0).fit(split.points[:21], 128).to(device)
    labels = split.labels[:21].to(device)
    torch.manual_seed(0)
    model = plugins.create("model", "gmcn", num_classes=10, dims=3).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimiser.zero_grad()
        loss = torch.nn.functional.nll_loss(model(inputs), labels)
        loss.backward()
        optimiser.step()
        torch.cuda.synchronize()

    with backends.use(backend):
        step()  # compile kernels
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info["device"] = torch.cuda.get_device_name()


def pytest_terminal_summary_lines() -> list[str]:
    lines = [f"{'case':<13} {'N':>6} {'mode':<17} {'mean s':>8} {'Gpair/s':>8} {'peak MiB':>9} {'vs gemm':>8} {'err/max|c|':>10}"]
    for (implementation, n, mode), info in sorted(RESULTS.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lines.append(
            f"{implementation:<13} {n:>6} {mode:<17} {info.get('mean_s', float('nan')):>8.3f} "
            f"{info.get('pairs_per_s', float('nan')) / 1e9:>8.3f} {info['peak_mb']:>9.1f} "
            f"{info.get('speedup_vs_gemm', float('nan')):>8.2f} {info['error_vs_float64']:>10.2e}"
        )
    return lines


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    yield
    if RESULTS:
        print("\n\nevaluate_at_centroids on shapes3d GMCN activations, 8 x 8 mixtures, float32 "
              f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
              f"{time.strftime('%H:%M:%S')})")
        print("\n".join(pytest_terminal_summary_lines()))
