r"""The ``fused`` backend: Triton kernels for CUDA GPUs (paper Appendix C hot spots).

``evaluate`` / ``evaluate_at_centroids`` run the exponential-kernel mat-vec of
:mod:`gmbench.backends.torch` (same features, same mixture-centred numerics)
in fused Triton kernels (:mod:`gmbench.backends.triton_kernels`): forward and
the two backward kernels recompute the exponentials tile by tile
(FlashAttention-style), so no ``M x N`` tensor is ever stored and the
exponent, exponential and weighted sum never leave registers.
``evaluate_weight_sets_at_centroids`` (the dense ReLU fit's input and coarse
mixture) shares every exponential between two weight vectors.  ``convolve``
writes the outer product of Eq. 3 in one kernel.  The spatial cut-off
(``cutoff=``) passes its tile mask to the same kernels.

Availability: needs ``triton`` (``pip install gmbench[fused]``) and a CUDA
GPU.  Without CUDA, ``TRITON_INTERPRET=1`` (set before gmbench imports the
kernels) runs the very same kernels in Triton's CPU interpreter: slow, meant
for tests.  Otherwise selecting the backend fails with a one-line message (see
:meth:`FusedBackend.unavailable_reason`); it never falls back silently.

Triton's cache of compiled kernels and launcher libraries is moved to (or
checked to be) a folder only the user can write before the first kernel is
compiled: :mod:`gmbench.backends.triton_cache`.
"""

from __future__ import annotations

import os
from typing import Annotated

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.backends import cutoff, triton_cache
from gmbench.backends.torch import TorchBackend
from gmbench.errors import GmbenchError
from gmbench.plugins import hookimpl

BLOCK = cutoff.DEFAULT_TILE  # points and Gaussians per tile (the cut-off mask uses the same tiles)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _kernels():
    if not interpreting():
        reason = triton_cache.prepare_cache()  # before Triton compiles or loads anything
        if reason:
            raise GmbenchError(f"backend 'fused' cannot run here: {reason}")
    from gmbench.backends import triton_kernels

    return triton_kernels


def _pad_features(x: Tensor) -> Tensor:
    """``[G, P, F] -> [G, P, 16]`` contiguous float32, zero columns appended (for ``tl.dot``)."""
    fp = 16
    out = x.new_zeros(*x.shape[:-1], fp, dtype=torch.float32)
    out[..., : x.shape[-1]] = x
    return out


def _grid_sizes(M: int, N: int) -> tuple[int, int]:
    return -(-M // BLOCK), -(-N // BLOCK)


class FusedExpKernelMatVec(torch.autograd.Function):
    """``f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0))`` by Triton kernels.

    Shapes: ``X [G, M, F]``, ``A [G, N, F]``, ``c [G, N]`` -> ``[G, M]`` or
    ``c [G, N, W]`` -> ``[G, M, W]`` (``W <= 2`` weight sets sharing every
    exponential), optional ``mask uint8 [G, ceil(M / 64), ceil(N / 64)]``
    (float32 compute); ``num_warps`` per program.
    """

    @staticmethod
    def forward(ctx, X: Tensor, A: Tensor, c: Tensor, mask: Tensor | None, num_warps: int) -> Tensor:
        k = _kernels()
        G, M, F = X.shape
        N = A.shape[1]
        sets = 1 if c.dim() == 2 else c.shape[-1]
        if sets not in (1, 2):
            raise ValueError(f"the fused kernels take one or two weight sets, got {sets}")
        n_mt, n_nt = _grid_sizes(M, N)
        Xp, Ap = _pad_features(X), _pad_features(A)
        cf = c.float().contiguous()
        mask_arg = mask.to(torch.uint8).contiguous() if mask is not None else Xp  # dummy pointer
        out = Xp.new_empty(G, M, *c.shape[2:])
        if M and G:
            k.ekmv_forward_kernel[(n_mt, G)](
                Xp, Ap, cf, mask_arg, out, M, N, n_mt, n_nt,
                HAS_MASK=mask is not None, BLOCK_M=BLOCK, BLOCK_N=BLOCK, FP=k.FEATURES_PADDED, W=sets,
                num_warps=num_warps,
            )
        ctx.save_for_backward(Xp, Ap, cf, mask_arg)
        ctx.info = (F, mask is not None, X.dtype, sets, num_warps)
        return out.to(X.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        k = _kernels()
        Xp, Ap, cf, mask_arg = ctx.saved_tensors
        F, has_mask, dtype, sets, num_warps = ctx.info
        G, M, _ = Xp.shape
        N = Ap.shape[1]
        n_mt, n_nt = _grid_sizes(M, N)
        go = grad_out.float().contiguous()
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        common = dict(HAS_MASK=has_mask, BLOCK_M=BLOCK, BLOCK_N=BLOCK, FP=k.FEATURES_PADDED, W=sets, num_warps=num_warps)
        grad_x = grad_a = grad_c = None
        if need_x:
            gx = torch.empty_like(Xp)
            if M and G:
                k.ekmv_grad_x_kernel[(n_mt, G)](Xp, Ap, cf, go, mask_arg, gx, M, N, n_mt, n_nt, **common)
            grad_x = gx[..., :F].to(dtype)
        if need_a or need_c:
            ga, gc = torch.empty_like(Ap), torch.empty_like(cf)
            if N and G:
                k.ekmv_grad_a_c_kernel[(n_nt, G)](Xp, Ap, cf, go, mask_arg, ga, gc, M, N, n_mt, n_nt, **common)
            grad_a = ga[..., :F].to(dtype) if need_a else None
            grad_c = gc.to(dtype) if need_c else None
        return grad_x, grad_a, grad_c, None, None


class FusedConvolve(torch.autograd.Function):
    """Eq. 3 outer product ``data [B, F_i, N_i, K]``, ``kernels [F_o, F_i, N_k, K]`` ->
    ``[B, F_o, F_i * N_i * N_k, K]`` in one Triton kernel; backward by reductions in PyTorch."""

    @staticmethod
    def forward(ctx, data: Tensor, kernels: Tensor) -> Tensor:
        k = _kernels()
        b, f_i, n_i, dims_k = data.shape
        f_o, _, n_k, _ = kernels.shape
        total = f_i * n_i * n_k
        d32, k32 = data.float().contiguous(), kernels.float().contiguous()
        out = d32.new_empty(b, f_o, total, dims_k)
        if out.numel():
            block = 64
            k.convolve_kernel[(-(-total // block), b * f_o)](
                d32, k32, out, f_i, n_i, n_k, f_o, dims_k, BLOCK=block, KP=16
            )
        ctx.save_for_backward(data, kernels)
        return out.to(data.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        data, kernels = ctx.saved_tensors
        b, f_i, n_i, dims_k = data.shape
        f_o, _, n_k, _ = kernels.shape
        g = grad.reshape(b, f_o, f_i, n_i, n_k, dims_k)
        grad_data = grad_kernels = None
        if ctx.needs_input_grad[0]:
            w = torch.einsum("boink,oik->bin", g[..., 0], kernels[..., 0])
            rest = g[..., 1:].sum(dim=(1, 4))
            grad_data = torch.cat([w.unsqueeze(-1), rest], dim=-1)
        if ctx.needs_input_grad[1]:
            w = torch.einsum("boink,bin->oik", g[..., 0], data[..., 0])
            rest = g[..., 1:].sum(dim=(0, 3))
            grad_kernels = torch.cat([w.unsqueeze(-1), rest], dim=-1)
        return grad_data, grad_kernels


class FusedBackend(TorchBackend):
    """Triton kernels (CUDA; CPU only in Triton's interpreter): evaluation, gradients, convolution.

    ``cutoff``: relative tolerance of the spatial cut-off (``None`` = off), as
    for the ``torch`` backend.  ``num_warps``: warps per 64 x 64 tile program
    (4 or 8; with 4 the gradient kernel for the Gaussians needs 255 registers
    per thread and spills on sm_90, with 8 none does: see docs/backends.md;
    which is faster is for ``benchmarks/gpu_report.py`` to measure).  Computes
    in float32 (float64 inputs are evaluated in float32 and cast back).
    """

    name = "fused"

    def __init__(
        self,
        cutoff: Annotated[float | None, "relative tolerance of the spatial cut-off, in (0, 1) (null: off)"] = None,
        num_warps: Annotated[int, "warps per 64 x 64 tile program, a power of two from 1 to 16 (see docs/backends.md)"] = 4,
    ):
        if num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two from 1 to 16, got {num_warps!r}")
        super().__init__(cpu_kernel="gemm", cutoff=cutoff)
        self.num_warps = num_warps

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed; pip install 'gmbench[fused]' or use backend 'torch'"
        if interpreting():
            return None
        if not torch.cuda.is_available():
            return (
                "no CUDA GPU (torch.cuda.is_available() is false); use backend 'torch' "
                "(TRITON_INTERPRET=1 runs the kernels in Triton's slow CPU interpreter, for tests only)"
            )
        return triton_cache.prepare_cache()

    def _check_device(self, t: Tensor) -> None:
        if t.device.type != "cuda" and not interpreting():
            raise GmbenchError(
                f"backend 'fused' got tensors on {t.device}; move the model and data to CUDA "
                "(device: cuda) or use backend 'torch'"
            )

    def _cutoff_tile(self, X: Tensor) -> int:
        return BLOCK

    def _matvec(self, X: Tensor, A: Tensor, c: Tensor, plan: cutoff.CutoffPlan | None) -> Tensor:
        self._check_device(X)
        if plan is not None and (plan.tile_m, plan.tile_n) != (BLOCK, BLOCK):
            raise ValueError(f"the fused kernels need cut-off tiles of {BLOCK} x {BLOCK}")
        return FusedExpKernelMatVec.apply(X, A, c, None if plan is None else plan.mask, self.num_warps)

    def convolve(self, data: Tensor, kernels: Tensor) -> Tensor:
        if data.shape[1] != kernels.shape[1]:
            raise ValueError(
                f"data has {data.shape[1]} channels but kernels expect {kernels.shape[1]} input channels"
            )
        if data.shape[-1] != kernels.shape[-1]:
            raise ValueError("data and kernels must have the same dimension")
        gm.n_dims(data)
        self._check_device(data)
        return FusedConvolve.apply(data, kernels)


@hookimpl
def gmbench_backend():
    return FusedBackend
