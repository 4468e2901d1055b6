"""The native node-fit kernel (backends/node_fit_cpu.py) against the PyTorch reference.

Values and gradients of the E/M step, of TreeHEM's node fit and of whole
reductions, float32 and float64, 2D and 3D, on the awkward inputs the
reduction tests cover (zero and negative weights, padding, duplicated
centroids, singular covariances); gradcheck in float64.
"""

import os
import subprocess
import sys

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.backends import node_fit_cpu
from gmbench.errors import GmbenchError, PluginError
from gmbench.reduction import em, implementation, node_fit
from gmbench.reduction.morton import morton_codes
from gmbench.reduction.scaling import prescale

pytestmark = pytest.mark.skipif(
    node_fit_cpu.unavailable_reason() is not None, reason=f"node-fit kernel: {node_fit_cpu.unavailable_reason()}"
)

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def random_mixture(batch, n, dims, seed=0, dtype=torch.float64, signed=False, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, generator=g, dtype=dtype) if signed else torch.rand(batch, n, generator=g, dtype=dtype) + 0.05
    p = torch.randn(batch, n, dims, generator=g, dtype=dtype) * spread
    f = torch.randn(batch, n, dims, dims, generator=g, dtype=dtype) * 0.4 + 0.6 * torch.eye(dims, dtype=dtype)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


def awkward(m, seed=1, degenerate_eps=1e-6):
    """Zero weights, a duplicated Gaussian and a (nearly) singular covariance, last in its problem.

    An exactly singular covariance (``degenerate_eps=0``) only as a target: as
    a fitting Gaussian its clamped determinant makes the precision infinite,
    and the reference's gradients are NaN too.
    """
    m = m.clone()
    g = torch.Generator().manual_seed(seed)
    zero = torch.rand(m.shape[:2], generator=g) < 0.15
    m[..., 0] = torch.where(zero, torch.zeros_like(m[..., 0]), m[..., 0])
    m[0, 1] = m[0, 0]  # duplicated centroid and covariance
    d = gm.n_dims(m)
    singular = degenerate_eps * torch.eye(d, dtype=m.dtype)
    singular[0, 0] = 1.0  # rank 1 (+ eps): det 0 is clamped to tiny
    m[1, -1, 1 + d :] = singular.flatten()
    return m


def values_and_grads(function, inputs, differentiable, seed=5):
    leaves = [x.clone().requires_grad_(True) if i in differentiable else x for i, x in enumerate(inputs)]
    out, valid = function(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), valid, [leaves[i].grad for i in differentiable]


def assert_same(reference, native, dtype):
    (out_r, valid_r, grads_r), (out_n, valid_n, grads_n) = reference, native
    assert torch.equal(valid_r, valid_n)
    torch.testing.assert_close(out_n, out_r, **TOL[dtype])
    for grad_r, grad_n in zip(grads_r, grads_n):
        scale = grad_r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(grad_n / scale, grad_r / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kl_threshold", [1.0, None])
@pytest.mark.parametrize("signed", [False, True], ids=["positive", "signed"])
def test_em_step_matches_the_reference(dtype, dims, kl_threshold, signed):
    target = awkward(random_mixture(6, 40, dims, seed=dims, signed=signed), degenerate_eps=0.0).to(dtype)
    g = torch.Generator().manual_seed(3)
    target_valid = (torch.rand(6, 40, generator=g) > 0.2) & (gm.weights(target) != 0)
    fitting = target[:, :7].clone()
    fitting_valid = target_valid[:, :7].clone()
    fitting_valid[2] = False  # a problem without any valid fitting Gaussian
    inputs = (target, target_valid, fitting, fitting_valid)

    def run(step):
        return lambda t, tv, f, fv: step(t, tv, f, fv, 20.0, kl_threshold)

    reference = values_and_grads(run(em.em_step), inputs, (0, 2))
    native = values_and_grads(run(node_fit_cpu.em_step), inputs, (0, 2))
    assert_same(reference, native, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("width,max_out", [(4, 2), (8, 4), (4, 4)])
def test_fit_nodes_matches_the_reference(dtype, dims, width, max_out):
    target = awkward(random_mixture(300, width, dims, seed=width + dims, signed=True)).to(dtype)
    valid = (torch.rand(300, width, generator=torch.Generator().manual_seed(4)) > 0.25) & (gm.weights(target) != 0)
    n_out = torch.randint(1, max_out + 1, (300,), generator=torch.Generator().manual_seed(6))
    inputs = (target, valid)

    def run(fit):
        return lambda t, v: fit(t, v, n_out, max_out, 4.0, 0.5)

    assert_same(values_and_grads(run(node_fit.fit_nodes), inputs, (0,)),
                values_and_grads(run(node_fit_cpu.fit_nodes), inputs, (0,)), dtype)


def test_fit_nodes_passes_small_nodes_through_valid_first():
    target = random_mixture(3, 4, 2, seed=2)
    valid = torch.tensor([[True, False, True, False], [False, False, False, True], [True] * 4])
    out, out_valid = node_fit_cpu.fit_nodes(target, valid, torch.full((3,), 2), 2, 4.0, 0.5, pass_through=True)
    torch.testing.assert_close(out[0], target[0, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], target[1, [3, 0]], rtol=0, atol=0)
    assert out_valid.tolist() == [[True, True], [True, False], [True, True]]
    fitted, fitted_valid = node_fit.fit_nodes(target[2:], valid[2:], torch.tensor([2]), 2, 4.0, 0.5)
    torch.testing.assert_close(out[2:], fitted)


def test_em_step_gradcheck_float64():
    # Away from the gates' discontinuities (no duplicates, no near-singular covariances).
    target = random_mixture(2, 9, 3, seed=7, signed=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 4] = False
    fitting = target[:, :3].clone().requires_grad_(True)
    target = target.requires_grad_(True)

    def step(t, f):
        out, _ = node_fit_cpu.em_step(t, valid, f, valid[:, :3], 4.0, 1.0)
        return out

    assert torch.autograd.gradcheck(step, (target, fitting), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_fit_nodes_gradcheck_float64(dims):
    target = random_mixture(5, 4, dims, seed=8, signed=True).requires_grad_(True)
    valid = torch.ones(5, 4, dtype=torch.bool)
    valid[4, 3] = False

    def fit(t):
        return node_fit_cpu.fit_nodes(t, valid, torch.full((5,), 2), 2, 4.0, 0.5)[0]

    assert torch.autograd.gradcheck(fit, (target,), eps=1e-6, atol=1e-5)


METHODS = [("treehem", {"T": 2}), ("treehem", {"T": 4}), ("mem", {})]
IDS = ["treehem-T2", "treehem-T4", "mem"]


def reduce_both(name, params, m, n_out, seed=9):
    results = []
    for choice in ("torch", "native"):
        reduction = plugins.create("reduction", name, **params, implementation=choice)
        results.append(values_and_grads(lambda x: (reduction.reduce(x, n_out), torch.ones(1)), (m,), (0,), seed))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_native_matches_torch(name, params, dims, dtype):
    m = random_mixture(4, 61, dims, seed=10 + dims, signed=True)
    m = gm.pad(awkward(m), 70)[:, torch.randperm(70, generator=torch.Generator().manual_seed(2))].to(dtype)
    m = m.unflatten(0, (2, 2))
    reference, native = reduce_both(name, params, m, 9)
    assert_same(reference, native, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_treehem_with_runtime_node_size_matches_torch(dtype):
    # T = 2 and 4 run code with the node size fixed at compile time; T = 8 the general code.
    m = gm.pad(awkward(random_mixture(4, 90, 3, seed=31, signed=True)), 96).to(dtype)
    reference, native = reduce_both("treehem", {"T": 8}, m, 21)
    assert_same(reference, native, dtype)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_native_matches_torch_on_mixtures_of_different_real_counts(name, params):
    counts = [70, 9, 33, 6]
    m = torch.stack([gm.pad(random_mixture(1, c, 3, seed=c)[0], 70) for c in counts])
    reference, native = reduce_both(name, params, m, 5)
    assert_same(reference, native, torch.float64)


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_reduction_native_matches_torch_on_all_zero_input(name, params):
    m = gm.with_weights(random_mixture(2, 30, 2), torch.zeros(2, 30, dtype=torch.float64))
    reference, native = reduce_both(name, params, m, 5)
    assert_same(reference, native, torch.float64)
    assert bool((gm.weights(native[0]) == 0).all())


@pytest.mark.parametrize("name,params", METHODS, ids=IDS)
def test_native_reduction_gradcheck_float64(name, params):
    m = random_mixture(1, 13, 3, seed=4).requires_grad_(True)
    reduction = plugins.create("reduction", name, **params, implementation="native")
    assert torch.autograd.gradcheck(lambda x: reduction.reduce(x, 5), (m,), eps=1e-6, atol=1e-5)


MEM_OPTIONS = [
    {},
    {"kl_threshold": None},
    {"normalize_scale": False},
    {"weight_threshold": 0.3, "virtual_points": 4.0},
    {"kl_threshold": 4.0, "normalize_scale": False},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("options", MEM_OPTIONS, ids=["default", "no-kl", "unscaled", "weight-threshold", "kl-4"])
def test_mem_kernel_matches_torch_for_its_options(options, dims, dtype):
    # The fused MEM call (pre-scaling, initial choice, E+M step, masks) against the reference.
    m = awkward(random_mixture(5, 83, dims, seed=40 + dims, signed=True, spread=1.5)).to(dtype)
    m[2, :, 1 + dims:] *= 30.0  # one mixture at another scale
    reference, native = reduce_both("mem", options, m, 17)
    assert_same(reference, native, dtype)


@pytest.mark.parametrize("n", [8, 9, 40])
def test_mem_kernel_chooses_tied_initial_gaussians_as_the_stable_argsort(n):
    # Weights of few distinct magnitudes (ties at the boundary of the N_p largest) and
    # mixtures of one Gaussian more than N_p.
    m = random_mixture(3, n, 3, seed=n, signed=True)
    m[..., 0] = torch.tensor([1.0, -1.0, 0.5, 2.0])[torch.arange(n) % 4].expand(3, n)
    reference, native = reduce_both("mem", {}, m, 7)
    assert_same(reference, native, torch.float64)


def test_mem_kernel_rows_with_many_pairs_match_torch():
    # Without the KL gate and with few virtual samples every row shares its weight among
    # many fitting Gaussians: the sparse E step is then dense.
    m = random_mixture(2, 300, 3, seed=5, spread=0.7)
    reference, native = reduce_both("mem", {"kl_threshold": None, "virtual_points": 0.5}, m, 40)
    assert_same(reference, native, torch.float64)


@pytest.mark.parametrize("options", [{"kl_threshold": None}, {"normalize_scale": False, "virtual_points": 3.0}])
def test_mem_kernel_gradcheck_float64(options):
    m = random_mixture(2, 11, 2, seed=6, signed=True).requires_grad_(True)
    reduction = plugins.create("reduction", "mem", **options, implementation="native")
    assert torch.autograd.gradcheck(lambda x: reduction.reduce(x, 4), (m,), eps=1e-6, atol=1e-5)


def treehem_inputs(m, T, weight_threshold=1e-7):
    """The arguments the reduction hands to ``node_fit_cpu.treehem`` for ``m [G, N, K]`` (after its pre-scaling)."""
    reduction = plugins.create("reduction", "treehem", T=T, weight_threshold=weight_threshold)
    order, valid, n_leaves = reduction._morton_order(m)
    return valid, order, n_leaves


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["em_step", "mem", "treehem-T2", "treehem-T4"])
def test_saved_state_backward_equals_recompute_backward(kind, dims, dtype):
    # Bit for bit: the saved E steps are exactly what backward would recompute.
    m = gm.pad(awkward(random_mixture(5, 57, dims, seed=20 + dims, signed=True)), 64).to(dtype)
    if kind == "em_step":
        valid = gm.weights(m) != 0
        valid[3, 10:] = False

        def run(x, save_state):
            return node_fit_cpu.em_step(x, valid, x[:, :9], valid[:, :9], 20.0, 1.0, save_state=save_state)
    elif kind == "mem":
        def run(x, save_state):
            return node_fit_cpu.mem(x, 9, 20.0, 1.0, 1e-7, True, save_state=save_state)
    else:
        T = int(kind[-1])
        valid, order, n_leaves = treehem_inputs(m, T)

        def run(x, save_state):
            return node_fit_cpu.treehem(x, valid, order, n_leaves, T, 11, 4.0, 0.5, save_state=save_state)

    results = [values_and_grads(lambda x: run(x, save_state), (m,), (0,)) for save_state in (True, False)]
    (out_s, valid_s, (grad_s,)), (out_r, valid_r, (grad_r,)) = results
    assert torch.equal(out_s, out_r) and torch.equal(valid_s, valid_r)
    assert grad_s.abs().sum() > 0
    assert torch.equal(grad_s, grad_r)


def saved_storage_bytes(function):
    """Bytes of the distinct storages autograd keeps for the backward of ``function()``."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(saved.values())


def reference_pair_count(target, valid, fitting, fitting_valid, virtual_points, kl_threshold):
    """Pairs with r != 0 in the PyTorch reference's E step (float64: no flush-to-zero differences)."""
    with torch.no_grad():
        r = em.responsibilities(target, valid, fitting, fitting_valid, virtual_points, kl_threshold)
    return int((r != 0).sum())


def mem_reference_inputs(m, n_out, weight_threshold=1e-7):
    """What ModifiedEMReduction hands to em_step for ``m [G, N, K]``: scaled mixture, validity, initial mixture."""
    flat, _ = prescale(m)
    valid = gm.weights(flat).abs() >= weight_threshold
    magnitude = torch.where(valid, gm.weights(flat).abs(), torch.full_like(gm.weights(flat), -1.0))
    largest = torch.argsort(-magnitude, dim=-1, stable=True)[:, :n_out]
    return flat, valid, node_fit.take(flat, largest), valid.gather(1, largest)


@pytest.mark.parametrize("kind", ["em_step", "mem", "treehem"])
def test_saved_state_has_its_documented_size_and_only_when_a_gradient_is_needed(kind):
    dtype = torch.float32 if kind == "treehem" else torch.float64
    m = random_mixture(3, 40, 3, seed=3, dtype=dtype)
    valid = torch.ones(3, 40, dtype=torch.bool)
    if kind == "em_step":
        expected = node_fit_cpu.pair_state_bytes(reference_pair_count(m, valid, m[:, :6], valid[:, :6], 4.0, 1.0), 3, dtype)

        def run(x, **options):
            return node_fit_cpu.em_step(x, valid, x[:, :6].detach(), valid[:, :6], 4.0, 1.0, **options)
    elif kind == "mem":
        expected = node_fit_cpu.pair_state_bytes(reference_pair_count(*mem_reference_inputs(m, 6), 4.0, 1.0), 3, dtype)

        def run(x, **options):
            return node_fit_cpu.mem(x, 6, 4.0, 1.0, 1e-7, True, **options)
    else:
        valid, order, n_leaves = treehem_inputs(m, 2)
        assert n_leaves == 32
        expected = 3 * node_fit_cpu.treehem_state_size(n_leaves, 2) * 4

        def run(x, **options):
            return node_fit_cpu.treehem(x, valid, order, n_leaves, 2, 7, 4.0, 0.5, **options)

    x = m.clone().requires_grad_(True)
    kept = saved_storage_bytes(lambda: run(x))
    recomputed = saved_storage_bytes(lambda: run(x, save_state=False))
    assert kept - recomputed == expected
    with torch.no_grad():  # nothing to keep: the state is not even filled
        torch.testing.assert_close(run(x)[0], run(x, save_state=False)[0], rtol=0, atol=0)
    assert node_fit_cpu._wants_state(True, x) and not node_fit_cpu._wants_state(True, m)
    with torch.no_grad():
        assert not node_fit_cpu._wants_state(True, x)


def test_auto_uses_the_kernel_on_cpu_and_torch_keeps_the_reference(monkeypatch):
    m = random_mixture(1, 20, 2)
    assert implementation.native_kernel("auto", m) is node_fit_cpu
    assert implementation.native_kernel("torch", m) is None
    monkeypatch.setattr(node_fit_cpu, "supports", lambda m: False)
    assert implementation.native_kernel("auto", m) is None
    with pytest.raises(GmbenchError, match="implementation 'native' cannot run"):
        implementation.native_kernel("native", m)


def test_unknown_implementation_is_a_plugin_error():
    with pytest.raises(PluginError, match="implementation"):
        plugins.create("reduction", "treehem", implementation="cuda")


@pytest.mark.parametrize("dims,bits", [(2, 1), (2, 10), (2, 13), (2, 31), (3, 10), (3, 20)])
def test_morton_codes_match_the_bit_by_bit_definition(dims, bits):
    positions = torch.randn(2, 300, dims, generator=torch.Generator().manual_seed(bits))
    codes = morton_codes(positions, bits=bits)
    lower, upper = positions.amin(-2, keepdim=True), positions.amax(-2, keepdim=True)
    levels = (1 << bits) - 1
    q = ((positions - lower) / (upper - lower) * levels).round().clamp(0, levels).to(torch.int64)
    expected = torch.zeros(2, 300, dtype=torch.int64)
    for bit in range(bits):
        for axis in range(dims):
            expected |= ((q[..., axis] >> bit) & 1) << (bit * dims + dims - 1 - axis)
    assert torch.equal(codes, expected)


def test_disabled_kernel_falls_back_to_torch_and_native_says_why():
    # A fresh process with the kernel disabled: auto reduces through PyTorch, native refuses.
    code = (
        "import torch; from gmbench import plugins, mixture as gm\n"
        "from gmbench.errors import GmbenchError\n"
        "from gmbench.reduction import implementation\n"
        "m = gm.pack(torch.rand(1, 1, 12) + 0.1, torch.randn(1, 1, 12, 2), torch.eye(2).expand(1, 1, 12, 2, 2))\n"
        "print(implementation.native_kernel('auto', m) is None)\n"
        "print(float(gm.integrate(plugins.create('reduction', 'treehem').reduce(m, 3)).sum() / gm.integrate(m).sum()))\n"
        "try:\n"
        "    plugins.create('reduction', 'mem', implementation='native').reduce(m, 3)\n"
        "except GmbenchError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, GMBENCH_DISABLE_NODE_FIT_KERNEL="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    auto_is_torch, mass_ratio, refusal = result.stdout.splitlines()
    assert auto_is_torch == "True"
    assert abs(float(mass_ratio) - 1.0) < 1e-6
    assert "disabled by GMBENCH_DISABLE_NODE_FIT_KERNEL" in refusal and "implementation: auto or torch" in refusal


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_threshold, bits", [(0.0, 10), (0.3, 3), (0.0, 16)])
def test_native_morton_order_is_the_pytorch_order(dims, dtype, weight_threshold, bits):
    from gmbench.reduction.treehem import TreeHEMReduction

    m = random_mixture(12, 97, dims, seed=21, dtype=dtype, signed=True)
    m[1] = m[1, :1]  # every centroid the same: the codes tie, the stable sort keeps the input order
    m[2, :, 0] = 0.0  # no Gaussian valid at a positive threshold: the box falls back to [0, 1]
    m[3, 5:9, 1:] = m[3, :4, 1:]  # duplicated centroids among distinct ones
    reduction = TreeHEMReduction(T=2, weight_threshold=weight_threshold, morton_bits=bits)
    order, valid, n_leaves = reduction._morton_order(m)
    native_order, native_valid, native_leaves = reduction._morton_order(m, node_fit_cpu)
    assert torch.equal(native_order, order) and torch.equal(native_valid, valid) and native_leaves == n_leaves
    assert not torch.equal(order, torch.arange(97).expand(12, -1))  # the sort moved something


def test_native_morton_order_defers_to_the_pytorch_form_on_non_finite_centroids():
    m = random_mixture(3, 20, 3, seed=22)
    m[1, 4, 2] = float("nan")
    assert node_fit_cpu.morton_order(m, 0.0, 10) is None
    m[1, 4, 0] = 0.0  # the NaN Gaussian dropped by the threshold: its centroid no longer counts
    order, valid = node_fit_cpu.morton_order(m, 0.5, 10)
    assert not valid[1, 4] and (order[1] == 4).nonzero().item() >= int(valid[1].sum())  # sorted among the dropped
    # At threshold 0 the NaN Gaussian is valid: the native TreeHEM takes the PyTorch sort and agrees with it.
    native = plugins.create("reduction", "treehem", T=2, implementation="native").reduce(m.unsqueeze(0), 8)
    reference = plugins.create("reduction", "treehem", T=2, implementation="torch").reduce(m.unsqueeze(0), 8)
    torch.testing.assert_close(native, reference, **TOL[torch.float64], equal_nan=True)
