r"""The spatial cut-off on CPU, pair lists instead of tile masks (C++, ``cutoff_kernel.cpp``).

Same truncation as :mod:`gmbench.backends.cutoff` (a pair is dropped when
:math:`|c_j| e^{-\frac12 d_M^2} < \tau = \mathrm{tol} \max_k |c_k|`), planned
more tightly, because on real GMCN activations only 3-20 % of the pairs are
above :math:`\tau` while Morton tiles of 16 x 16 kept 55-85 % of them:

* points are grouped in tiles of ``tile_m`` (16) by a kd split (median along
  the widest axis), so every tile's bounding box is small;
* a Gaussian is listed for every tile whose box may meet its cut-off
  ellipsoid: its axis-aligned box first, then a bound in the Gaussian's own
  whitened coordinates (exact for a box shrunk to a point; tested in float
  with outward rounding, see the C++ source); there are no Gaussian tiles, so
  a Gaussian is never evaluated because a neighbour in its tile was needed;
* the float32 forward is vectorised over a tile's 16 points and reads each
  listed Gaussian's coefficients as one row (no gathers); float64 and the
  backward gather a tile's listed Gaussians into contiguous scratch once and
  run the vectorised exponential loop over them for every point of the tile
  (backward with each exponential computed once; in float32 from the
  forward's coefficient rows, transposed 16 at a time, and its gradient rows
  added the same way).  Point rows are read and
  written through the plan's order, so callers pass ``X`` unpermuted.

The plan (one native pass: the kd split, then each group of 8 tiles and each
tile tested against the Gaussians in vectorised loops; measured in
``benchmarks/bench_cutoff.py``) is made once per
evaluation and shared by both weight sets of the dense fit and by backward.
Without a compiler (or with ``GMBENCH_DISABLE_CPU_KERNEL=1``) callers fall
back to the tile masks of :mod:`gmbench.backends.cutoff`.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from gmbench.backends.native import VECTOR_KERNEL_FLAGS, NativeLibrary, mat_vec_variant_symbols

SOURCE_FILE = Path(__file__).with_name("cutoff_kernel.cpp")
FLAGS = list(VECTOR_KERNEL_FLAGS)
# Points per tile.  Measured on digits / mnist5k / shapes3d GMCN activations
# (benchmarks/bench_cutoff.py): tiles of 8 evaluate 1.4-3.4x the pairs above tau,
# tiles of 16 1.6-4.7x, but gathering a tile's Gaussians and planning cost half as
# much per pair, and the dense fit at N = 2560 was faster with 16 (forward+backward
# 1.74x against 1.47x faster than exact in one run).
TILE_POINTS = 16


def _symbols() -> dict:
    i64, ptr, cint, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    symbols = {f"cutoff_plan_d{d}": ([i64, i64, i64, ptr, ptr, ptr, ptr, dbl, i64, ptr, ptr, cint], ptr)
               for d in (2, 3)}
    symbols["cutoff_plan_take"] = ([ptr, ptr], None)
    symbols["cutoff_tile_points"] = ([], cint)
    symbols.update({f"sparse_forward_rows_f32_{f}_w{w}": ([i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, cint], None)
                    for f in (6, 10) for w in (1, 2)})
    symbols.update({f"sparse_backward_rows_f32_{f}_w{w}": ([i64, i64, i64] + [ptr] * 9 + [cint], None)
                    for f in (6, 10) for w in (1, 2)})
    symbols.update(mat_vec_variant_symbols({
        "sparse_forward": [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, cint],
        "sparse_backward": [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, cint],
    }))
    return symbols


LIBRARY = NativeLibrary(
    SOURCE_FILE, _symbols(), FLAGS,
    description="C++ cut-off kernel", fallback="the cut-off tile masks", disable_env="GMBENCH_DISABLE_CPU_KERNEL",
)


def load() -> ctypes.CDLL | None:
    """The pair-list library, or ``None``; loaded only through native's private-folder,
    hash-verified loader (never from the shared data cache)."""
    return LIBRARY.load()


@dataclasses.dataclass
class PairListPlan:
    """kd order of the points and, per point tile, the Gaussians to evaluate.

    Shapes: ``point_order [G, M]`` (permutation), ``offsets [G * T + 1]`` int64
    (CSR over the ``T = ceil(M / tile_m)`` tiles of every mixture),
    ``index [nnz]`` int32 (Gaussian numbers within their mixture, ascending).
    """

    point_order: Tensor
    offsets: Tensor
    index: Tensor
    tile_m: int
    n_gaussians: int

    @property
    def pairs_evaluated(self) -> int:
        """Point-Gaussian pairs the kernel evaluates (a full last tile counts its real points only)."""
        G, M = self.point_order.shape
        tiles = -(-M // self.tile_m)
        counts = (self.offsets[1:] - self.offsets[:-1]).reshape(G, tiles)
        rows = torch.full((tiles,), self.tile_m, dtype=torch.int64)
        if tiles:
            rows[-1] = M - (tiles - 1) * self.tile_m
        return int((counts * rows).sum())

    @property
    def active_fraction(self) -> float:
        """Fraction of all ``G M N`` pairs that are evaluated."""
        total = self.point_order.numel() * self.n_gaussians
        return self.pairs_evaluated / total if total else 0.0


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def make_plan(points: Tensor, centres: Tensor, covariances: Tensor, peaks: Tensor, tolerance: float,
              tile_m: int = TILE_POINTS) -> PairListPlan:
    """Plan the cut-off for ``points [G, M, D]`` against Gaussians ``centres [G, N, D]``.

    ``covariances [G, N, D, D]``, ``peaks [G, N]`` (``c_j``; sign ignored).
    Conservative: every pair with ``|c_j| g_j(x_i) >= tol * max|c|`` is listed.
    Needs the compiled library (:func:`load`).
    """
    if not tolerance > 0:
        raise ValueError(f"cut-off tolerance must be positive, got {tolerance}")
    library = load()
    if library is None:
        raise RuntimeError(f"the cut-off kernel is unavailable: {LIBRARY.unavailable_reason()}")
    G, M, D = points.shape
    N = centres.shape[1]
    tiles = -(-M // tile_m)
    with torch.no_grad():
        p = points.detach().to(torch.float64).contiguous()
        b = centres.detach().to(torch.float64).contiguous()
        C = covariances.detach().to(torch.float64).contiguous()
        pk = peaks.detach().to(torch.float64).contiguous()
    order = torch.empty(G, M, dtype=torch.int64)
    counts = torch.empty(G * tiles, dtype=torch.int64)
    handle = getattr(library, f"cutoff_plan_d{D}")(
        G, M, N, _ptr(p), _ptr(b), _ptr(C), _ptr(pk), float(tolerance), tile_m, _ptr(order), _ptr(counts),
        torch.get_num_threads(),
    )
    offsets = torch.zeros(G * tiles + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    index = torch.empty(int(offsets[-1]), dtype=torch.int32)
    library.cutoff_plan_take(handle, _ptr(index))  # copies the lists and frees the native plan
    return PairListPlan(order, offsets, index, tile_m, N)


def supports(X: Tensor) -> bool:
    """Whether the kernel handles these features (CPU, float32/float64, 2D or 3D)."""
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and X.shape[-1] in (6, 10)


def _suffix(X: Tensor, sets: int) -> str:
    return f"{'f32' if X.dtype == torch.float32 else 'f64'}_{X.shape[-1]}_w{sets}"


ROW_VALUES = 16  # values per coefficient row of the float forward (F exponent coefficients, W peaks, zeros)


def _coefficient_rows(A: Tensor, c: Tensor) -> Tensor:
    """``[G, N, 16]``: each Gaussian's ``A`` and weight sets in one row, read by address (not gathered)."""
    G, N, F = A.shape
    sets = c.reshape(G, N, -1)
    return torch.cat([A, sets, A.new_zeros(G, N, ROW_VALUES - F - sets.shape[-1])], -1).contiguous()


class PairListExpKernelMatVec(torch.autograd.Function):
    """``f[g, i] = sum_{j listed for i's tile} c[g, j] exp(min(X[g, i] . A[g, j], 0))``.

    Shapes: ``X [G, M, F]`` (the points in their own order: the kernel reads
    and writes rows through ``plan.point_order``, no permuted copies), ``A [G, N, F]``,
    ``c [G, N]`` -> ``[G, M]`` or ``c [G, N, W]`` -> ``[G, M, W]`` (``W <= 2``
    weight sets sharing every exponential).  Gradients are those of the
    truncated sum (the clamp treated as the identity, as in the other kernels).
    """

    @staticmethod
    def forward(ctx, X: Tensor, A: Tensor, c: Tensor, plan: PairListPlan) -> Tensor:
        library = load()
        G, M, _ = X.shape
        N = A.shape[1]
        sets = 1 if c.dim() == 2 else c.shape[-1]
        if sets not in (1, 2):
            raise ValueError(f"the cut-off kernel takes one or two weight sets, got {sets}")
        X = X.contiguous()
        out = X.new_empty(G, M, sets)
        ctx.rows = X.dtype == torch.float32 and plan.tile_m == library.cutoff_tile_points()
        if ctx.rows:
            # Vectorised over each tile's points, coefficients read as rows (no gathers); the
            # backward reads the same rows.
            rows = _coefficient_rows(A, c)  # named: a temporary would be freed before the call
            getattr(library, f"sparse_forward_rows_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(rows), _ptr(out), _ptr(plan.offsets), _ptr(plan.index),
                _ptr(plan.point_order), torch.get_num_threads(),
            )
            ctx.save_for_backward(X, rows)
        else:
            At = A.transpose(1, 2).contiguous()  # [G, F, N]: the gathering kernels take each feature's row
            cs = c.reshape(G, N, sets).transpose(1, 2).contiguous()  # [G, W, N]
            getattr(library, f"sparse_forward_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(At), _ptr(cs), _ptr(out), plan.tile_m, _ptr(plan.offsets), _ptr(plan.index),
                _ptr(plan.point_order), torch.get_num_threads(),
            )
            ctx.save_for_backward(X, At, cs)
        ctx.sets = sets
        ctx.plan = plan
        ctx.c_shape = c.shape
        return out.view(G, M, *c.shape[2:])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        library = load()
        X, *coefficients = ctx.saved_tensors
        plan, sets = ctx.plan, ctx.sets
        G, M, F = X.shape
        N = coefficients[0].shape[1 if ctx.rows else 2]
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        go = grad_out.to(X.dtype).reshape(G, M, sets).contiguous()
        grad_x = X.new_empty(G, M, F) if need_x else None
        grad_a = X.new_empty(G, N, F) if need_a else None
        grad_c = X.new_empty(G, N, sets) if need_c else None
        if (need_x or need_a or need_c) and ctx.rows:
            # The coefficient rows of forward, transposed 16 Gaussians at a time (no gathers).
            getattr(library, f"sparse_backward_rows_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(coefficients[0]), _ptr(go), _ptr(grad_x), _ptr(grad_a), _ptr(grad_c),
                _ptr(plan.offsets), _ptr(plan.index), _ptr(plan.point_order), torch.get_num_threads(),
            )
        elif need_x or need_a or need_c:
            At, cs = coefficients
            getattr(library, f"sparse_backward_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(At), _ptr(cs), _ptr(go), _ptr(grad_x), _ptr(grad_a), _ptr(grad_c),
                plan.tile_m, _ptr(plan.offsets), _ptr(plan.index), _ptr(plan.point_order), torch.get_num_threads(),
            )
        if grad_c is not None:
            grad_c = grad_c.view(ctx.c_shape)
        return grad_x, grad_a, grad_c, None


def matvec_sets(X: Tensor, A: Tensor, c: Tensor, plan: PairListPlan) -> Tensor:
    """:class:`PairListExpKernelMatVec` for any number of weight sets (two at a time share each exponential)."""
    if c.dim() == 3 and c.shape[-1] > 2:
        return torch.cat([PairListExpKernelMatVec.apply(X, A, c[..., k : k + 2], plan)
                          for k in range(0, c.shape[-1], 2)], -1)
    return PairListExpKernelMatVec.apply(X, A, c, plan)
