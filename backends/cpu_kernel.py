r"""A small C++ kernel (vectorised, multi-threaded) for the exponential-kernel mat-vec on CPU.

Computes the same function as :class:`gmbench.backends.torch.ExpKernelMatVec`,

.. math:: f_{g,i} = \sum_j c_{g,j} \exp(\min(X_{g,i} \cdot A_{g,j}, 0)),

(``X [G, M, F]`` quadratic point features, ``A [G, N, F]`` Gaussian
coefficients, ``c [G, N]`` peak values; ``F = 10`` in 3D, ``6`` in 2D) and its
gradients with respect to ``X``, ``A`` and ``c``, without ever forming an
``M x N`` tensor.  Why it is faster than the GEMM form: the exponent, the
exponential and the ``c``-weighted sum happen in registers (one pass over the
``M x N`` pairs instead of writing and re-reading a tile three times), the
Gaussians are packed into blocks of one SIMD vector (``ekmv_pack``; AVX-512,
AVX2 or SSE with ``-march=native``) so that each loaded coefficient vector
serves several broadcast points, the exponential is an inlined polynomial,
and the backward pass computes each exponential once for all three
gradients.  Threads: ``torch.get_num_threads()`` plain threads.

The source, ``cpu_kernel.cpp`` next to this module (package data), is compiled
with the machine's C++ compiler on first use (about 10 seconds; no PyTorch
headers, loaded with :mod:`ctypes`) by :mod:`gmbench.backends.native`: into a
private per-user folder (``~/.cache/gmbench-kernels-<uid>``, never the shared
``$GMBENCH_CACHE``), keyed by a hash of the source, the flags and the CPU's
instruction-set flags, and hash-checked before every load.  Without a compiler
(or with ``GMBENCH_DISABLE_CPU_KERNEL=1``) :func:`load` returns ``None`` and
callers fall back to the GEMM form; :func:`unavailable_reason` says why.

The same library computes the mat-vec's inputs for the dense fit's
evaluations at the centroids, ``X``, ``A`` and ``c`` from a mixture, and their
gradients back to it (:class:`CPUCentroidTerms`, source ``centroid_terms.h``):
one pass over the Gaussians each way instead of the PyTorch form's dozens of
elementwise operations (on the widest layer of the paper layout, 0.6 s of a
training step in PyTorch, 0.12 s here; docs/backends.md).

An optional tile mask (``uint8 [G, ceil(M/tile_m), ceil(N/tile_n)]``, from
:mod:`gmbench.backends.cutoff`) skips whole (point tile, Gaussian tile) pairs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gmbench.backends.native import VECTOR_KERNEL_FLAGS, NativeLibrary, mat_vec_variant_symbols

SOURCE_FILE = Path(__file__).with_name("cpu_kernel.cpp")

FLAGS = list(VECTOR_KERNEL_FLAGS)


def _symbols() -> dict:
    """ctypes signatures of the exported functions (one forward and one backward per variant)."""
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    symbols = mat_vec_variant_symbols({
        "ekmv_pack": [i64, i64, ptr, ptr, ptr, cint],
        "ekmv_forward": [i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, cint],
        "ekmv_backward": [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, cint],
    })
    symbols["ekmv_vector_bytes"] = ([], cint)
    for suffix in ("f32_2d", "f32_3d", "f64_2d", "f64_3d"):
        symbols[f"centroid_terms_{suffix}"] = ([i64, i64, ptr, ptr, ptr, cint, ptr, ptr, ptr, cint], None)
        symbols[f"centroid_terms_backward_{suffix}"] = (
            [i64, i64, ptr, ptr, ptr, cint, ptr, ptr, ptr, ptr, ptr, cint], None
        )
    return symbols


LIBRARY = NativeLibrary(
    SOURCE_FILE, _symbols(), FLAGS,
    description="C++ CPU kernel", fallback="the PyTorch GEMM path", disable_env="GMBENCH_DISABLE_CPU_KERNEL",
)


def load() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` (see :func:`unavailable_reason`).

    Loaded only through :mod:`gmbench.backends.native`: built in the private per-user
    folder and dlopen'ed from hash-verified bytes, never from the shared data cache.
    """
    return LIBRARY.load()


def unavailable_reason() -> str | None:
    return LIBRARY.unavailable_reason()


def supports(X: Tensor) -> bool:
    """Whether the kernel handles these features (CPU, float32/float64, F in {6, 10})."""
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and X.shape[-1] in (6, 10)


def _suffix(X: Tensor, sets: int) -> str:
    return f"{'f32' if X.dtype == torch.float32 else 'f64'}_{X.shape[-1]}_w{sets}"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def packed_elements(library: ctypes.CDLL, n: int, features: int, sets: int, element_size: int) -> int:
    """Elements of one mixture's packed Gaussians: ``ceil(n / L)`` blocks of ``(features + sets) x L`` (L lanes)."""
    lanes = library.ekmv_vector_bytes() // element_size
    return -(-n // lanes) * (features + sets) * lanes


class CPUExpKernelMatVec(torch.autograd.Function):
    """``f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0))`` by the C++ CPU kernel.

    Shapes: ``X [G, M, F]``, ``A [G, N, F]``, ``c [G, N]`` -> ``[G, M]`` or
    ``c [G, N, W]`` -> ``[G, M, W]`` with ``W <= 2`` weight sets sharing every
    exponential; optional ``mask uint8 [G, ceil(M / tile_m), ceil(N / tile_n)]``.
    Gradients as in :class:`gmbench.backends.torch.ExpKernelMatVec` (the clamp
    is treated as the identity), restricted to unmasked tiles.
    """

    @staticmethod
    def forward(ctx, X: Tensor, A: Tensor, c: Tensor, mask: Tensor | None, tile_m: int, tile_n: int) -> Tensor:
        library = load()
        G, M, F = X.shape
        N = A.shape[1]
        sets = 1 if c.dim() == 2 else c.shape[-1]
        if sets not in (1, 2):
            raise ValueError(f"the C++ kernel takes one or two weight sets, got {sets}")
        X = X.contiguous()
        suffix = _suffix(X, sets)
        packed = X.new_empty(G, packed_elements(library, N, F, sets, X.element_size()))
        A, c_sets = A.contiguous(), c.reshape(G, N, sets).contiguous()  # kept alive through the call
        getattr(library, f"ekmv_pack_{suffix}")(G, N, _ptr(A), _ptr(c_sets), _ptr(packed), torch.get_num_threads())
        mask = None if mask is None else mask.to(torch.uint8).contiguous()
        out = X.new_empty(G, M, sets)
        getattr(library, f"ekmv_forward_{suffix}")(
            G, M, N, _ptr(X), _ptr(packed), _ptr(out), tile_m, tile_n, _ptr(mask), torch.get_num_threads()
        )
        ctx.save_for_backward(X, packed, mask)
        ctx.sizes = (N, sets)
        ctx.tiles = (tile_m, tile_n)
        ctx.c_shape = c.shape
        return out.view(G, M, *c.shape[2:])

    @staticmethod
    @once_differentiable  # the C++ backward builds no graph: a second derivative must fail, not be zero
    def backward(ctx, grad_out: Tensor):
        library = load()
        X, packed, mask = ctx.saved_tensors
        G, M, F = X.shape
        N, sets = ctx.sizes
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(X.dtype).reshape(G, M, sets).contiguous()
        grad_x = X.new_empty(G, M, F) if need_x else None
        grad_a = X.new_empty(G, N, F) if need_a else None
        grad_c = X.new_empty(G, N, sets) if need_c else None
        if need_x or need_a or need_c:
            getattr(library, f"ekmv_backward_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(packed), _ptr(grad_out), _ptr(grad_x), _ptr(grad_a), _ptr(grad_c),
                *ctx.tiles, _ptr(mask), torch.get_num_threads(),
            )
        if grad_c is not None:
            grad_c = grad_c.view(ctx.c_shape)
        return grad_x, grad_a, grad_c, None, None, None


def supports_mixture(m: Tensor) -> bool:
    """Whether :class:`CPUCentroidTerms` handles ``m [G, N, K]`` (CPU, float32/float64, 2D or 3D)."""
    return m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64) and m.shape[-1] in (7, 13)


class CPUCentroidTerms(torch.autograd.Function):
    """``(X, A, c)`` of :func:`gmbench.backends.torch.centroid_terms` in one C++ pass per direction.

    ``m [G, N, K]``, ``centre [G, 1, D]`` (a constant: no gradient), optional
    ``weight_sets [G, N, W]`` -> ``X [G, N, F]``, ``A [G, N, F]``, ``c [G, N]``
    (``[G, N, W]`` with weight sets).  The same operations as the PyTorch form,
    so values agree to rounding; gradients go to the weights (or the weight
    sets), the positions and the upper triangle of each covariance, as there.
    """

    @staticmethod
    def forward(ctx, m: Tensor, centre: Tensor, weight_sets: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        library = load()
        G, N, K = m.shape
        d = 2 if K == 7 else 3
        features = d * (d + 1) // 2 + d + 1
        m, centre = m.contiguous(), centre.to(m.dtype).contiguous()
        sets = None if weight_sets is None else weight_sets.to(m.dtype).contiguous()
        W = 0 if sets is None else sets.shape[-1]
        X, A = m.new_empty(G, N, features), m.new_empty(G, N, features)
        c = m.new_empty(G, N) if sets is None else m.new_empty(G, N, W)
        getattr(library, f"centroid_terms_{_mixture_suffix(m)}")(
            G, N, _ptr(m), _ptr(centre), _ptr(sets), W, _ptr(X), _ptr(A), _ptr(c), torch.get_num_threads()
        )
        ctx.save_for_backward(m, centre, sets)
        return X, A, c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor | None, grad_a: Tensor | None, grad_c: Tensor | None):
        library = load()
        m, centre, sets = ctx.saved_tensors
        G, N, _ = m.shape
        W = 0 if sets is None else sets.shape[-1]
        grads = [None if g is None else g.to(m.dtype).contiguous() for g in (grad_x, grad_a, grad_c)]
        grad_m = torch.empty_like(m)
        grad_sets = None if sets is None else torch.empty_like(sets)
        getattr(library, f"centroid_terms_backward_{_mixture_suffix(m)}")(
            G, N, _ptr(m), _ptr(centre), _ptr(sets), W, *(_ptr(g) for g in grads), _ptr(grad_m), _ptr(grad_sets),
            torch.get_num_threads(),
        )
        return grad_m, None, grad_sets


def _mixture_suffix(m: Tensor) -> str:
    return f"{'f32' if m.dtype == torch.float32 else 'f64'}_{2 if m.shape[-1] == 7 else 3}d"
