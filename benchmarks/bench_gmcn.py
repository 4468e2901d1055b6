"""Training-step time and peak memory of the paper's ModelNet10 GMCN (Section 5, Table 3), CPU.

Run:  OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_gmcn.py -q -s

Model: layout ``1/128->8/64->16/32->32/16->64/8->10``, N_k = 5, 3D, dense ReLU
fitting, reduction TreeHEM (T = 2) or modified EM; input: random 3D mixtures of
128 Gaussians shaped like fitted point clouds (positive weights summing to 1,
positions spread over a unit-variance cloud, small covariances).  One step =
forward, NLL + Eq. 8 weight decay, backward, Adam step, in training mode.

Reference numbers (paper, RTX 2080 Ti, batch 21): TreeHEM T=2 about 6 s per
step (19 h for 60 epochs of 3991 samples) and 5.6 GB; MEM runs out of memory.

Each case records in ``extra_info``: ``step_s`` (the one measured step),
``peak_rss_mb`` (the process's peak resident memory during the step, after
resetting the high-water mark through ``/proc/self/clear_refs``; Linux only),
``per_sample_s`` and, for batch 4, ``per_sample_ratio_vs_batch_1`` of the same
reduction in this run (batching efficiency: 1.0 = no gain from batching).

Stage breakdown (``test_training_step_stages``, also ``python
benchmarks/bench_gmcn.py``): for the three layouts of the speed targets --
the paper's ModelNet10 layout (3D), the quickstart layout ``1/16->8/8->10``
(2D) and the MNIST layout ``1/32->8/16->10`` (2D) -- one training step with
TreeHEM T=2, timed per stage (convolution, dense-fit evaluation, reduction,
pooling, head and the rest of the forward, backward, optimizer) with the
Gaussian-point pairs the dense fits evaluate, once with the PyTorch node fits
(``implementation: torch``, "before") and once with the native kernel
("after"), in the same process, their steps interleaved so that both see the
same machine load; the fastest of three steps after a warm-up is reported.  ``GMBENCH_BENCH_BATCH`` (default 21) and
``GMBENCH_BENCH_LAYOUTS`` (comma-separated names: paper, quickstart, mnist)
choose the cases; ``GMBENCH_BENCH_CUTOFF`` (for example ``1e-5``) adds a third
case, "cutoff": the native kernel with the backend's spatial cut-off at that
tolerance (the pairs column then still counts the exact sum's pairs).
``GMBENCH_BENCH_INPUT=data`` replaces the random inputs by k-means fits of real
samples (shapes3d for the paper layout, mnist5k for the 2D layouts), so the
cut-off sees the activations of point sets that lie on surfaces or strokes.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gmbench import backends, plugins
from gmbench import mixture as gm

PAPER_LAYOUT = "1/128->8/64->16/32->32/16->64/8->10"
RESULTS: dict[tuple[str, int], dict] = {}


def fitted_like_inputs(batch: int, n: int = 128, seed: int = 0, dims: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(batch, 1, n, generator=g) + 0.5
    weights = weights / weights.sum(-1, keepdim=True)
    positions = torch.randn(batch, 1, n, dims, generator=g)
    factor = 0.1 * torch.randn(batch, 1, n, dims, dims, generator=g)
    covariances = factor @ factor.transpose(-1, -2) + 0.01 * torch.eye(dims)
    return gm.pack(weights, positions, covariances)


# Inputs of the stage breakdown: "random" (fitted_like_inputs) or "data": k-means fits of real
# samples (shapes3d for the 3D layout, mnist5k for the 2D ones), whose activations are what a
# spatial cut-off sees in training; random clouds fill a volume, fitted point sets a surface.
INPUT_DATASETS = {3: ("shapes3d", {}), 2: ("mnist5k", {"reg_covar": 0.1})}


def data_inputs(batch: int, n: int, dims: int) -> torch.Tensor:
    dataset, fitting_params = INPUT_DATASETS[dims]
    split = plugins.create("dataset", dataset).load("train")
    return plugins.create("input_fitting", "kmeans", seed=0, **fitting_params).fit(split.points[:batch], n)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


REDUCTIONS = {"treehem_T2": ("treehem", {"T": 2}), "mem": ("mem", {})}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_modelnet10_gmcn_training_step(benchmark, reduction, batch):
    name, params = REDUCTIONS[reduction]
    torch.manual_seed(0)
    model = plugins.create("model", "gmcn", num_classes=10, dims=3, layout=PAPER_LAYOUT, kernel_gaussians=5,
                           reduction=name, reduction_params=params)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = fitted_like_inputs(batch)
    y = torch.arange(batch) % 10
    model.train()

    def step():
        loss = F.nll_loss(model(x), y) + model.regularization_loss(learning_rate=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    # A batch of one cannot feed the head's batch norm in training mode; the
    # paper's recipe never sees one (the trainer merges a trailing single sample).
    if batch == 1:
        model.head.eval()
    measured = reset_peak_rss()
    started = time.perf_counter()
    loss = benchmark.pedantic(step, rounds=1, iterations=1)
    elapsed = time.perf_counter() - started
    info = {
        "step_s": elapsed,
        "per_sample_s": elapsed / batch,
        "peak_rss_mb": peak_rss_mb() if measured else float("nan"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    assert torch.isfinite(torch.tensor(loss))
    single = RESULTS.get((reduction, 1))
    if batch == 4 and single is not None:
        info["per_sample_ratio_vs_batch_1"] = info["per_sample_s"] / single["per_sample_s"]
    RESULTS[(reduction, batch)] = info
    benchmark.extra_info.update(info)
    print(f"\n{reduction} batch {batch}: " + ", ".join(f"{k}={v:.3g}" for k, v in info.items()))


# -- per-stage breakdown, PyTorch node fits vs the native kernel --------------------------------

LAYOUTS = {
    "paper": (PAPER_LAYOUT, 3),
    "quickstart": ("1/16->8/8->10", 2),
    "mnist": ("1/32->8/16->10", 2),
}
STAGE_LAYOUTS = [n for n in os.environ.get("GMBENCH_BENCH_LAYOUTS", "quickstart,mnist,paper").split(",") if n]
STAGE_BATCH = int(os.environ.get("GMBENCH_BENCH_BATCH", "21"))
BENCH_CUTOFF = float(os.environ["GMBENCH_BENCH_CUTOFF"]) if os.environ.get("GMBENCH_BENCH_CUTOFF") else None
BENCH_INPUT = os.environ.get("GMBENCH_BENCH_INPUT", "random")
if BENCH_INPUT not in ("random", "data"):
    raise SystemExit(f"GMBENCH_BENCH_INPUT must be 'random' or 'data', got {BENCH_INPUT!r}")
# when -> (node-fit implementation, backend parameters)
CASES = {"before": ("torch", {}), "after": ("native", {})}
if BENCH_CUTOFF is not None:
    CASES["cutoff"] = ("native", {"cutoff": BENCH_CUTOFF})
STAGES = ["convolution", "dense fit", "reduction", "pooling", "head+rest", "backward", "optimizer"]
STAGE_RESULTS: dict[tuple[str, str], dict] = {}


class StageClock:
    """Wall time per stage, accumulated over the blocks of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def wrap(self, owner, attribute: str, stage: str, count_pairs: bool = False) -> None:
        function = getattr(owner, attribute)

        def timed(m, *args, **kwargs):
            if count_pairs:  # the dense fit evaluates every mixture at its own N centroids
                self.pairs += m[..., 0].numel() * m.shape[-2]
            started = time.perf_counter()
            result = function(m, *args, **kwargs)
            self.seconds[stage] += time.perf_counter() - started
            return result

        setattr(owner, attribute, timed)


def instrumented_model(layout: str, dims: int, implementation: str, clock: StageClock):
    torch.manual_seed(0)
    model = plugins.create("model", "gmcn", num_classes=10, dims=dims, layout=layout, kernel_gaussians=5,
                           reduction="treehem", reduction_params={"T": 2, "implementation": implementation})
    for block in model.blocks:
        clock.wrap(block.convolution, "forward", "convolution")
        clock.wrap(block.fitting.transfer_fitting, "fit", "dense fit", count_pairs=True)
        clock.wrap(block.fitting.reduction, "reduce", "reduction")
        if block.pooling is not None:
            clock.wrap(block.pooling, "forward", "pooling")
    return model


def training_step_case(layout_name: str, implementation: str, backend_params: dict, batch: int = STAGE_BATCH):
    """A function that runs one training step (on the torch backend with ``backend_params``) and returns its time per stage."""
    layout, dims = LAYOUTS[layout_name]
    clock = StageClock()
    model = instrumented_model(layout, dims, implementation, clock)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if BENCH_INPUT == "data":
        x = data_inputs(batch, model.input_gaussians, dims)
    else:
        x = fitted_like_inputs(batch, model.input_gaussians, dims=dims)
    y = torch.arange(batch) % 10
    model.train()

    def step() -> dict:
        with backends.use("torch", **backend_params):
            return timed_step()

    def timed_step() -> dict:
        clock.seconds.clear()
        clock.pairs = 0
        measured = reset_peak_rss()
        started = time.perf_counter()
        loss = F.nll_loss(model(x), y) + model.regularization_loss(learning_rate=1e-3)
        forward = time.perf_counter() - started
        started = time.perf_counter()
        loss.backward()
        clock.seconds["backward"] = time.perf_counter() - started
        started = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        clock.seconds["optimizer"] = time.perf_counter() - started
        staged = sum(clock.seconds[s] for s in ("convolution", "dense fit", "reduction", "pooling"))
        clock.seconds["head+rest"] = forward - staged
        info = {stage: clock.seconds[stage] for stage in STAGES}
        info["step_s"] = forward + clock.seconds["backward"] + clock.seconds["optimizer"]
        info["pairs_forward"] = clock.pairs
        info["peak_rss_mb"] = peak_rss_mb() if measured else float("nan")
        assert torch.isfinite(loss)
        return info

    return step


def training_step_stages(layout_name: str, batch: int = STAGE_BATCH, steps: int = 3) -> dict[str, dict]:
    """Before and after, steps interleaved (both see the same machine load); the fastest step of each.

    One warm-up step each first (it builds the kernel and allocates).
    """
    cases = {when: training_step_case(layout_name, implementation, params, batch) for when, (implementation, params) in CASES.items()}
    best: dict[str, dict] = {}
    for step in range(steps + 1):
        for when, run in cases.items():
            info = run()
            if step > 0 and (when not in best or info["step_s"] < best[when]["step_s"]):
                best[when] = info
    return best


@pytest.mark.parametrize("layout_name", STAGE_LAYOUTS)
def test_training_step_stages(benchmark, layout_name):
    both = benchmark.pedantic(lambda: training_step_stages(layout_name), rounds=1, iterations=1)
    for when, info in both.items():
        STAGE_RESULTS[(layout_name, when)] = info
        benchmark.extra_info.update({f"{when}_{key}": value for key, value in info.items()})


def print_stage_table(results: dict[tuple[str, str], dict], batch: int = STAGE_BATCH) -> None:
    print(f"\nGMCN training step by stage (TreeHEM T=2, batch {batch}, {torch.get_num_threads()} threads, "
          "wall s; before: PyTorch node fits, after: native kernel"
          + (f", cutoff: native kernel and cut-off {BENCH_CUTOFF:g}" if BENCH_CUTOFF is not None else "")
          + f"; {'fitted shapes3d / mnist5k samples' if BENCH_INPUT == 'data' else 'random fitted-like'} inputs; same run)")
    print(f"{'layout':<12}{'when':<8}" + "".join(f"{s:>11}" for s in STAGES) + f"{'step':>9}{'G pairs':>9}"
          f"{'peak MiB':>10}{'speed-up':>10}")
    for (layout_name, when), info in results.items():
        before = results.get((layout_name, "before"))
        speed_up = before["step_s"] / info["step_s"] if before and when != "before" else float("nan")
        print(f"{layout_name:<12}{when:<8}" + "".join(f"{info[s]:>11.3f}" for s in STAGES)
              + f"{info['step_s']:>9.3f}{info['pairs_forward'] / 1e9:>9.3f}{info['peak_rss_mb']:>10.0f}{speed_up:>10.1f}")


@pytest.fixture(scope="module", autouse=True)
def stage_summary():
    yield
    if STAGE_RESULTS:
        print_stage_table(STAGE_RESULTS)


if __name__ == "__main__":
    results = {}
    for name in STAGE_LAYOUTS:
        for when, info in training_step_stages(name).items():
            results[(name, when)] = info
    print_stage_table(results)
