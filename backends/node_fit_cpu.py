r"""The reduction methods' node fits (E and M steps) as one native CPU kernel call.

:func:`em_step` computes :func:`gmbench.reduction.em.em_step`; :func:`mem`
the whole MEM reduction after its input checks (pre-scaling, initial
Gaussians, E and M step, masks, scaling back: one autograd node);
:func:`fit_nodes` computes :func:`gmbench.reduction.node_fit.fit_nodes`
(single-linkage initial Gaussians, then one E and one M step; optionally with
TreeHEM's pass-through of nodes that hold at most ``n_out`` Gaussians);
:func:`treehem` computes TreeHEM after the Morton sort (every tree level, the
top-down cut and the partial node fit) in one call, and :func:`morton_order`
that sort (``morton_kernel.h``: the same order as the PyTorch form).  All give the values and
gradients of the PyTorch functions up to float rounding; those stay the
reference, and ``tests/test_node_fit_cpu.py`` compares the two.

Why it is faster: the problems are tiny (a TreeHEM node fits at most ``2T``
Gaussians to ``T``), so the PyTorch form is about a hundred tensor operations
per tree level, each costing more in dispatch than in arithmetic.  The kernel
(``node_fit_kernel.cpp`` and ``mem_kernel.h``, package data, built by
:mod:`gmbench.backends.native`) runs one problem per loop iteration on
``torch.get_num_threads()`` threads.  When a gradient is needed, forward
keeps each problem's E step: MEM and :func:`em_step` as the list of pairs
with ``r != 0`` (the KL gate leaves about one per valid row;
:func:`pair_state_bytes`, 1.2 MiB for 8 x 8 mixtures 2560 -> 32 in
float32), TreeHEM its node fits' responsibilities and log-likelihoods
(``2 S Q + S`` values per node: 100 bytes per internal tree node, 12.5 MiB
for 8 x 8 mixtures of 2560 at T = 2, beside its 26 MiB of node caches) and
initial-Gaussian choices.  Backward then redoes only the cheap rest of each
forward (features and M-step sums) before the chain rule written out in C++;
``save_state=False`` recomputes the whole forward in backward instead (the
same gradients, bit for bit: ``tests/test_node_fit_cpu.py``).  :func:`treehem`
keeps the node caches, the inputs of its node fits.

Available on CPU for float32 and float64, 2D and 3D; not twice
differentiable.  ``GMBENCH_DISABLE_NODE_FIT_KERNEL=1`` disables it (the
reductions then take their PyTorch path).

Shapes: targets ``[M, S, K]`` with mask ``[M, S]``; fitting ``[M, Q, K]``
with mask ``[M, Q]``; results ``([M, Q, K], valid [M, Q])``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gmbench import mixture as gm
from gmbench.backends.native import NativeLibrary

SOURCE = Path(__file__).with_name("node_fit_kernel.cpp")
# No -ffast-math: the E step's gates compare values (KL threshold, argmin,
# sign) and must decide as the PyTorch reference does, NaN included;
# -fopenmp-simd lets the marked loops over fitting Gaussians reassociate their
# sums into vector lanes without linking an OpenMP runtime.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-std=c++17", "-pthread", "-shared", "-fPIC"]
SUFFIXES = ("f32_2", "f32_3", "f64_2", "f64_3")

_i64, _ptr, _int, _double = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
_SETTINGS = [_double, _int, _double]
_SYMBOLS = {}
for _suffix in SUFFIXES:
    _SYMBOLS[f"em_step_forward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, *_SETTINGS, _ptr, _ptr, _int, _ptr, _ptr, _int], None)
    _SYMBOLS[f"em_step_backward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, *_SETTINGS, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int], None)
    _SYMBOLS[f"pairs_take_{_suffix}"] = ([_ptr, _ptr, _ptr, _ptr], None)
    _SYMBOLS[f"pairs_free_{_suffix}"] = ([_ptr], None)
    _SYMBOLS[f"mem_forward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, *_SETTINGS, _double, _int, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _ptr, _int], None)
    _SYMBOLS[f"mem_backward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, *_SETTINGS, _double, _int, *[_ptr] * 8, _int], None)
    _SYMBOLS[f"fit_nodes_forward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, _ptr, _ptr, *_SETTINGS, _int, _ptr, _ptr, _int], None)
    _SYMBOLS[f"fit_nodes_backward_{_suffix}"] = (
        [_i64, _i64, _i64, _ptr, _ptr, _ptr, *_SETTINGS, _int, _ptr, _ptr, _int], None)
    _SYMBOLS[f"morton_order_{_suffix}"] = ([_i64, _i64, _ptr, _double, _int, _ptr, _ptr, _int], _int)
    _SYMBOLS[f"treehem_forward_{_suffix}"] = (
        [_i64, _i64, _i64, _i64, _i64, _i64, *_SETTINGS, *[_ptr] * 10, _int], None)
    _SYMBOLS[f"treehem_backward_{_suffix}"] = (
        [_i64, _i64, _i64, _i64, _i64, _i64, *_SETTINGS, *[_ptr] * 9, _int], None)

LIBRARY = NativeLibrary(
    SOURCE, _SYMBOLS, FLAGS, description="C++ node-fit kernel", fallback="the PyTorch node fits",
    disable_env="GMBENCH_DISABLE_NODE_FIT_KERNEL",
)


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (``None`` if it can)."""
    return LIBRARY.unavailable_reason()


def supports(m: Tensor) -> bool:
    """Whether the kernel handles this mixture tensor (CPU, float32/float64, 2D/3D) and is built."""
    return (
        m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and m.shape[-1] in (7, 13)
        and LIBRARY.load() is not None
    )


def _suffix(m: Tensor) -> str:
    return f"{'f32' if m.dtype == torch.float32 else 'f64'}_{gm.n_dims(m)}"


def _settings(virtual_points: float, kl_threshold: float | None) -> tuple[float, int, float]:
    return float(virtual_points), int(kl_threshold is not None), float(kl_threshold or 0.0)


def _mask(valid: Tensor) -> Tensor:
    return valid.to(torch.uint8).contiguous()


def em_state_size(s: int, q: int) -> int:
    """Values of one TreeHEM node fit's saved E step (``EMStep::state_size``): r, ll ``[S, Q]``, has_any ``[S]``."""
    return 2 * s * q + s


def pair_state_bytes(pairs: int, problems: int, dtype: torch.dtype) -> int:
    """Bytes of an E step kept as pairs (MEM, :func:`em_step`): (row, s) int32 and (r, ll) per pair, offsets per problem."""
    return pairs * (8 + 2 * torch.finfo(dtype).bits // 8) + 8 * (problems + 1)


def _take_pairs(library, suffix: str, handle: ctypes.c_void_p, count: int, like: Tensor, problems: int):
    """The pairs a forward kept (``PairLists`` in mem_kernel.h) as tensors ``(idx [P, 2], val [P, 2], offsets)``.

    The kernel owns them between its forward and this copy, which frees them.
    """
    if not handle.value:
        return None, None, None
    try:
        idx = torch.empty(count, 2, dtype=torch.int32)
        val = like.new_empty(count, 2)
        offsets = torch.empty(problems + 1, dtype=torch.int64)
    except BaseException:
        getattr(library, f"pairs_free_{suffix}")(handle)
        raise
    getattr(library, f"pairs_take_{suffix}")(handle, idx.data_ptr(), val.data_ptr(), offsets.data_ptr())
    return idx, val, offsets


def treehem_state_size(n_leaves: int, t: int) -> int:
    """Values of one mixture's saved TreeHEM state (``TreeHEMWork::state_size``): ``L - 1`` node fits, the partial fit.

    A node fit keeps its pass-through flag, initial-Gaussian order and mask
    (``1 + 2Q``) and its E step.
    """
    return (n_leaves - 1) * (1 + 2 * t + em_state_size(2 * t, t)) + 1 + 4 * t + em_state_size(2 * t, 2 * t)


def _wants_state(save_state: bool, *inputs: Tensor) -> bool:
    """Whether a forward keeps its state: asked for, and a backward can follow (grad mode, an input needing one)."""
    return save_state and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _state(save_state: bool, like: Tensor, *shape: int) -> Tensor | None:
    """An uninitialised state buffer for forward to fill (``None``: nothing is kept)."""
    return like.new_empty(*shape) if save_state else None


def _ptr_or_null(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _EMStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, target_valid, fitting, fitting_valid, settings, save_state):
        library = LIBRARY.load()
        target, fitting = target.contiguous(), fitting.contiguous()
        tv, fv = _mask(target_valid), _mask(fitting_valid)
        m, s, k = target.shape
        q = fitting.shape[1]
        out = target.new_empty(m, q, k)
        out_valid = torch.empty(m, q, dtype=torch.uint8)
        handle, count = ctypes.c_void_p(), ctypes.c_int64()
        suffix = _suffix(target)
        getattr(library, f"em_step_forward_{suffix}")(
            m, s, q, target.data_ptr(), tv.data_ptr(), fitting.data_ptr(), fv.data_ptr(), *settings,
            out.data_ptr(), out_valid.data_ptr(), int(save_state), ctypes.addressof(handle), ctypes.addressof(count),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(target, tv, fitting, fv, *_take_pairs(library, suffix, handle, count.value, target, m))
        ctx.settings = settings
        ctx.mark_non_differentiable(out_valid)
        return out, out_valid.bool()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        target, tv, fitting, fv, idx, val, offsets = ctx.saved_tensors
        m, s, _ = target.shape
        q = fitting.shape[1]
        grad_out = grad_out.to(target.dtype).contiguous()
        grad_target, grad_fitting = torch.empty_like(target), torch.empty_like(fitting)
        getattr(LIBRARY.load(), f"em_step_backward_{_suffix(target)}")(
            m, s, q, target.data_ptr(), tv.data_ptr(), fitting.data_ptr(), fv.data_ptr(), *ctx.settings,
            grad_out.data_ptr(), grad_target.data_ptr(), grad_fitting.data_ptr(), _ptr_or_null(idx),
            _ptr_or_null(val), _ptr_or_null(offsets), torch.get_num_threads(),
        )
        return grad_target, None, grad_fitting, None, None, None


class _MEM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, n_out, settings, weight_threshold, normalize_scale, save_state):
        library = LIBRARY.load()
        m = m.contiguous()
        g, n, k = m.shape
        out = m.new_empty(g, n_out, k)
        out_valid = torch.empty(g, n_out, dtype=torch.uint8)
        factor = m.new_empty(g)
        chosen = torch.empty(g, n_out, dtype=torch.int32)
        handle, count = ctypes.c_void_p(), ctypes.c_int64()
        suffix = _suffix(m)
        options = (float(weight_threshold), int(normalize_scale))
        getattr(library, f"mem_forward_{suffix}")(
            g, n, n_out, m.data_ptr(), *settings, *options, out.data_ptr(), out_valid.data_ptr(), factor.data_ptr(),
            chosen.data_ptr(), int(save_state), ctypes.addressof(handle), ctypes.addressof(count),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(m, out_valid, factor, chosen, *_take_pairs(library, suffix, handle, count.value, m, g))
        ctx.args = (n_out, settings, options)
        ctx.mark_non_differentiable(out_valid)
        return out, out_valid.bool()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        m, out_valid, factor, chosen, idx, val, offsets = ctx.saved_tensors
        n_out, settings, options = ctx.args
        g, n, _ = m.shape
        grad_out = grad_out.to(m.dtype).contiguous()
        grad_m = torch.empty_like(m)
        getattr(LIBRARY.load(), f"mem_backward_{_suffix(m)}")(
            g, n, n_out, m.data_ptr(), *settings, *options, out_valid.data_ptr(), factor.data_ptr(),
            chosen.data_ptr(), grad_out.data_ptr(), grad_m.data_ptr(), _ptr_or_null(idx), _ptr_or_null(val),
            _ptr_or_null(offsets), torch.get_num_threads(),
        )
        return grad_m, None, None, None, None, None


class _FitNodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, valid, n_out, max_out, settings, pass_through):
        library = LIBRARY.load()
        target = target.contiguous()
        tv = _mask(valid)
        n_out = n_out.to(torch.int64).contiguous()
        m, s, k = target.shape
        out = target.new_empty(m, max_out, k)
        out_valid = torch.empty(m, max_out, dtype=torch.uint8)
        getattr(library, f"fit_nodes_forward_{_suffix(target)}")(
            m, s, max_out, target.data_ptr(), tv.data_ptr(), n_out.data_ptr(), *settings, int(pass_through),
            out.data_ptr(), out_valid.data_ptr(), torch.get_num_threads(),
        )
        ctx.save_for_backward(target, tv, n_out)
        ctx.args = (max_out, settings, int(pass_through))
        ctx.mark_non_differentiable(out_valid)
        return out, out_valid.bool()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        target, tv, n_out = ctx.saved_tensors
        max_out, settings, pass_through = ctx.args
        m, s, _ = target.shape
        grad_out = grad_out.to(target.dtype).contiguous()
        grad_target = torch.empty_like(target)
        getattr(LIBRARY.load(), f"fit_nodes_backward_{_suffix(target)}")(
            m, s, max_out, target.data_ptr(), tv.data_ptr(), n_out.data_ptr(), *settings, pass_through,
            grad_out.data_ptr(), grad_target.data_ptr(), torch.get_num_threads(),
        )
        return grad_target, None, None, None, None, None


class _TreeHEM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, valid, order, n_leaves, t, n_valid, n_out, settings, save_state):
        library = LIBRARY.load()
        g, n, k = m.shape
        m = m.contiguous()
        m_valid = _mask(valid)
        order = order.to(torch.int64).contiguous()
        nodes = m.new_empty(g, 2 * n_leaves - 1, t, k)
        nodes_valid = torch.empty(g, 2 * n_leaves - 1, t, dtype=torch.uint8)
        chosen = torch.empty(g, n_out, dtype=torch.int32)
        partial = torch.empty(g, 2, dtype=torch.int64)
        out = m.new_empty(g, n_out, k)
        out_valid = torch.empty(g, n_out, dtype=torch.uint8)
        state = _state(save_state, m, g, treehem_state_size(n_leaves, t))
        getattr(library, f"treehem_forward_{_suffix(m)}")(
            g, n, n_leaves, t, n_valid, n_out, *settings, m.data_ptr(), m_valid.data_ptr(), order.data_ptr(),
            nodes.data_ptr(), nodes_valid.data_ptr(), chosen.data_ptr(), partial.data_ptr(), out.data_ptr(),
            out_valid.data_ptr(), _ptr_or_null(state), torch.get_num_threads(),
        )
        ctx.save_for_backward(order, nodes, nodes_valid, chosen, partial, out_valid, state)
        ctx.args = (n, n_valid, n_out, settings)
        ctx.mark_non_differentiable(out_valid)
        return out, out_valid.bool()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        order, nodes, nodes_valid, chosen, partial, out_valid, state = ctx.saved_tensors
        n, n_valid, n_out, settings = ctx.args
        g, n_nodes, t, k = nodes.shape
        grad_out = grad_out.to(nodes.dtype).contiguous()
        grad_m = nodes.new_empty(g, n, k)
        getattr(LIBRARY.load(), f"treehem_backward_{_suffix(nodes)}")(
            g, n, (n_nodes + 1) // 2, t, n_valid, n_out, *settings, order.data_ptr(), nodes.data_ptr(),
            nodes_valid.data_ptr(), chosen.data_ptr(), partial.data_ptr(), out_valid.data_ptr(), grad_out.data_ptr(),
            grad_m.data_ptr(), _ptr_or_null(state), torch.get_num_threads(),
        )
        return grad_m, None, None, None, None, None, None, None, None


def morton_order(m: Tensor, weight_threshold: float, bits: int) -> tuple[Tensor, Tensor] | None:
    """TreeHEM's sort of ``m [G, N, K]``: ``(order [G, N] int64, valid [G, N] bool)``, or ``None``
    where a valid centroid is not finite (the PyTorch form then decides).

    The same as ``TreeHEMReduction._morton_order`` (:func:`gmbench.reduction.morton.morton_codes`
    in each mixture's box of valid centroids, dropped Gaussians last, a stable argsort), with the
    same float operations, so the same order; no gradient (the order is discrete).
    """
    library = LIBRARY.load()
    g, n, _ = m.shape
    m = m.detach().contiguous()
    order = torch.empty(g, n, dtype=torch.int64)
    valid = torch.empty(g, n, dtype=torch.uint8)
    finite = getattr(library, f"morton_order_{_suffix(m)}")(
        g, n, m.data_ptr(), float(weight_threshold), int(bits), order.data_ptr(), valid.data_ptr(),
        torch.get_num_threads(),
    )
    return (order, valid.bool()) if finite else None


def treehem(
    m: Tensor, valid: Tensor, order: Tensor, n_leaves: int, T: int, n_out: int, virtual_points: float,
    kl_threshold: float | None, *, save_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """TreeHEM after the Morton argsort (``TreeHEMReduction._sorted_leaves``, ``_build_tree`` and the cut) in one call.

    ``m [G, N, K]`` with mask ``valid [G, N]`` and ``order [G, N]`` (the
    Morton order, valid Gaussians first); ``n_leaves`` (a power of two >= 2)
    leaves of ``T`` Gaussians hold them, padded.  Returns
    ``([G, n_out, K], valid [G, n_out])``, invalid rows with weight 0; the
    node caches (about ``2 n_leaves T`` Gaussians per mixture) are kept for
    backward, and with ``save_state`` (when a gradient is needed) the node
    fits' E steps, ``treehem_state_size(n_leaves, T)`` values per mixture.
    """
    g, n, _ = m.shape
    if n_out > (2 * n_leaves - 1) * T or n > n_leaves * T:
        raise ValueError(f"a tree of {n_leaves} leaves of {T} cannot hold {n} Gaussians or return {n_out}")
    n_valid = int(valid.sum(-1).max()) if g else 0
    return _TreeHEM.apply(
        m, valid, order, n_leaves, T, n_valid, int(n_out), _settings(virtual_points, kl_threshold),
        _wants_state(save_state, m),
    )


def em_step(
    target: Tensor, target_valid: Tensor, fitting: Tensor, fitting_valid: Tensor,
    virtual_points: float, kl_threshold: float | None, *, save_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`gmbench.reduction.em.em_step` by the kernel: ``-> ([M, Q, K], valid [M, Q])``.

    With ``save_state`` (when a gradient is needed) the E step is kept for
    backward as its pairs with ``r != 0``: :func:`pair_state_bytes`.
    """
    if target.shape[0] == 0:
        return fitting.new_zeros(fitting.shape), fitting_valid.new_zeros(fitting_valid.shape)
    return _EMStep.apply(
        target, target_valid, fitting, fitting_valid, _settings(virtual_points, kl_threshold),
        _wants_state(save_state, target, fitting),
    )


def mem(
    m: Tensor, n_out: int, virtual_points: float, kl_threshold: float | None, weight_threshold: float,
    normalize_scale: bool, *, save_state: bool = True,
) -> tuple[Tensor, Tensor]:
    """The MEM reduction of ``m [G, N, K]`` (``N > n_out``) in one call: ``-> ([G, n_out, K], valid [G, n_out])``.

    What :class:`gmbench.reduction.mem.ModifiedEMReduction` computes after its
    input checks: Gaussians with ``|w| >= weight_threshold`` are valid, each
    mixture is pre-scaled (``normalize_scale``, :func:`gmbench.reduction.scaling.prescale`),
    the ``n_out`` valid ones with the largest ``|w|`` are the initial mixture,
    one E and one M step, weight 0 where the result is invalid, scaled back.
    One autograd node; with ``save_state`` (when a gradient is needed) the E
    step is kept as its pairs with ``r != 0`` (:func:`pair_state_bytes`),
    else backward recomputes it (the same gradients, bit for bit).
    """
    g, n, _ = m.shape
    if n <= n_out:
        raise ValueError(f"MEM reduces mixtures of more than {n_out} Gaussians, got {n}")
    return _MEM.apply(
        m, int(n_out), _settings(virtual_points, kl_threshold), weight_threshold, bool(normalize_scale),
        _wants_state(save_state, m),
    )


def fit_nodes(
    target: Tensor, valid: Tensor, n_out: Tensor, max_out: int, virtual_points: float,
    kl_threshold: float | None, pass_through: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`gmbench.reduction.node_fit.fit_nodes` by the kernel: ``[M, S, K] -> ([M, max_out, K], valid)``.

    With ``pass_through`` a problem with at most ``n_out`` valid Gaussians is
    returned as it is (valid ones first, in their order), as TreeHEM's tree
    levels do, instead of being fitted.
    """
    m, s, k = target.shape
    if max_out > s:
        raise ValueError(f"a node fit returns at most its {s} input Gaussians, asked for {max_out}")
    if m == 0:
        return target.new_zeros(0, max_out, k), valid.new_zeros(0, max_out)
    return _FitNodes.apply(target, valid, n_out, max_out, _settings(virtual_points, kl_threshold), pass_through)
