"""The ``fused`` backend's Triton kernels, run in Triton's CPU interpreter, against the torch backend.

The kernels are the ones that compile for CUDA; ``TRITON_INTERPRET=1`` must be
set before :mod:`gmbench.backends.triton_kernels` is imported, which the
fixture below does (and skips, saying why, if that is impossible).
"""

import os
import subprocess
import sys

import pytest
import torch

from gmbench import backends
from gmbench import mixture as gm
from gmbench.backends import cutoff
from gmbench.errors import GmbenchError, PluginError


@pytest.fixture(scope="module")
def interpreter():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: it reads its knobs then
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    already = sys.modules.get("gmbench.backends.triton_kernels")
    if already is not None and previous in (None, "", "0"):
        pytest.skip(
            "triton_kernels was compiled for CUDA (TRITON_INTERPRET unset at import) on a machine without a GPU; "
            "run with TRITON_INTERPRET=1"
        )
    from gmbench.backends import triton_kernels  # noqa: F401  (decorated in interpreter mode now)

    yield
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


def random_mixture(batch, channels, n, dims, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return gm.pack(
        torch.randn(batch, channels, n, generator=g, dtype=torch.float64),
        torch.randn(batch, channels, n, dims, generator=g, dtype=torch.float64) * spread,
        gm.covariance_from_factor(torch.randn(batch, channels, n, dims, dims, generator=g, dtype=torch.float64) * 0.6, 0.05),
    )


def value_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(), inputs)
    return out, grads


def assert_close_relative(a, b, tol):
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a.double() - b.double()).abs().max() / scale) < tol


# N and M chosen so that several 64-wide tiles run, the last one ragged.
@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_at_centroids_values_and_gradients_match_torch(interpreter, dims):
    m = random_mixture(1, 2, 150, dims, seed=dims)
    with backends.use("torch", cpu_kernel="gemm"):
        expected, expected_grads = value_and_grads(gm.evaluate_at_centroids, m)
    with backends.use("fused"):
        out, grads = value_and_grads(gm.evaluate_at_centroids, m)
    assert out.dtype == torch.float64  # computed in float32, returned in the input dtype
    assert_close_relative(out, expected, 5e-5)  # float32 compute vs float64
    assert_close_relative(grads[0], expected_grads[0], 2e-4)


def test_evaluate_at_points_values_and_gradients_match_torch(interpreter):
    m = random_mixture(2, 1, 70, 3, seed=5)
    points = torch.randn(2, 1, 90, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2
    with backends.use("torch", cpu_kernel="gemm"):
        expected, expected_grads = value_and_grads(gm.evaluate, m, points)
    with backends.use("fused"):
        out, grads = value_and_grads(gm.evaluate, m, points)
    assert_close_relative(out, expected, 5e-5)  # float32 compute vs float64
    for g, e in zip(grads, expected_grads):  # w.r.t. the mixture and the points
        assert_close_relative(g, e, 2e-4)


def test_tile_mask_skips_exactly_the_masked_pairs_values_and_gradients(interpreter):
    from gmbench.backends.fused import BLOCK, FusedExpKernelMatVec

    g = torch.Generator().manual_seed(7)
    X = torch.randn(2, 150, 10, generator=g, dtype=torch.float64)
    A = torch.randn(2, 140, 10, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(2, 140, generator=g, dtype=torch.float64)
    X[..., -1] = 1.0
    A[..., -1] -= 6.0
    mask = (torch.rand(2, 3, 3, generator=g) > 0.4).to(torch.uint8)
    assert 0 < mask.sum() < mask.numel()
    pairs = mask.repeat_interleave(BLOCK, 1)[:, :150].repeat_interleave(BLOCK, 2)[:, :, :140].double()

    def reference(X, A, c):
        return ((X @ A.transpose(1, 2)).exp() * pairs * c[:, None, :]).sum(-1)

    expected, expected_grads = value_and_grads(reference, X, A, c)
    out, grads = value_and_grads(lambda X, A, c: FusedExpKernelMatVec.apply(X, A, c, mask, 4), X, A, c)
    assert_close_relative(out, expected, 1e-6)
    for g_, e in zip(grads, expected_grads):
        assert_close_relative(g_, e, 1e-5)


def test_cutoff_backend_matches_torch_cutoff(interpreter):
    # Two clusters: the cut-off skips the tiles between them.  Both backends get the same
    # float32 input and the same 64 x 64 mask, and both stay within float32 rounding of the
    # exact float64 sum (the skipped pairs add at most 1e-6 relative); a tile skipped by one
    # backend only would drop a whole cluster's contribution.  Each is compared with the
    # exact sum rather than with the other: both evaluate the float32 feature form, whose
    # exponent rounds with |x|^2 / sigma^2, so two float32 GEMMs differ by up to their sum of
    # errors (about 1e-4 with a cluster at x = 30 on CPUs without AVX-512).
    m = random_mixture(1, 1, 200, 2, seed=7, spread=1.0)
    shift = torch.zeros_like(gm.positions(m))
    shift[..., 100:, 0] = 12.0
    m = gm.pack(gm.weights(m), gm.positions(m) + shift, gm.covariances(m)).float()
    flat = m.reshape(1, 200, -1)
    plan = cutoff.make_plan(gm.positions(flat), gm.positions(flat), gm.covariances(flat),
                            gm.normalisation_factors(flat), 1e-6, same_set=True)
    assert plan.mask.shape == (1, 4, 4) and 0 < plan.active_fraction < 1
    with backends.use("torch", cpu_kernel="gemm"):
        exact = gm.evaluate_at_centroids(m.double())
    with backends.use("torch", cpu_kernel="gemm", cutoff=1e-6):
        torch_cutoff = gm.evaluate_at_centroids(m)
    with backends.use("fused", cutoff=1e-6):
        fused_cutoff = gm.evaluate_at_centroids(m)
    assert_close_relative(torch_cutoff, exact, 5e-5)
    assert_close_relative(fused_cutoff, exact, 5e-5)


def test_convolve_values_and_gradients_match_reference(interpreter):
    data = random_mixture(2, 3, 5, 3, seed=8)
    kernels = random_mixture(4, 3, 2, 3, seed=9, spread=0.5)
    expected, expected_grads = value_and_grads(
        lambda d, k: gm.convolve_dense(d, k).flatten(-2), data, kernels
    )
    with backends.use("fused"):
        out, grads = value_and_grads(lambda d, k: gm.convolve(d, k).flatten(-2), data, kernels)
    assert out.shape == expected.shape
    assert_close_relative(out, expected, 1e-6)
    for g, e in zip(grads, expected_grads):
        assert_close_relative(g, e, 1e-6)


def test_tensors_outside_cuda_give_a_clear_error_when_not_interpreting(interpreter, monkeypatch):
    with backends.use("fused") as backend:  # the context manager restores the previous backend
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(GmbenchError, match="move the model and data to CUDA"):
            backend.evaluate_at_centroids(random_mixture(1, 1, 4, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_selecting_fused_without_cuda_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PluginError, match="backend 'fused' cannot run here: .*(no CUDA GPU|triton is not installed)"):
        backends.use("fused")


def test_backend_module_imports_and_explains_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from gmbench.backends.fused import FusedBackend\n"
        "print(FusedBackend.unavailable_reason())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "triton is not installed; pip install 'gmbench[fused]'" in result.stdout


@pytest.mark.parametrize("n_sets", [2, 3])
@pytest.mark.parametrize("use_cutoff", [False, True])
def test_weight_sets_values_and_gradients_match_torch(interpreter, n_sets, use_cutoff):
    # The dense ReLU fit's shared pass: two weight vectors per exponential in one kernel
    # (three: a pair and a single).  Cut-off: masked tiles, the same 64 x 64 mask on both.
    m = random_mixture(1, 2, 150, 3, seed=10, spread=6.0 if use_cutoff else 2.0).float()
    g = torch.Generator().manual_seed(11)
    sets = torch.cat([gm.weights(m).unsqueeze(-1), torch.rand(1, 2, 150, n_sets - 1, generator=g)], -1)
    params = {"cutoff": 1e-4} if use_cutoff else {}

    def run(m, sets):
        return gm.evaluate_weight_sets_at_centroids(m, sets)

    # With the cut-off both plan from the same float32 input (float64 may flip a borderline tile).
    reference_dtype = torch.float32 if use_cutoff else torch.float64
    with backends.use("torch", cpu_kernel="gemm", **params):
        expected, expected_grads = value_and_grads(run, m.to(reference_dtype), sets.to(reference_dtype))
    with backends.use("fused", **params):
        out, grads = value_and_grads(run, m, sets)
    assert out.shape == (1, 2, 150, n_sets)
    assert_close_relative(out, expected, 5e-5)
    for g_, e in zip(grads, expected_grads):  # float32 on both sides with the cut-off: both round
        assert_close_relative(g_, e, 1e-3 if use_cutoff else 2e-4)


def test_prepared_gpu_report_runs_end_to_end_in_the_interpreter(tmp_path):
    # benchmarks/gpu_report.py is what a session with a lent GPU runs in one call;
    # its smoke mode checks every section here, on CPU, in Triton's interpreter.
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_report.py"
    out = tmp_path / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["correctness"]["value_error_rel"] < 1e-4
    assert report["correctness"]["grad_error_rel"] < 1e-3
    assert {row["implementation"] for row in report["evaluate"]} == {"torch", "fused", "fused_8_warps", "fused_cutoff_1e-5"}
    assert {row["backend"] for row in report["training"]} == {"torch", "fused"}
    assert all(row["step_seconds"] > 0 for row in report["training"])


AOT_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gmbench.backends import triton_kernels as k

block = int(sys.argv[1])
P, U8, I, C = "*fp32", "*u8", "i32", "constexpr"
tiles = {"BLOCK_M": C, "BLOCK_N": C, "FP": C, "HAS_MASK": C, "W": C}
common = {"M": I, "N": I, "n_mt": I, "n_nt": I, **tiles}
kernels = {
    "forward": (k.ekmv_forward_kernel, {"X": P, "A": P, "C": P, "MASK": U8, "OUT": P, **common}),
    "grad_x": (k.ekmv_grad_x_kernel, {"X": P, "A": P, "C": P, "GO": P, "MASK": U8, "GX": P, **common}),
    "grad_a_c": (k.ekmv_grad_a_c_kernel, {"X": P, "A": P, "C": P, "GO": P, "MASK": U8, "GA": P, "GC": P, **common}),
}
built = []
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for name, (fn, signature) in kernels.items():
        for sets in (1, 2):
            for has_mask in (False, True):
                constants = {"BLOCK_M": block, "BLOCK_N": block, "FP": k.FEATURES_PADDED, "HAS_MASK": has_mask, "W": sets}
                compiled = triton.compile(ASTSource(fn, signature, constexprs=constants), target=target)
                built.append([name, arch, sets, has_mask, len(compiled.asm["cubin"])])
    signature = {"DATA": P, "KERNELS": P, "OUT": P, "F_i": I, "N_i": I, "N_k": I, "F_o": I, "K": I, "BLOCK": C, "KP": C}
    compiled = triton.compile(ASTSource(k.convolve_kernel, signature, constexprs={"BLOCK": 64, "KP": 16}), target=target)
    built.append(["convolve", arch, 0, False, len(compiled.asm["cubin"])])
print(json.dumps(built))
"""


def test_kernels_compile_to_cuda_binaries_without_a_gpu(tmp_path):
    # The interpreter does not check what the compiler does (types, tl.dot shapes, constexpr
    # branches): compile every kernel variant ahead of time for A100 (sm_80) and H100 (sm_90)
    # with Triton's bundled ptxas, in a process where TRITON_INTERPRET is unset.
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    from gmbench.backends.fused import BLOCK

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))  # really compile
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE, str(BLOCK)], capture_output=True, text=True, env=env, timeout=900
    )
    missing_backend = "No module named 'triton.backends.nvidia'" in result.stderr
    missing_ptxas = "ptxas" in result.stderr and "not found" in result.stderr
    if result.returncode != 0 and (missing_backend or missing_ptxas):
        pytest.skip("Triton's CUDA backend or its ptxas is not installed here")
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(built) == 2 * (3 * 2 * 2 + 1)
    assert all(size > 0 for *_, size in built)


def test_num_warps_is_a_validated_parameter_and_does_not_change_results(interpreter):
    with pytest.raises(PluginError, match="num_warps must be a power of two"):
        backends.use("fused", num_warps=3)
    m = random_mixture(1, 1, 70, 3, seed=12)
    with backends.use("fused", num_warps=4):
        four = gm.evaluate_at_centroids(m)
    with backends.use("fused", num_warps=8):
        eight = gm.evaluate_at_centroids(m)
    torch.testing.assert_close(four, eight)
