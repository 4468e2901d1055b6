"""Reduction cost: MEM vs TreeHEM (T=2, T=4), 3D, batch 8 x 8 channels, N_o -> 32 (paper Section 4.1, Table 3).

Run:  python -m pytest benchmarks/bench_reduction.py -q -s
      (GMBENCH_BENCH_SIZES=2560 to run only the headline size)

For N_o in {640, 2560, 10240} and each method: ``forward`` and
``forward+backward`` time (pytest-benchmark), and in ``extra_info``
``autograd_saved_mb`` (distinct storages autograd keeps for backward: the
memory a training step holds per reduction) and ``peak_rss_mb`` (peak resident
memory a fresh process adds for one forward+backward after one small warm-up
call that pays the one-time imports, sampled every ms).
Each method runs twice: with the default implementation (the native
node-fit kernel, :mod:`gmbench.backends.node_fit_cpu`) and as ``-torch``, the
PyTorch reference (``implementation: torch``); ``treehem-T2-torch-keep`` is
the reference with ``recompute: false`` (no activation checkpointing of the
per-node EM steps).  The summary at the end prints, per method and size, the
time relative to MEM and, for the kernel, the speed-up over its PyTorch
reference (same run, same machine): TreeHEM should need less memory and grow
~N log N where MEM grows ~N_o x N_p.

For scale: the authors' CPU TreeHEM, on a machine like this one, took
87 ms forward and 16 s backward for 8 x 8 mixtures 2560 -> 32, T = 2.

Before/after mode (the node-fit kernel of another git revision against this
tree's, in one process, repetitions interleaved, medians):

    python benchmarks/bench_reduction.py --baseline REV [--sizes 2560] [--repeats 9]

prints per method the forward time (no gradient), the forward+backward time,
the time inside the kernel's forward and backward calls and the autograd
memory (``saved_mb``) for both, their ratios and the largest
differences of values and gradients.  The baseline's ``node_fit_cpu.py``,
``node_fit_kernel.cpp``, ``fast_exp.h`` (and ``mem_kernel.h`` where it has
one) are taken with ``git show`` into a fresh private temporary folder and built like any kernel, through
:mod:`gmbench.backends.native` (hash-verified, private kernel folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins

N_OUT = 32
SIZES = [int(s) for s in os.environ.get("GMBENCH_BENCH_SIZES", "640,2560,10240").split(",")]
METHODS = {
    # The default implementation: the native node-fit kernel on CPU.
    "mem": ("mem", {}),
    "treehem-T2": ("treehem", {"T": 2}),
    "treehem-T4": ("treehem", {"T": 4}),
    # The PyTorch reference of the same methods, in the same run.
    "mem-torch": ("mem", {"implementation": "torch"}),
    "treehem-T2-torch": ("treehem", {"T": 2, "implementation": "torch"}),
    "treehem-T4-torch": ("treehem", {"T": 4, "implementation": "torch"}),
    # PyTorch without recomputing the node EM steps in backward (faster, more memory).
    "treehem-T2-torch-keep": ("treehem", {"T": 2, "recompute": False, "implementation": "torch"}),
}
RESULTS: dict[tuple[str, int, str], dict] = {}


def layer_output(n: int, seed: int = 0) -> torch.Tensor:
    """A dense ReLU fit of a random 3D layer output: ``[8, 8, n, 13]``, non-negative weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, n, generator=g)
    p = torch.randn(8, 8, n, 3, generator=g) * 2.0
    f = torch.randn(8, 8, n, 3, 3, generator=g) * 0.3 + 0.5 * torch.eye(3)
    m = gm.pack(w, p, gm.covariance_from_factor(f, 0.01))
    return plugins.create("transfer_fitting", "dense").fit(m)


def saved_mb(method: str, m: torch.Tensor) -> float:
    name, params = METHODS[method]
    reduction = plugins.create("reduction", name, **params)
    x = m.clone().requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = reduction.reduce(x, N_OUT)
    del out
    return sum(saved.values()) / 2**20


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_rss(method: str, n: int) -> dict:
    """Peak resident memory added by one forward+backward, sampled every millisecond."""
    import threading
    import time

    m = layer_output(n)
    name, params = METHODS[method]
    reduction = plugins.create("reduction", name, **params)
    # One small warm-up call first: the first activation checkpoint imports
    # modules worth ~170 MiB of RSS once per process, not per call.
    reduction.reduce(layer_output(64).requires_grad_(True), N_OUT).sum().backward()
    x = m.clone().requires_grad_(True)
    before = _current_rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reduction.reduce(x, N_OUT).sum().backward()
    done.set()
    sampler.join()
    return {"peak_rss_mb": max(peak[0], _current_rss_mb()) - before}


def child_peak_rss(method: str, n: int) -> float:
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import bench_reduction as b; "
        "print(json.dumps(b._measure_rss(sys.argv[2], int(sys.argv[3]))))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), method, str(n)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if done.returncode != 0:
        return float("nan")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


@pytest.fixture(scope="module")
def mixtures():
    return {n: layer_output(n) for n in SIZES}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_reduction(benchmark, mixtures, method, n, mode):
    name, params = METHODS[method]
    reduction = plugins.create("reduction", name, **params)
    m = mixtures[n]

    if mode == "forward":
        def run():
            with torch.no_grad():
                return reduction.reduce(m, N_OUT)
    else:
        def run():
            x = m.clone().requires_grad_(True)
            reduction.reduce(x, N_OUT).sum().backward()
            return x.grad

    rounds = 3 if n <= 2560 else 1
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1 if n <= 2560 else 0)
    info = {"mean_s": benchmark.stats.stats.mean, "min_s": benchmark.stats.stats.min}
    if mode == "forward+backward":
        info["autograd_saved_mb"] = saved_mb(method, m)
        info["peak_rss_mb"] = child_peak_rss(method, n)
    benchmark.extra_info.update(info)
    RESULTS[(method, n, mode)] = info


@pytest.fixture(scope="module", autouse=True)
def print_summary():
    yield
    if not RESULTS:
        return
    nan = float("nan")
    print(f"\nreduction 8x8 mixtures, 3D, N_o -> 32 (this run, {torch.get_num_threads()} threads; "
          "time and memory relative to MEM-torch at the same N_o; speed-up: -torch time / kernel time)")
    print(f"{'method':<22}{'N_o':>7}{'fwd s':>9}{'fwd+bwd s':>11}{'saved MiB':>11}{'peak RSS MiB':>14}"
          f"{'time/MEM':>10}{'saved/MEM':>11}{'speed-up':>10}")
    for method in METHODS:
        for n in SIZES:
            fwd = RESULTS.get((method, n, "forward"), {})
            both = RESULTS.get((method, n, "forward+backward"), {})
            ref = RESULTS.get(("mem-torch", n, "forward+backward"), {})
            reference = RESULTS.get((f"{method}-torch", n, "forward+backward"), {})
            ratio_t = both.get("min_s", nan) / ref.get("min_s", nan) if ref else nan
            ratio_m = both.get("autograd_saved_mb", nan) / ref.get("autograd_saved_mb", nan) if ref else nan
            speed_up = reference.get("min_s", nan) / both.get("min_s", nan) if reference and both else nan
            print(
                f"{method:<22}{n:>7}{fwd.get('min_s', nan):>9.3f}{both.get('min_s', nan):>11.3f}"
                f"{both.get('autograd_saved_mb', nan):>11.1f}{both.get('peak_rss_mb', nan):>14.0f}"
                f"{ratio_t:>10.2f}{ratio_m:>11.2f}{speed_up:>10.1f}"
            )


# -- before/after mode ---------------------------------------------------------
BASELINE_FILES = ("backends/node_fit_cpu.py", "backends/node_fit_kernel.cpp", "backends/fast_exp.h")
BASELINE_OPTIONAL_FILES = ("backends/mem_kernel.h",)  # not in revisions before the fused MEM kernel
AB_METHODS = {"treehem-T2": ("treehem", {"T": 2}), "treehem-T4": ("treehem", {"T": 4}), "mem": ("mem", {})}


def load_baseline(revision: str, folder: Path):
    """The ``node_fit_cpu`` module of ``revision``, its kernel built from that revision's source."""
    root = Path(__file__).resolve().parents[1]
    for name in BASELINE_FILES + BASELINE_OPTIONAL_FILES:
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=root, capture_output=True)
        if shown.returncode != 0 and name in BASELINE_OPTIONAL_FILES:
            continue
        shown.check_returncode()
        (folder / Path(name).name).write_bytes(shown.stdout)
    spec = importlib.util.spec_from_file_location("node_fit_cpu_baseline", folder / "node_fit_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.LIBRARY.load() is None:
        raise RuntimeError(f"the node-fit kernel of {revision} does not build: {module.LIBRARY.unavailable_reason()}")
    return module


class _TimedLibrary:
    """Forwards to a loaded kernel library and adds each forward/backward call's wall time to ``times``."""

    def __init__(self, library, times: dict):
        self._library, self._times = library, times

    def __getattr__(self, name):
        function = getattr(self._library, name)
        kind = "kernel backward" if "_backward_" in name else "kernel forward"

        def timed(*args):
            start = time.perf_counter()
            function(*args)
            self._times[kind] = self._times.get(kind, 0.0) + time.perf_counter() - start

        return timed


def compare_with_baseline(revision: str, sizes: list[int], repeats: int) -> None:
    import gmbench.reduction.mem as mem_module
    import gmbench.reduction.treehem as treehem_module
    from gmbench.backends import node_fit_cpu

    with tempfile.TemporaryDirectory(prefix="gmbench-baseline-") as folder:
        sides = {"baseline": load_baseline(revision, Path(folder)), "this tree": node_fit_cpu}
        times: dict[str, dict] = {side: {} for side in sides}
        for side, module in sides.items():
            library = module.LIBRARY.load()
            module.LIBRARY.load = lambda library=library, side=side: _TimedLibrary(library, times[side])
        print(f"node-fit kernel: {revision} (baseline) vs this tree, {torch.get_num_threads()} threads, "
              f"8x8 3D mixtures -> {N_OUT}, medians of {repeats} interleaved repetitions; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'method':<12}{'N_o':>7}{'':>12}{'fwd s':>9}{'fwd+bwd s':>11}{'kernel fwd s':>14}{'kernel bwd s':>14}"
              f"{'saved MiB':>11}{'max |d out|':>13}{'max |d grad|':>14}")
        for n in sizes:
            m = layer_output(n)
            for method, (name, params) in AB_METHODS.items():
                reduction = plugins.create("reduction", name, **params)
                samples = {side: {"fwd": [], "fwd+bwd": [], "kernel forward": [], "kernel backward": []} for side in sides}
                results = {}
                for repeat in range(repeats + 1):  # the first round warms up
                    order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
                    for side in order:
                        module = sides[side]
                        treehem_module.native_kernel = mem_module.native_kernel = lambda _i, _m, module=module: module
                        start = time.perf_counter()
                        with torch.no_grad():
                            reduction.reduce(m, N_OUT)
                        forward = time.perf_counter() - start
                        times[side].clear()
                        x = m.clone().requires_grad_(True)
                        start = time.perf_counter()
                        out = reduction.reduce(x, N_OUT)
                        out.sum().backward()
                        elapsed = time.perf_counter() - start
                        if repeat:
                            samples[side]["fwd"].append(forward)
                            samples[side]["fwd+bwd"].append(elapsed)
                            for kind in ("kernel forward", "kernel backward"):
                                samples[side][kind].append(times[side].get(kind, float("nan")))
                        results[side] = (out.detach(), x.grad)
                medians = {side: {k: statistics.median(v) for k, v in samples[side].items()} for side in sides}
                for side, module in sides.items():
                    treehem_module.native_kernel = mem_module.native_kernel = lambda _i, _m, module=module: module
                    medians[side]["saved MiB"] = saved_mb(method, m)
                d_out = float((results["baseline"][0] - results["this tree"][0]).abs().max())
                d_grad = float((results["baseline"][1] - results["this tree"][1]).abs().max())
                for side in sides:
                    row = medians[side]
                    print(f"{method:<12}{n:>7}{side:>12}{row['fwd']:>9.4f}{row['fwd+bwd']:>11.4f}"
                          f"{row['kernel forward']:>14.4f}{row['kernel backward']:>14.4f}{row['saved MiB']:>11.1f}")
                ratio = {k: medians["this tree"][k] / medians["baseline"][k] for k in medians["baseline"]}
                print(f"{'':<12}{'':>7}{'new/old':>12}{ratio['fwd']:>9.3f}{ratio['fwd+bwd']:>11.3f}"
                      f"{ratio['kernel forward']:>14.3f}{ratio['kernel backward']:>14.3f}{ratio['saved MiB']:>11.3f}"
                      f"{d_out:>13.2e}{d_grad:>14.2e}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="node-fit kernel before/after (see the module docstring)")
    parser.add_argument("--baseline", required=True, help="git revision whose node-fit kernel to compare against")
    parser.add_argument("--sizes", default="2560", help="comma-separated N_o (default 2560)")
    parser.add_argument("--repeats", type=int, default=9)
    arguments = parser.parse_args()
    compare_with_baseline(arguments.baseline, [int(v) for v in arguments.sizes.split(",")], arguments.repeats)
