r"""The spatial cut-off on real GMCN activations: pairs evaluated, planning cost, dense-fit speed.

Run:  python -m pytest benchmarks/bench_cutoff.py -q

Data: fitted input mixtures (``kmeans``) of the embedded data sets run
through an untrained ``gmcn``; every block's convolution output is what the
dense ReLU fit evaluates at its centroids:

* ``digits``   2D, 32 Gaussians, layout ``1/32->8/16->10``  (N = 160, 640),
* ``mnist5k``  2D, 32 Gaussians, layout ``1/32->8/16->10``  (N = 160, 640),
* ``shapes3d`` 3D, 128 Gaussians, layout ``1/128->8/64->8/32->10`` (N = 640, 2560, 1280),

8 samples each, float32.

``test_pairs_per_layer`` (not timed) prints, per data set and layer, the
fraction of pairs above the threshold ``tau = 1e-5 max|c|`` (brute force,
float64), the pairs the pair-list plan evaluates (``cutoff_native``) and those
the Morton 16 x 16 tile masks evaluated (the plan before it), as multiples of
the pairs above the threshold, and the planning time against one exact forward
pass (same run).

``test_dense_fit`` times the dense ReLU fit (``fit_relu_dense``: both weight
sets in one pass) on the shapes3d layers with N = 640 and 2560, forward and
forward+backward, for ``exact`` (``cutoff: null``), ``cutoff`` (1e-5, pair
lists) and ``morton`` (1e-5, the tile masks: the pair lists switched off);
the session prints every case's time relative to ``exact`` in the same run.

``test_time_breakdown`` splits one dense-fit evaluation (both weight sets) of
the shapes3d layers into the plan, the pair-list kernel forward and backward
and the exact kernel forward and backward, in process CPU time (run it with
``OMP_NUM_THREADS=1``), medians of 5 interleaved repetitions.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from gmbench import backends, plugins
from gmbench import mixture as gm
from gmbench.backends import cpu_kernel, cutoff, cutoff_native
from gmbench.backends.torch import CPU_TILE_M, CPU_TILE_N, gaussian_coefficients
from gmbench.fitting.dense import fit_relu_dense

TOLERANCE = 1e-5
DATASETS = {
    "digits": (2, "1/32->8/16->10", 32, {"samples_per_class": 1, "n_points": 256}),
    "mnist5k": (2, "1/32->8/16->10", 32, {"samples_per_class": 1}),
    "shapes3d": (3, "1/128->8/64->8/32->10", 128, {"samples_per_class": 1, "test_samples_per_class": 1}),
}
IMPLEMENTATIONS = ("exact", "cutoff", "morton")
RESULTS: dict[tuple[int, str, str], float] = {}
PAIR_ROWS: list[str] = []
BREAKDOWN_ROWS: list[str] = []


@pytest.fixture(scope="module")
def activations() -> dict[str, list[torch.Tensor]]:
    """``{data set: [convolution output of each block, [8, C, N, K] float32]}``."""
    out = {}
    for name, (dims, layout, n_in, params) in DATASETS.items():
        split = plugins.create("dataset", name, **params).load("test")
        inputs = plugins.create("input_fitting", "kmeans", seed=0).fit(split.points[:8], n_in)
        torch.manual_seed(0)
        model = plugins.create("model", "gmcn", num_classes=10, dims=dims, layout=layout).eval()
        with torch.no_grad(), backends.use("torch"):
            out[name] = [block.convolved.contiguous() for block in model.trace(inputs)]
    return out


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        write_summary(reporter)


def write_summary(reporter) -> None:
    if PAIR_ROWS:
        reporter.section(f"cut-off {TOLERANCE:g}: pairs evaluated / pairs above the threshold (this run)")
        reporter.write_line(f"{'data set':<9} {'layer':>5} {'N':>5} {'above':>7} {'pair lists':>10} {'morton 16':>10} "
                            f"{'plan ms':>8} {'exact fwd ms':>12}")
        for row in PAIR_ROWS:
            reporter.write_line(row)
    if BREAKDOWN_ROWS:
        reporter.section("one evaluation of both weight sets, process CPU ms, median of 5 (this run)")
        reporter.write_line(f"{'N':>5} {'plan':>7} {'fwd':>7} {'bwd':>7} {'exact fwd':>10} {'exact bwd':>10}")
        for row in BREAKDOWN_ROWS:
            reporter.write_line(row)
    if RESULTS:
        reporter.section("dense fit: time relative to exact (this run)")
        reporter.write_line(f"{'N':>5} {'mode':<17} {'exact s':>8} {'cutoff':>8} {'morton':>8}")
        for n, mode in sorted({(n, mode) for n, mode, _ in RESULTS}):
            exact = RESULTS.get((n, mode, "exact"), float("nan"))
            ratios = [exact / RESULTS.get((n, mode, impl), float("nan")) for impl in ("cutoff", "morton")]
            reporter.write_line(f"{n:>5} {mode:<17} {exact:>8.3f} {ratios[0]:>7.2f}x {ratios[1]:>7.2f}x")


def pairs_above(m: torch.Tensor) -> int:
    """Pairs (centroid i, Gaussian j) with ``|c_j| g_j(b_i) >= tau``, brute force in float64."""
    flat = m.reshape(-1, *m.shape[-2:]).double()
    positions, peaks = gm.positions(flat), gm.normalisation_factors(flat).abs()
    precision, _ = gm.symmetric_inverse_and_logdet(gm.covariances(flat))
    total = 0
    for g in range(flat.shape[0]):
        d = positions[g][:, None] - positions[g][None]
        q = torch.einsum("ijd,jde,ije->ij", d, precision[g], d)
        total += int((peaks[g][None] * torch.exp(-0.5 * q) >= TOLERANCE * peaks[g].max()).sum())
    return total


def morton_pairs(flat: torch.Tensor) -> int:
    tile = 16
    positions = gm.positions(flat)
    plan = cutoff.make_plan(positions, positions, gm.covariances(flat), gm.normalisation_factors(flat), TOLERANCE,
                            tile, tile, same_set=True)
    n = flat.shape[1]
    sizes = torch.full((-(-n // tile),), tile)
    sizes[-1] = n - (sizes.numel() - 1) * tile
    return int((plan.mask.long() * sizes[:, None] * sizes[None, :]).sum())


def test_pairs_per_layer(activations):
    if cutoff_native.load() is None:
        pytest.skip(f"the cut-off kernel is unavailable: {cutoff_native.LIBRARY.unavailable_reason()}")
    for name, layers in activations.items():
        for layer, m in enumerate(layers):
            flat = m.reshape(-1, *m.shape[-2:])
            positions = gm.positions(flat)
            start = time.perf_counter()
            plan = cutoff_native.make_plan(positions, positions, gm.covariances(flat),
                                           gm.normalisation_factors(flat), TOLERANCE)
            plan_s = time.perf_counter() - start
            with torch.no_grad(), backends.use("torch"):
                start = time.perf_counter()
                gm.evaluate_at_centroids(m)
                exact_s = time.perf_counter() - start
            above = pairs_above(m)
            total = flat.shape[0] * flat.shape[1] ** 2
            PAIR_ROWS.append(
                f"{name:<9} {layer:>5} {flat.shape[1]:>5} {above / total:>7.3f} {plan.pairs_evaluated / above:>9.2f}x "
                f"{morton_pairs(flat) / above:>9.2f}x {plan_s * 1e3:>8.1f} {exact_s * 1e3:>12.1f}"
            )


def make_call(m: torch.Tensor, mode: str):
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fit_relu_dense(m)
        return call
    leaf = m.clone().requires_grad_()

    def call():
        leaf.grad = None
        gm.weights(fit_relu_dense(leaf)).square().sum().backward()
    return call


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dense_fit(benchmark, activations, monkeypatch, implementation, layer, mode):
    m = activations["shapes3d"][layer]
    if implementation == "morton":
        monkeypatch.setattr(cutoff_native, "load", lambda: None)  # the tile masks, as before the pair lists
    params = {} if implementation == "exact" else {"cutoff": TOLERANCE}
    with backends.use("torch", **params):
        call = make_call(m, mode)
        call()  # warm-up (kernel build, allocator)
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:
        RESULTS[(m.shape[2], mode, implementation)] = benchmark.stats.stats.min


@pytest.mark.parametrize("layer", [0, 1])
def test_time_breakdown(activations, layer):
    if cutoff_native.load() is None or cpu_kernel.load() is None:
        pytest.skip("the C++ kernels are unavailable")
    m = activations["shapes3d"][layer]
    flat = m.reshape(-1, *m.shape[-2:])
    positions = gm.positions(flat)
    centre = positions.mean(-2, keepdim=True)
    A, c = gaussian_coefficients(flat, centre, torch.stack([gm.weights(flat), gm.weights(flat).abs()], -1))
    X = gm.quadratic_features(positions - centre)
    times: dict[str, list[float]] = {}

    def timed(name, call):
        start = time.process_time()
        result = call()
        times.setdefault(name, []).append(time.process_time() - start)
        return result

    for _ in range(6):  # the first round warms up (kernel builds, allocator) and is dropped
        plan = timed("plan", lambda: cutoff_native.make_plan(positions, positions, gm.covariances(flat),
                                                             c.abs().amax(-1), TOLERANCE))
        leaves = [t.clone().requires_grad_() for t in (X, A, c)]
        out = timed("fwd", lambda: cutoff_native.matvec_sets(*leaves, plan))
        upstream = torch.randn_like(out)
        timed("bwd", lambda: torch.autograd.grad(out, leaves, upstream))
        out = timed("exact fwd", lambda: cpu_kernel.CPUExpKernelMatVec.apply(*leaves, None, CPU_TILE_M, CPU_TILE_N))
        timed("exact bwd", lambda: torch.autograd.grad(out, leaves, upstream))
    ms = {name: statistics.median(values[1:]) * 1e3 for name, values in times.items()}
    BREAKDOWN_ROWS.append(f"{flat.shape[1]:>5} {ms['plan']:>7.1f} {ms['fwd']:>7.1f} {ms['bwd']:>7.1f} "
                          f"{ms['exact fwd']:>10.1f} {ms['exact bwd']:>10.1f}")
