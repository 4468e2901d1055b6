"""The Triton node-fit kernels (backends/node_fit_triton.py) against the PyTorch reference.

In Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by the fixture before
the kernels are imported): values and gradients of the E/M step, of TreeHEM's
node fit and of whole reductions, float32 and float64, 2D and 3D, on the
awkward inputs of ``tests/test_node_fit_cpu.py`` (zero and negative weights,
padding, duplicated centroids, (nearly) singular covariances).  Outside the
interpreter: every kernel variant the reductions launch compiles ahead of time
to sm_80 and sm_90 binaries (no GPU needed), and the implementation choice.
Sizes are small: the interpreter runs each program in NumPy.  The compile
checks take a minute or more (``slow``; ``-m "not slow"`` leaves them out).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import GmbenchError, PluginError
from gmbench.reduction import em, implementation, node_fit
# The reference comparisons, tolerances and awkward inputs are the C++ kernel's (same sum-order argument).
from test_node_fit_cpu import TOL, assert_same, awkward, random_mixture, values_and_grads

needs_triton = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed (pip install 'gmbench[fused]')"
)


@pytest.fixture(scope="module")
def interpreter():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: it reads its knobs then
    pytest.importorskip("triton", reason="triton is not installed (pip install 'gmbench[fused]')")
    if "gmbench.backends.node_fit_triton_kernels" in sys.modules and previous in (None, "", "0"):
        pytest.skip("the node-fit kernels were compiled for CUDA (TRITON_INTERPRET unset at import); run with TRITON_INTERPRET=1")
    from gmbench.backends import node_fit_triton

    yield node_fit_triton
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kl_threshold", [1.0, None])
def test_em_step_matches_the_reference(interpreter, dtype, dims, kl_threshold):
    # 40 targets in 3 blocks of the kernel's loop over rows (the last one ragged), 7 fitting Gaussians.
    target = awkward(random_mixture(6, 40, dims, seed=dims, signed=True), degenerate_eps=0.0).to(dtype)
    g = torch.Generator().manual_seed(3)
    target_valid = (torch.rand(6, 40, generator=g) > 0.2) & (gm.weights(target) != 0)
    fitting = target[:, :7].clone()
    fitting_valid = target_valid[:, :7].clone()
    fitting_valid[2] = False  # a problem without any valid fitting Gaussian
    inputs = (target, target_valid, fitting, fitting_valid)

    def run(step):
        return lambda t, tv, f, fv: step(t, tv, f, fv, 20.0, kl_threshold)

    assert_same(values_and_grads(run(em.em_step), inputs, (0, 2)),
                values_and_grads(run(interpreter.em_step), inputs, (0, 2)), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_em_step_split_over_programs_matches_the_reference(interpreter, monkeypatch, dtype):
    # Blocks of 8 rows, 16 rows per program: 40 targets in 3 programs (the last ragged), summed after.
    monkeypatch.setattr(interpreter, "TILE_ELEMENTS", 8 * 8 * 16)
    monkeypatch.setattr(interpreter, "ROWS_PER_PROGRAM", 16)
    assert interpreter.em_launch_config(40, 7, 3)["BLOCK_S"] == 8
    target = awkward(random_mixture(3, 40, 3, seed=5, signed=True)).to(dtype)
    valid = gm.weights(target) != 0
    inputs = (target, valid, target[:, 30:37].clone(), valid[:, 30:37].clone())

    def run(step):
        return lambda t, tv, f, fv: step(t, tv, f, fv, 20.0, 1.0)

    assert_same(values_and_grads(run(em.em_step), inputs, (0, 2)),
                values_and_grads(run(interpreter.em_step), inputs, (0, 2)), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("width,max_out", [(4, 2), (8, 4), (6, 6)])
def test_fit_nodes_matches_the_reference(interpreter, dtype, dims, width, max_out):
    # (6, 6): a width that is no power of two (padded inside) and the partial fit's max_out = S.
    n = 16
    target = awkward(random_mixture(n, width, dims, seed=width + dims, signed=True)).to(dtype)
    valid = (torch.rand(n, width, generator=torch.Generator().manual_seed(4)) > 0.25) & (gm.weights(target) != 0)
    n_out = torch.randint(1, max_out + 1, (n,), generator=torch.Generator().manual_seed(6))

    def run(fit):
        return lambda t, v: fit(t, v, n_out, max_out, 4.0, 0.5)

    assert_same(values_and_grads(run(node_fit.fit_nodes), (target, valid), (0,)),
                values_and_grads(run(interpreter.fit_nodes), (target, valid), (0,)), dtype)


@pytest.mark.parametrize("width", [8, 16])
def test_initial_order_picks_the_references_initial_gaussians_with_ties(interpreter, width):
    # Duplicates (distance 0, equal |w|) and a whole node of one Gaussian repeated: ties everywhere.
    # Width 16: TreeHEM T = 8's partial fit (a four-warp tile).
    target = random_mixture(5, width, 2, seed=3, signed=True)
    target[1] = target[1, :1].expand(width, -1)
    target[2, width // 2 :] = target[2, : width // 2]
    valid = torch.ones(5, width, dtype=torch.bool)
    valid[3, ::2] = False
    n_out = torch.tensor([1, 3, 4, width, 2])
    expected, expected_valid = node_fit.initial_gaussians(target, valid, n_out, width)
    order, order_valid = interpreter.initial_order(target, valid, n_out, width)
    assert torch.equal(order_valid, expected_valid)
    assert torch.equal(node_fit.take(target, order)[order_valid], expected[expected_valid])


def test_em_step_gradcheck_float64(interpreter):
    # The kernel's forward and the reference's recomputed backward describe one function.
    # Small: every numerical derivative is a run of the interpreter.
    target = random_mixture(1, 6, 2, seed=7, signed=True)
    valid = torch.tensor([[True, True, True, False, True, True]])
    fitting = target[:, :2].clone().requires_grad_(True)
    target = target.requires_grad_(True)

    def step(t, f):
        return interpreter.em_step(t, valid, f, valid[:, :2], 4.0, 1.0)[0]

    assert torch.autograd.gradcheck(step, (target, fitting), eps=1e-6, atol=1e-5)


METHODS = [("treehem", {"T": 2}), ("treehem", {"T": 4}), ("mem", {})]
IDS = ["treehem-T2", "treehem-T4", "mem"]


def reduce_both(name, params, m, n_out):
    results = []
    for choice in ("torch", "triton"):
        reduction = plugins.create("reduction", name, **params, implementation=choice)
        results.append(values_and_grads(lambda x: (reduction.reduce(x, n_out), torch.ones(1)), (m,), (0,), 9))
    return results


# Both dtypes and dimensions are covered per kernel above; here two combinations per method.
@pytest.mark.parametrize("dims,dtype", [(2, torch.float32), (3, torch.float64)], ids=["2d-f32", "3d-f64"])
@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_triton_matches_torch(interpreter, name, params, dims, dtype):
    # Padding (weight 0) shuffled in, awkward Gaussians, a batch of 2 x 2 mixtures.
    m = random_mixture(4, 25, dims, seed=10 + dims, signed=True)
    m = gm.pad(awkward(m), 30)[:, torch.randperm(30, generator=torch.Generator().manual_seed(2))].to(dtype)
    reference, result = reduce_both(name, params, m.unflatten(0, (2, 2)), 7)
    assert_same(reference, result, dtype)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_triton_matches_torch_on_all_zero_input(interpreter, name, params):
    m = gm.with_weights(random_mixture(2, 12, 2), torch.zeros(2, 12, dtype=torch.float64))
    reference, result = reduce_both(name, params, m, 5)
    assert_same(reference, result, torch.float64)
    assert bool((gm.weights(result[0]) == 0).all())


def fake_tensor(device_type):
    """What the choice looks at: device type, dtype and the last axis (a CUDA tensor without a GPU)."""
    return SimpleNamespace(device=SimpleNamespace(type=device_type), dtype=torch.float32, shape=(1, 4, 13))


@needs_triton
def test_auto_uses_triton_on_cuda_tensors_and_native_on_cpu(monkeypatch):
    from gmbench.backends import node_fit_cpu, node_fit_triton, triton_cache

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_cache, "prepare_cache", lambda: None)
    assert implementation.native_kernel("auto", fake_tensor("cuda")) is node_fit_triton
    assert implementation.native_kernel("triton", fake_tensor("cuda")) is node_fit_triton
    assert implementation.native_kernel("torch", fake_tensor("cuda")) is None
    if node_fit_cpu.unavailable_reason() is None:
        assert implementation.native_kernel("auto", random_mixture(1, 4, 3)) is node_fit_cpu


@needs_triton
def test_triton_on_cpu_tensors_outside_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reduction = plugins.create("reduction", "mem", implementation="triton")
    with pytest.raises(GmbenchError, match=r"^reduction implementation 'triton' cannot run on this cpu float64 tensor: "
                                           r"the Triton node fits run on CUDA tensors .*; use implementation: auto or torch$"):
        reduction.reduce(random_mixture(1, 6, 2).unsqueeze(0), 3)


def test_without_triton_auto_keeps_torch_on_cuda_and_triton_says_why():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from types import SimpleNamespace as N\n"
        "from gmbench.errors import GmbenchError\n"
        "from gmbench.reduction import implementation\n"
        "m = N(device=N(type='cuda'), dtype=torch.float32, shape=(1, 4, 7))\n"
        "print(implementation.native_kernel('auto', m) is None)\n"
        "try:\n"
        "    implementation.native_kernel('triton', m)\n"
        "except GmbenchError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    auto_is_torch, refusal = result.stdout.splitlines()
    assert auto_is_torch == "True"
    assert refusal == ("reduction implementation 'triton' cannot run on this cuda float32 tensor: triton is not installed "
                       "(pip install 'gmbench[fused]'); use implementation: auto or torch")


def test_unknown_implementation_names_the_choices():
    with pytest.raises(PluginError, match="implementation must be one of 'auto', 'native', 'torch', 'triton'"):
        plugins.create("reduction", "mem", implementation="cuda")


AOT_COMPILE = r"""
import json, sys
from concurrent.futures import ProcessPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gmbench.backends import node_fit_triton as nt
from gmbench.backends import node_fit_triton_kernels as k

def signature(kernel, dtype):
    P = "*" + dtype
    names = ["TF", "TW", "TV", "TLD", "TVIRT", "FF", "FLN", "FLD", "FLP", "FW", "FV", "KL"]
    if kernel == "em_step_kernel":
        names += ["OUT_W", "OUT_U"]
    elif kernel == "em_step_backward_kernel":
        names += ["GWS", "GU", "G_TF", "G_TW", "G_TVIRT", "G_FF", "G_FLN", "G_FLP"]
    if kernel != "initial_order_kernel":
        sig = {n: "*u8" if n in ("TV", "FV") else P for n in names}
        return {**sig, "S": "i32", "Q": "i32", "rows_per_program": "i32"}
    return {"TARGET": P, "VALID": "*u8", "N_OUT": "*i64", "ORDER": "*i32", "ORDER_VALID": "*u8"}

def each_branch(variant):
    kernel, dtype, c = variant
    if kernel == "initial_order_kernel":
        return c["S"] == 4 or (c["S"] == 16 and dtype == "fp32")
    node_tile, mem_tile = (c["BLOCK_S"], c["BLOCK_Q"]) == (4, 2), c["BLOCK_Q"] == 32
    if not c["USE_KL"]:  # the gate's other branch: once per dimension
        return node_tile and dtype == "fp32" and kernel == "em_step_kernel"
    return node_tile or mem_tile

# Every launched variant for sm_90; each code branch for sm_80. The node-fit kernels have no
# tl.dot, so a tile shape lowers to the same layouts on both; the archs differ in PTX target
# and ptxas, which each branch exercises.
VARIANTS = nt.launch_variants()
JOBS = [(90, v) for v in VARIANTS] + [(80, v) for v in VARIANTS if each_branch(v)]

def build(job):
    arch, (kernel, dtype, constants) = job
    constants = dict(constants)
    warps = constants.pop("num_warps")
    sig = {**signature(kernel, dtype), **{name: "constexpr" for name in constants}}
    compiled = triton.compile(ASTSource(getattr(k, kernel), sig, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return [kernel, arch, dtype, sorted(constants.items()), len(compiled.asm["cubin"])]

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        print(json.dumps([[len(JOBS)]] + list(pool.map(build, JOBS, chunksize=4))))
"""


def compile_variants(tmp_path):
    """Compile the kernel variants for sm_90 and sm_80 in a process without TRITON_INTERPRET."""
    script = tmp_path / "aot_compile.py"
    script.write_text(AOT_COMPILE)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))  # really compile
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    missing_backend = "No module named 'triton.backends.nvidia'" in result.stderr
    missing_ptxas = "ptxas" in result.stderr and "not found" in result.stderr
    if result.returncode != 0 and (missing_backend or missing_ptxas):
        pytest.skip("Triton's CUDA backend or its ptxas is not installed here")
    assert result.returncode == 0, result.stderr[-3000:]
    (n_jobs,), *built = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(built) == n_jobs
    assert all(size > 0 for *_, size in built)
    return built


@needs_triton
@pytest.mark.slow
def test_every_launched_kernel_variant_compiles_to_cuda_binaries_without_a_gpu(tmp_path):
    # The interpreter does not check what the compiler does (types, layouts of the 3D tiles,
    # constexpr branches): compile with Triton's bundled ptxas every variant the reductions launch
    # (TreeHEM T = 2, 4, 8: levels and partial fits; MEM onto 32) for H100 (sm_90), and each
    # branch for A100 (sm_80): float32/float64, 2D/3D, forward and backward E+M kernels on the
    # one-warp TreeHEM node tile (T = 2) and the four-warp MEM tile, the KL gate's other branch in
    # float32, the clustering kernel (and its four-warp T = 8 tile in float32).
    from gmbench.backends import node_fit_triton

    built = compile_variants(tmp_path)
    for arch, expected in ((90, len(node_fit_triton.launch_variants())), (80, 2 * 2 * 5 + 2 + 2)):
        rows = [row for row in built if row[1] == arch]  # sm_80: 2 dtypes x 2 dims x 5, 2 gate-off, 2 wide clustering
        assert len(rows) == expected
        assert {row[0] for row in rows} == {"em_step_kernel", "em_step_backward_kernel", "initial_order_kernel"}
