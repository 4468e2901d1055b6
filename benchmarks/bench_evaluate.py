r"""``evaluate_at_centroids``: the torch backend against a naive dense reference, with speed and memory targets.

Run:  python -m pytest benchmarks/bench_evaluate.py -q
      python benchmarks/bench_evaluate.py --baseline REV [--threads 1,2] [--dims 3,2] [--repeats 5] [--n 2560]

Cases: 3D, a batch of 8 mixtures (``[8, 1, N, 13]``), N in {640, 2560}, forward
(no autograd) and forward+backward (gradients w.r.t. weights, positions and
covariance factors of Eq. 9).  ``torch`` is the backend as configured by
default (on CPU its C++ kernel, :mod:`gmbench.backends.cpu_kernel`, when a
compiler is available); ``torch_gemm`` forces its tiled GEMM form
(``cpu_kernel="gemm"``), the fallback without a compiler.  The naive reference
below materialises the ``[B, C, N, N]`` pairwise tensors and lets autograd keep
them, as a straightforward implementation of Eq. 1 would.

Each benchmark records in ``extra_info``: ``pairs`` (Gaussian-point pairs per
call, ``B C N^2``), ``pairs_per_s`` and ``pairs_per_s_best`` (from the mean
and the fastest round's wall time), ``cpu_s_mean``
(process CPU time per call, all threads: a check on a busy shared machine) and ``peak_mb``
(peak live CPU tensor memory of one call, from the profiler's allocation
events; inputs excluded).  The torch cases add ``speedup_vs_naive`` and
``memory_ratio_vs_naive`` from the naive case of the same run (speed-up from
the fastest rounds), and the session prints a summary table.
Forward+backward cases add ``fwd_bwd_over_fwd`` and ``fwd_bwd_over_fwd_cpu``:
their time over the same case's forward in this run (target for the C++
kernel: at most 3), by wall time of the fastest rounds and by CPU time.
``test_targets_at_2560`` checks the targets for the default backend: at
N = 2560 at least 4x the naive throughput and at least 10x lower peak memory
(the ``torch_gemm`` fallback's ratios are printed, not asserted).

Before/after mode (``--baseline REV``): the C++ kernel of git revision REV
(its ``cpu_kernel.py``, ``cpu_kernel.cpp`` and ``fast_exp.h``, built into a
temporary folder) against this tree's, in one process, on 8 x 8 mixtures of
N = 2560 (``--n``) through the torch backend's ``evaluate_at_centroids``: forward (no
autograd) and forward+backward, the two kernels' repetitions interleaved,
for each thread count and dimension; prints the fastest wall and process CPU
times, G pairs/s, forward+backward over forward, new over old, the largest
difference of values and gradients, and the load average before and after.

The ``paper_scale`` cases time 8 x 8 mixtures of N = 2560 (the paper authors'
OpenMP CPU implementation: 3.3 s forward, 29.9 s backward on a comparable
machine; budget for this backend: <= 3.3 s forward, <= 10 s forward+backward).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from gmbench import backends
from gmbench import mixture as gm
from gmbench.profiling import peak_tensor_bytes

DIMS = 3
SIZES = (640, 2560)
MODES = ("forward", "forward_backward")
RESULTS: dict[tuple[str, int, str], dict] = {}  # (implementation, N, mode) -> extra_info


def make_leaves(batch: int, channels: int, n: int, seed: int = 0, dims: int = DIMS):
    """Float32 leaf tensors: weights ``[B, C, N]``, positions ``[B, C, N, D]``, factors ``[B, C, N, D, D]``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, channels, n, generator=g)
    p = torch.randn(batch, channels, n, dims, generator=g) * 2.0
    f = torch.randn(batch, channels, n, dims, dims, generator=g) * 0.3
    return w, p, f


def naive_evaluate_at_centroids(m: torch.Tensor) -> torch.Tensor:
    """Dense reference: every ``[B, C, N, N]`` intermediate is materialised (and kept by autograd)."""
    precision, logdet = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    x = gm.positions(m)
    diff = x[..., :, None, :] - x[..., None, :, :]  # [B, C, N(points), N(Gaussians), D]
    quad = torch.einsum("bcijd,bcjde,bcije->bcij", diff, precision, diff)
    norm = gm.weights(m) * torch.exp(-0.5 * (logdet + DIMS * math.log(2 * math.pi)))
    return (norm[..., None, :] * torch.exp(-0.5 * quad)).sum(-1)


def backend_evaluate_at_centroids(m: torch.Tensor) -> torch.Tensor:
    return backends.active().evaluate_at_centroids(m)


# name -> (function, torch backend parameters while it runs)
IMPLEMENTATIONS = {
    "naive": (naive_evaluate_at_centroids, {}),
    "torch": (backend_evaluate_at_centroids, {}),  # the default: the C++ kernel on CPU when it builds
    "torch_gemm": (backend_evaluate_at_centroids, {"cpu_kernel": "gemm"}),  # the tiled GEMM form
}


def make_call(implementation: str, mode: str, leaves):
    evaluate, _ = IMPLEMENTATIONS[implementation]
    if mode == "forward":
        w, p, f = leaves
        m = gm.pack(w, p, gm.covariance_from_factor(f))

        def call():
            with torch.no_grad():
                return evaluate(m)

        return call

    w, p, f = (t.clone().requires_grad_() for t in leaves)

    def call():
        w.grad = p.grad = f.grad = None
        out = evaluate(gm.pack(w, p, gm.covariance_from_factor(f)))
        out.square().sum().backward()

    return call


def run_case(benchmark, implementation: str, n: int, mode: str, batch: int = 8, channels: int = 1, rounds: int = 3):
    torch.manual_seed(0)
    with backends.use("torch", **IMPLEMENTATIONS[implementation][1]):
        call = make_call(implementation, mode, make_leaves(batch, channels, n))
        peak = peak_tensor_bytes(call)
        cpu_seconds = []

        def timed_call():
            # CPU time of this process (all its threads): less sensitive than wall time to
            # other jobs on a shared machine, so both are recorded.
            start = time.process_time()
            call()
            cpu_seconds.append(time.process_time() - start)

        benchmark.pedantic(timed_call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    pairs = batch * channels * n * n
    info = {
        "pairs": pairs,
        "peak_mb": peak / 2**20,
        "threads": torch.get_num_threads(),
        "cpu_s_mean": sum(cpu_seconds) / len(cpu_seconds),
    }
    if benchmark.stats is not None:  # None under --benchmark-disable
        info["mean_s"] = benchmark.stats.stats.mean
        info["min_s"] = benchmark.stats.stats.min
        info["pairs_per_s"] = pairs / benchmark.stats.stats.mean
        info["pairs_per_s_best"] = pairs / benchmark.stats.stats.min
    benchmark.extra_info.update(info)
    return info


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))  # naive first: the others read its numbers
def test_evaluate_at_centroids(benchmark, implementation, n, mode):
    benchmark.group = f"evaluate_at_centroids N={n} {mode}"
    info = run_case(benchmark, implementation, n, mode)
    naive = RESULTS.get(("naive", n, mode))
    if implementation != "naive" and naive and "pairs_per_s" in info:
        # Best-of-rounds ratio: the least disturbed by other jobs on a shared machine.
        info["speedup_vs_naive"] = naive["min_s"] / info["min_s"]
        info["memory_ratio_vs_naive"] = naive["peak_mb"] / max(info["peak_mb"], 1e-9)
        benchmark.extra_info.update(info)
    record_backward_ratio(benchmark, implementation, n, mode, info)
    RESULTS[(implementation, n, mode)] = info


def record_backward_ratio(benchmark, case: str, n: int, mode: str, info: dict) -> None:
    """``fwd_bwd_over_fwd`` (fastest rounds) and ``fwd_bwd_over_fwd_cpu`` (CPU time) from this run's forward case."""
    forward = RESULTS.get((case, n, "forward"))
    if mode != "forward_backward" or not forward or "min_s" not in info or "min_s" not in forward:
        return
    info["fwd_bwd_over_fwd"] = info["min_s"] / forward["min_s"]
    info["fwd_bwd_over_fwd_cpu"] = info["cpu_s_mean"] / forward["cpu_s_mean"]
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", ["torch", "torch_gemm"])
def test_paper_scale_8x8_mixtures_n2560(benchmark, implementation, mode):
    benchmark.group = "paper scale: 8 x 8 mixtures, N=2560"
    info = run_case(benchmark, implementation, 2560, mode, batch=8, channels=8, rounds=2)
    record_backward_ratio(benchmark, f"{implementation}/8x8", 2560, mode, info)
    RESULTS[(f"{implementation}/8x8", 2560, mode)] = info


def test_targets_at_2560():
    """Targets: at N = 2560, >= 4x the naive throughput and >= 10x lower peak memory."""
    for mode in MODES:
        case, naive_case = RESULTS.get(("torch", 2560, mode)), RESULTS.get(("naive", 2560, mode))
        if not case or "speedup_vs_naive" not in case:
            pytest.skip("needs the timed N=2560 cases of this run (not deselected, benchmarks enabled)")
        assert case["speedup_vs_naive"] >= 4, (mode, case, naive_case)
        assert case["memory_ratio_vs_naive"] >= 10, (mode, case, naive_case)


# -- before/after mode ---------------------------------------------------------
BASELINE_FILES = ("backends/cpu_kernel.py", "backends/cpu_kernel.cpp")


def load_baseline(revision: str, folder: Path):
    """The ``cpu_kernel`` module of ``revision``, its library built from that revision's source
    (with every header of its ``backends/``, which the source may include)."""
    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:backends"], cwd=root,
                            capture_output=True, check=True, text=True).stdout.split()
    for name in (*BASELINE_FILES, *(f"backends/{h}" for h in listed if h.endswith(".h"))):
        text = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=root, capture_output=True, check=True).stdout
        (folder / Path(name).name).write_bytes(text)
    spec = importlib.util.spec_from_file_location("cpu_kernel_baseline", folder / "cpu_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.load() is None:
        raise RuntimeError(f"the C++ kernel of {revision} does not build: {module.unavailable_reason()}")
    return module


def _timed(call) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare_with_baseline(revision: str, threads: list[int], dims: list[int], repeats: int, n: int = 2560) -> None:
    import gmbench.backends.torch as torch_backend
    from gmbench.backends import cpu_kernel

    batch, channels = 8, 8
    pairs = batch * channels * n * n
    with tempfile.TemporaryDirectory(prefix="gmbench-baseline-") as folder:
        sides = {"baseline": load_baseline(revision, Path(folder)), "this tree": cpu_kernel}
        print(f"C++ kernel: {revision} (baseline) vs this tree; {batch} x {channels} mixtures, N = {n}, float32, "
              f"evaluate_at_centroids; fastest of {repeats} interleaved repetitions; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'D':>2}{'thr':>4}{'side':>11}{'fwd s':>8}{'fwd cpu':>9}{'f+b s':>8}{'f+b cpu':>9}{'Gpair/s':>9}"
              f"{'f+b/f':>7}{'f+b/f cpu':>10}")
        original = torch_backend.cpu_kernel
        previous_threads = torch.get_num_threads()
        try:
            for d in dims:
                leaves = make_leaves(batch, channels, n, dims=d)
                for count in threads:
                    torch.set_num_threads(count)
                    best: dict[str, dict[str, list[float]]] = {}
                    results = {}
                    for repeat in range(repeats + 1):  # the first round warms up
                        for side in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
                            torch_backend.cpu_kernel = sides[side]
                            with backends.use("torch", cpu_kernel="cpp"):
                                forward = make_call("torch", "forward", leaves)
                                w, p, f = (t.clone().requires_grad_() for t in leaves)

                                def both():
                                    out = backend_evaluate_at_centroids(gm.pack(w, p, gm.covariance_from_factor(f)))
                                    out.square().sum().backward()
                                    results[side] = (out.detach(), w.grad, p.grad, f.grad)

                                times = (*_timed(forward), *_timed(both))
                            if repeat:
                                row = best.setdefault(side, {"times": [math.inf] * 4})["times"]
                                row[:] = [min(a, b) for a, b in zip(row, times)]
                    for side in sides:
                        fw, fc, bw, bc = best[side]["times"]
                        print(f"{d:>2}{count:>4}{side:>11}{fw:>8.3f}{fc:>9.3f}{bw:>8.3f}{bc:>9.3f}{pairs / fw / 1e9:>9.2f}"
                              f"{bw / fw:>7.2f}{bc / fc:>10.2f}")
                    old, new = best["baseline"]["times"], best["this tree"]["times"]
                    diffs = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(results["baseline"],
                                                                                       results["this tree"])]
                    print(f"{'':>6}{'new/old':>11}{new[0] / old[0]:>8.3f}{new[1] / old[1]:>9.3f}{new[2] / old[2]:>8.3f}"
                          f"{new[3] / old[3]:>9.3f}   max |new - old| / max |old|: values {diffs[0]:.1e}, "
                          f"gradients {max(diffs[1:]):.1e}")
        finally:
            torch_backend.cpu_kernel = original
            torch.set_num_threads(previous_threads)
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="C++ evaluation kernel before/after (see the module docstring)")
    parser.add_argument("--baseline", required=True, help="git revision whose C++ kernel to compare against")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--dims", default="3,2", help="comma-separated dimensions (default 3,2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=2560, help="Gaussians per mixture (default 2560)")
    arguments = parser.parse_args()
    compare_with_baseline(arguments.baseline, [int(v) for v in arguments.threads.split(",")],
                          [int(v) for v in arguments.dims.split(",")], arguments.repeats, arguments.n)
