r"""Every GPU path of gmbench measured on a CUDA GPU, as one prepared script.

On a machine with a CUDA GPU and PyTorch, Triton, pluggy, pandas, PyYAML and
scikit-learn already installed (no network needed), from the repository root:

    python -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site .
    PYTHONPATH=/tmp/site python benchmarks/gpu_report.py --out gpu-report.json

It prints one table per section and writes every number to ``--out`` (JSON):

* ``environment``  device, SM count, max SM clock (``nvidia-smi``), versions,
  and the FP32 peak estimated as ``SMs x 128 lanes x 2 (FMA) x clock``;
* ``correctness``  fused vs torch backend on CUDA, values and gradients;
* ``evaluate``     ``evaluate_at_centroids`` for 8 x 8 mixtures of N in
  {640, 2560, 10240} 3D Gaussians, forward and forward+backward: torch (GEMM
  form on CUDA), fused with 4 and with 8 warps per tile, fused with cut-off
  1e-5; time (median of CUDA-event timings), pairs/s, peak memory, and the fraction of the FP32 peak, counting
  ``2F + 4`` operations per pair in forward (the exponent's dot product over
  ``F = 10`` features, clamp, exp, multiply-add; exp counted as one) and three
  times that in forward+backward (recomputed exponent, two gradient products);
* ``dense_fit``    the dense ReLU fit (shared weight-set pass) at N = 2560;
* ``reduction``    MEM and TreeHEM T=2 on CUDA, 2560 -> 32, forward and
  forward+backward, node fits by the PyTorch reference and by the Triton
  kernels (``implementation: torch`` / ``triton``) and their largest difference;
* ``training``     one training step of the paper's ModelNet10 GMCN layout at
  batch 21, torch vs fused: median step time, peak memory, against the
  paper's ~6 s and 5.6 GB (goals: at most 0.3 s, under 1 GB).

``--smoke`` runs tiny sizes; with ``--device cpu`` and ``TRITON_INTERPRET=1``
it checks the script itself on a machine without a GPU (the test suite does
this); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from gmbench import backends, plugins
from gmbench import mixture as gm
from gmbench.io import write_text

PAPER_LAYOUT = "1/128->8/64->16/32->32/16->64/8->10"
FEATURES_3D = 10
PAPER_STEP_S, PAPER_MEMORY_GB = 6.0, 5.6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call (CUDA events on a GPU)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak CUDA memory allocated during ``fn()`` beyond what was live before (NaN off CUDA)."""
    if device.type != "cuda":
        fn()
        return float("nan")
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(name=props.name, multiprocessors=props.multi_processor_count, memory_gb=props.total_memory / 1e9)
    try:
        clock = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()[0]
        info["max_sm_clock_mhz"] = float(clock)
        info["fp32_peak_tflops"] = props.multi_processor_count * 128 * 2 * float(clock) * 1e6 / 1e12
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        info["fp32_peak_tflops"] = None
    return info


def layer_output(n: int, device: torch.device, seed: int = 0, mixtures: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """A GMCN convolution output: ``mixtures`` (batch x channels, 8 x 8) of ``n`` 3D Gaussians with signed weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*mixtures, n, generator=g)
    p = torch.randn(*mixtures, n, 3, generator=g) * 2.0
    f = torch.randn(*mixtures, n, 3, 3, generator=g) * 0.3 + 0.5 * torch.eye(3)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.01)).to(device)


def correctness(device: torch.device, n: int) -> dict:
    m = layer_output(n, device)[:2, :2]
    results = {}
    for name, params in (("torch", {}), ("fused", {})):
        x = m.double() if name == "torch" else m.clone()
        x.requires_grad_(True)
        with backends.use(name, **params):
            out = gm.evaluate_at_centroids(x)
            (grad,) = torch.autograd.grad(out.sum(), x)
        results[name] = (out.detach().double(), grad.double())
    (ref, ref_grad), (out, grad) = results["torch"], results["fused"]
    return {
        "n": n,
        "value_error_rel": float((out - ref).abs().max() / ref.abs().max()),
        "grad_error_rel": float((grad - ref_grad).abs().max() / ref_grad.abs().max()),
    }


def evaluate_cases(device: torch.device, sizes: list[int], repeats: int, peak_tflops: float | None,
                   mixtures: tuple[int, int] = (8, 8)) -> list[dict]:
    rows = []
    cases = {
        "torch": ("torch", {}),
        "fused": ("fused", {"num_warps": 4}),
        "fused_8_warps": ("fused", {"num_warps": 8}),  # no register spills on sm_90: which wins?
        "fused_cutoff_1e-5": ("fused", {"cutoff": 1e-5}),
    }
    for n in sizes:
        m = layer_output(n, device, mixtures=mixtures)
        pairs = m.shape[0] * m.shape[1] * n * n
        for label, (backend, params) in cases.items():
            for mode in ("forward", "forward+backward"):
                x = m.clone().requires_grad_(mode != "forward")

                def run():
                    with torch.set_grad_enabled(mode != "forward"):
                        out = gm.evaluate_at_centroids(x)
                        if mode != "forward":
                            out.sum().backward()

                with backends.use(backend, **params):
                    seconds = timed(run, device, repeats)
                    memory = peak_memory_mb(run, device)
                ops = pairs * (2 * FEATURES_3D + 4) * (1 if mode == "forward" else 3)
                rows.append({
                    "implementation": label, "n": n, "mode": mode, "seconds": seconds,
                    "gpairs_per_s": pairs / seconds / 1e9, "peak_memory_mb": memory,
                    "fraction_of_fp32_peak": ops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
                })
    return rows


def dense_fit_cases(device: torch.device, n: int, repeats: int, mixtures: tuple[int, int] = (8, 8)) -> list[dict]:
    rows = []
    m = layer_output(n, device, mixtures=mixtures)
    fitting = plugins.create("transfer_fitting", "dense")
    for backend in ("torch", "fused"):
        x = m.clone().requires_grad_(True)

        def run():
            gm.weights(fitting.fit(x)).sum().backward()

        with backends.use(backend):
            rows.append({"backend": backend, "n": n, "mode": "forward+backward",
                         "seconds": timed(run, device, repeats), "peak_memory_mb": peak_memory_mb(run, device)})
    return rows


def reduction_cases(device: torch.device, n: int, repeats: int, mixtures: tuple[int, int] = (8, 8)) -> list[dict]:
    """MEM and TreeHEM T=2, ``mixtures`` (8 x 8) of ``n -> 32``: the Triton node fits against the PyTorch reference.

    Each method runs with ``implementation: torch`` and ``triton`` on the same
    input (forward, and forward+backward); ``max_rel_diff`` is the largest
    difference of the triton output from torch's, relative to its largest entry.
    """
    rows = []
    m = plugins.create("transfer_fitting", "dense").fit(layer_output(n, device, mixtures=mixtures)).detach()
    for label, name, params in (("mem", "mem", {}), ("treehem-T2", "treehem", {"T": 2})):
        outputs = {}
        for choice in ("torch", "triton"):
            reduction = plugins.create("reduction", name, **params, implementation=choice)
            with torch.no_grad():
                outputs[choice] = reduction.reduce(m, 32)
            for mode in ("forward", "forward+backward"):
                x = m.clone().requires_grad_(mode != "forward")

                def run():
                    with torch.set_grad_enabled(mode != "forward"):
                        out = reduction.reduce(x, 32)
                        if mode != "forward":
                            out.sum().backward()

                rows.append({"method": label, "implementation": choice, "n": n, "mode": mode,
                             "seconds": timed(run, device, repeats), "peak_memory_mb": peak_memory_mb(run, device)})
        difference = (outputs["triton"] - outputs["torch"]).abs().max() / outputs["torch"].abs().max().clamp_min(1e-30)
        for row in rows[-4:]:
            row["max_rel_diff"] = float(difference)
    return rows


def training_cases(device: torch.device, layout: str, batch: int, repeats: int) -> list[dict]:
    split = plugins.create("dataset", "shapes3d", samples_per_class=math.ceil(batch / 10) + 1,
                           test_samples_per_class=1).load("train")
    n_input = int(layout.split("->")[0].split("/")[1])
    inputs = plugins.create("input_fitting", "kmeans", seed=0).fit(split.points[:batch], n_input).to(device)
    labels = split.labels[:batch].to(device)
    rows = []
    for backend in ("torch", "fused"):
        torch.manual_seed(0)
        model = plugins.create("model", "gmcn", num_classes=10, dims=3, layout=layout).to(device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            optimiser.zero_grad()
            loss = torch.nn.functional.nll_loss(model(inputs), labels)
            loss = loss + model.regularization_loss(learning_rate=1e-3)
            loss.backward()
            optimiser.step()

        with backends.use(backend):
            seconds = timed(step, device, repeats)
            memory = peak_memory_mb(step, device)
        rows.append({"backend": backend, "layout": layout, "batch": batch, "step_seconds": seconds,
                     "peak_memory_mb": memory, "speedup_vs_paper_6s": PAPER_STEP_S / seconds})
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    print("  ".join(f"{k:>16}" for k in keys))
    for row in rows:
        print("  ".join(f"{v:>16.4g}" if isinstance(v, float) else f"{str(v):>16}" for v in row.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-report.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, not the GPU")
    parser.add_argument("--skip", nargs="*", default=[], choices=["evaluate", "dense_fit", "reduction", "training"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU here; run it on a GPU machine, or --smoke --device cpu with TRITON_INTERPRET=1")
        return 2
    if args.smoke:  # Triton's interpreter runs each kernel program in NumPy: 1 x 2 mixtures check the script
        sizes, n, mixtures, layout, batch, repeats = [64], 64, (1, 2), "1/8->4/4->10", 2, 1
    else:
        sizes, n, mixtures, layout, batch, repeats = [640, 2560, 10240], 2560, (8, 8), PAPER_LAYOUT, 21, 5
    shape = f"{mixtures[0]} x {mixtures[1]}"
    report: dict = {"environment": environment(device), "smoke": args.smoke}
    print(json.dumps(report["environment"]))
    report["correctness"] = correctness(device, n)
    print(f"\nfused vs torch (float64) on {device}: {report['correctness']}")
    peak = report["environment"].get("fp32_peak_tflops")
    sections = [
        ("evaluate", f"evaluate_at_centroids, {shape} mixtures, 3D, float32",
         lambda: evaluate_cases(device, sizes, repeats, peak, mixtures)),
        ("dense_fit", f"dense ReLU fit (shared pass), {shape} mixtures", lambda: dense_fit_cases(device, n, repeats, mixtures)),
        ("reduction", f"reduction {shape}, {n} -> 32, node fits torch vs triton",
         lambda: reduction_cases(device, n, repeats, mixtures)),
        ("training", f"training step, layout {layout}, batch {batch}", lambda: training_cases(device, layout, batch, repeats)),
    ]
    for key, title, measure in sections:
        if key in args.skip:
            continue
        report[key] = measure()
        print_rows(title, report[key])
        write_text(args.out, json.dumps(report, indent=2) + "\n")  # keep what finished
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
