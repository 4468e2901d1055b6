r"""The reference PyTorch backend (CPU and CUDA), memory-bounded.

Evaluating a mixture of N Gaussians at M points is an "exponential-kernel
matrix-vector product"

.. math:: f_i = \sum_j c_j \exp(X_i \cdot A_j),

with per-point features :math:`X_i = [x x^T, x, 1]` (the quadratic form as a
small GEMM) and per-Gaussian coefficients :math:`A_j = -\tfrac12 [P_j, -2 P_j b_j,
b_j^T P_j b_j]`, :math:`P_j = C_j^{-1}`, :math:`c_j = a_j / \sqrt{(2\pi)^D \det C_j}`.

:class:`ExpKernelMatVec` computes it tile by tile over the Gaussians and
recomputes the tiles in backward (like FlashAttention), so autograd never holds
an ``M x N`` tensor: peak extra memory is O((M + N) * tile), not O(M * N).

On CPU the same function (and its gradients) runs by default in a small
vectorised C++ kernel (:mod:`gmbench.backends.cpu_kernel`, compiled at first
use; falls back to the GEMM form without a compiler), 4-6x faster than the
GEMM form on two cores (``benchmarks/bench_backends.py``).  An optional spatial cut-off
(:mod:`gmbench.backends.cutoff`) skips negligible Gaussian pairs tile by tile.

Numerics: coordinates are centred on each mixture's mean position before the
features are formed, so a mixture far from the origin loses no precision.  The
remaining rounding error of the exponent is about ``eps * |P| * r^2`` with
``r`` the distance from the mixture's centre; pass ``compute_dtype="float64"``
for ill-conditioned covariances far from the centre.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.backends import cpu_kernel, cutoff, cutoff_native
from gmbench.plugins import hookimpl

CPU_KERNELS = ("auto", "cpp", "gemm")
# Tiles of the C++ kernel without cut-off: 64 points x 256 Gaussians keeps a
# tile's coefficients in L1/L2 and the inner loop long enough for AVX-512.
CPU_TILE_M, CPU_TILE_N = 64, 256
# Cut-off tiles of the C++ kernel: small tiles skip more pairs (measured on
# shapes3d GMCN activations, tol 1e-5: 55-90% of 16x16 tile pairs active
# against 93-100% of 64x64), and 16 Gaussians still fill one AVX-512 vector.
CPU_CUTOFF_TILE = 16


def gaussian_coefficients(m: Tensor, centre: Tensor, weight_sets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-Gaussian ``A`` ``[..., N, F]`` and ``c`` ``[..., N]`` so that ``g(x) = c exp(X(x) . A)``.

    ``centre`` (``[..., 1, D]``) is subtracted from the positions first.  With
    ``weight_sets`` (``[..., N, W]``) these replace the mixture's weights and
    ``c`` is ``[..., N, W]``: W mixtures that share every Gaussian.
    """
    d = gm.n_dims(m)
    precision, logdet = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    coefficients = gm.quadratic_coefficients(precision, gm.positions(m) - centre)
    peak = torch.exp(gm.log_normaliser(logdet, d))
    if weight_sets is not None:
        return coefficients, weight_sets * peak.unsqueeze(-1)
    return coefficients, gm.weights(m) * peak


def centroid_terms(m: Tensor, centre: Tensor, weight_sets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, A, c)`` of :func:`gaussian_coefficients` and ``quadratic_features(positions - centre)``
    for mixtures evaluated at their own centres, ``m [G, N, K]``, ``centre [G, 1, D]``.

    The same formulas written per scalar column (D = 2, 3): the mixture is unbound once
    and every feature is one elementwise op on ``[G, N]``, so autograd holds about 40
    small nodes instead of the slices, index/index-put pairs, tiny batched matmuls and
    full-size zero-filled slice gradients of the generic path (most of the dense fit's
    time outside the kernel on the quickstart layout).  Forward values equal the generic
    path's except ``P b``, which the generic path forms with ``bmm`` (possibly fused
    multiply-adds): the two agree to rounding (``tests/test_backend_torch.py``).
    On CPU the backend runs the same operations in C++ (:class:`cpu_kernel.CPUCentroidTerms`,
    tested against this function); this form is the reference, and the path on CUDA and
    with ``cpu_kernel="gemm"``.
    """
    d = gm.n_dims(m)
    weight, position, cov = gm.scalar_columns(m)
    x = [p - o for p, o in zip(position, centre.unbind(-1))]
    if d == 2:
        a, b, cc = cov[0][0], cov[0][1], cov[1][1]
        det = (a * cc - b * b).clamp_min(torch.finfo(m.dtype).tiny)
        p00, p01, p11 = cc / det, -b / det, a / det
        pmu = [p00 * x[0] + p01 * x[1], p01 * x[0] + p11 * x[1]]
        # quadratic_coefficients' factors: -1/2 overall, 2 off the diagonal, -2 on P b (exact powers of 2).
        upper = [p00 * -0.5, -p01, p11 * -0.5]
        squares = [x[0] * x[0], x[0] * x[1], x[1] * x[1]]
    else:
        (a, b, cc), (_, e, f), (_, _, i) = cov
        A0, B0, C0, E0, F0, I0 = gm.symmetric_cofactors_3d(a, b, cc, e, f, i)
        det = (a * A0 + b * B0 + cc * C0).clamp_min(torch.finfo(m.dtype).tiny)
        p00, p01, p02, p11, p12, p22 = A0 / det, B0 / det, C0 / det, E0 / det, F0 / det, I0 / det
        pmu = [
            p00 * x[0] + p01 * x[1] + p02 * x[2],
            p01 * x[0] + p11 * x[1] + p12 * x[2],
            p02 * x[0] + p12 * x[1] + p22 * x[2],
        ]
        upper = [p00 * -0.5, -p01, -p02, p11 * -0.5, -p12, p22 * -0.5]
        squares = [x[0] * x[0], x[0] * x[1], x[0] * x[2], x[1] * x[1], x[1] * x[2], x[2] * x[2]]
    constant = x[0] * pmu[0]
    for k in range(1, d):
        constant = constant + x[k] * pmu[k]
    A = torch.stack([*upper, *pmu, constant * -0.5], -1)
    X = torch.stack([*squares, *x, torch.ones_like(x[0])], -1)
    peak = torch.exp(gm.log_normaliser(torch.log(det), d))
    c = weight * peak if weight_sets is None else weight_sets * peak.unsqueeze(-1)
    return X, A, c


class ExpKernelMatVec(torch.autograd.Function):
    """``f[b, i] = sum_j c[b, j] * exp(min(X[b, i] . A[b, j], 0))``, tiled over ``j``.

    Shapes: ``X [G, M, F]``, ``A [G, N, F]``, ``c [G, N]`` -> ``[G, M]``, or
    ``c [G, N, W]`` -> ``[G, M, W]`` (W weight sets share every exponential).
    The exponent of a normalised Gaussian is never positive; clamping at 0
    removes rounding overshoot at the centres without changing gradients
    elsewhere.
    """

    @staticmethod
    def forward(ctx, X: Tensor, A: Tensor, c: Tensor, tile: int) -> Tensor:
        ctx.save_for_backward(X, A, c)
        ctx.tile = tile
        sets = c if c.dim() == 3 else c.unsqueeze(-1)
        out = X.new_zeros(*X.shape[:2], sets.shape[-1])
        for start in range(0, A.shape[1], tile):
            stop = start + tile
            e = torch.bmm(X, A[:, start:stop].transpose(1, 2)).clamp_max_(0).exp_()
            out.baddbmm_(e, sets[:, start:stop])
        return out if c.dim() == 3 else out.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        X, A, c = ctx.saved_tensors
        tile = ctx.tile
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        sets = c if c.dim() == 3 else c.unsqueeze(-1)
        g = grad_out if c.dim() == 3 else grad_out.unsqueeze(-1)  # [G, M, W]
        grad_x = torch.zeros_like(X) if need_x else None
        grad_a = torch.empty_like(A) if need_a else None
        grad_c = torch.empty_like(sets) if need_c else None
        for start in range(0, A.shape[1], tile):
            stop = start + tile
            a_tile = A[:, start:stop]
            e = torch.bmm(X, a_tile.transpose(1, 2)).clamp_max_(0).exp_()  # [G, M, T]
            if need_c:
                grad_c[:, start:stop] = torch.bmm(e.transpose(1, 2), g)
            if need_x or need_a:
                if sets.shape[-1] == 1:
                    s = e.mul_(g).mul_(sets[:, start:stop].transpose(1, 2))  # d f / d exponent
                else:
                    s = e.mul_(torch.bmm(g, sets[:, start:stop].transpose(1, 2)))
                if need_x:
                    grad_x.baddbmm_(s, a_tile)
                if need_a:
                    grad_a[:, start:stop] = torch.bmm(s.transpose(1, 2), X)
        if grad_c is not None and c.dim() == 2:
            grad_c = grad_c.squeeze(-1)
        return grad_x, grad_a, grad_c, None


class TorchBackend:
    """PyTorch backend with a fast C++ CPU kernel; memory-bounded tiled evaluation (CPU and CUDA).

    ``tile_elements`` bounds the size of one ``[mixtures, points, Gaussians]``
    tile (elements) of the GEMM form; ``compute_dtype`` optionally evaluates in
    a wider dtype.  ``cpu_kernel``: ``"auto"`` uses the C++ kernel on CPU when
    it builds (else the GEMM form), ``"cpp"`` requires it, ``"gemm"`` never uses
    it.  ``cutoff``: relative tolerance of the spatial cut-off (``None`` = off;
    ``1e-7`` drops only pairs below float32 precision), see
    :mod:`gmbench.backends.cutoff`.
    """

    name = "torch"

    def __init__(
        self,
        tile_elements: Annotated[int, "elements of one [mixtures, points, Gaussians] tile of the GEMM form"] = 1 << 22,
        compute_dtype: Annotated[Literal["float32", "float64"] | None, "evaluate in this dtype (null: the input's)"] = None,
        cpu_kernel: Annotated[Literal["auto", "cpp", "gemm"], "auto: the C++ kernel on CPU where it builds; cpp: require it; gemm: never"] = "auto",
        cutoff: Annotated[float | None, "relative tolerance of the spatial cut-off, in (0, 1) (null: off)"] = None,
    ):
        if tile_elements < 1:
            raise ValueError("tile_elements must be positive")
        if compute_dtype not in (None, "float32", "float64"):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype!r}")
        if cpu_kernel not in CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {', '.join(CPU_KERNELS)}, got {cpu_kernel!r}")
        if cpu_kernel == "cpp" and cpu_kernel_module_reason():
            raise ValueError(f"cpu_kernel='cpp' is unavailable: {cpu_kernel_module_reason()}; use 'auto'")
        if cutoff is not None and not (0 < float(cutoff) < 1):
            raise ValueError(f"cutoff must be a relative tolerance in (0, 1) or null, got {cutoff!r}")
        self.tile_elements = int(tile_elements)
        self.compute_dtype = getattr(torch, compute_dtype) if compute_dtype else None
        self.cpu_kernel = cpu_kernel
        self.cutoff = None if cutoff is None else float(cutoff)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def _tile(self, groups: int, points: int) -> int:
        return max(1, self.tile_elements // max(1, groups * points))

    def evaluate(self, m: Tensor, points: Tensor) -> Tensor:
        return self._evaluate(m, points, same_set=False)

    def evaluate_at_centroids(self, m: Tensor) -> Tensor:
        return self._evaluate(m, gm.positions(m), same_set=True)

    def evaluate_weight_sets_at_centroids(self, m: Tensor, weight_sets: Tensor) -> Tensor:
        """``m [..., N, K]`` with ``W`` alternative weight vectors ``[..., N, W]`` -> ``[..., N, W]``.

        One pass over the ``N x N`` pairs for all ``W`` mixtures: each
        exponential is computed once (the dense ReLU fit needs ``W = 2``).
        """
        if weight_sets.dim() != m.dim() or weight_sets.shape[:-1] != m.shape[:-1]:
            raise ValueError(
                f"weight sets {tuple(weight_sets.shape)} do not match mixtures {tuple(m.shape)}: expected [..., N, W]"
            )
        return self._evaluate(m, gm.positions(m), same_set=True, weight_sets=weight_sets)

    def _use_cpu_kernel(self, X: Tensor) -> bool:
        return self.cpu_kernel != "gemm" and cpu_kernel.supports(X) and cpu_kernel.load() is not None

    def _use_cpu_centroid_terms(self, m: Tensor) -> bool:
        return self.cpu_kernel != "gemm" and cpu_kernel.supports_mixture(m) and cpu_kernel.load() is not None

    def _cutoff_tile(self, X: Tensor) -> int:
        return CPU_CUTOFF_TILE if self._use_cpu_kernel(X) else cutoff.DEFAULT_TILE

    def _matvec_sets(self, X: Tensor, A: Tensor, c: Tensor, plan: cutoff.CutoffPlan | None) -> Tensor:
        """:meth:`_matvec` for any number of weight sets: the kernels share each
        exponential between at most two, so more run two at a time."""
        if c.dim() == 3 and c.shape[-1] > 2:
            return torch.cat([self._matvec(X, A, c[..., k : k + 2], plan) for k in range(0, c.shape[-1], 2)], -1)
        return self._matvec(X, A, c, plan)

    def _matvec(self, X: Tensor, A: Tensor, c: Tensor, plan: cutoff.CutoffPlan | None) -> Tensor:
        """``[G, M]`` (or ``[G, M, W]`` for ``c [G, N, W]``, ``W <= 2``): the exponential-kernel mat-vec on the fastest path available."""
        if plan is None:
            if self._use_cpu_kernel(X):
                return cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, None, CPU_TILE_M, CPU_TILE_N)
            return ExpKernelMatVec.apply(X, A, c, self._tile(X.shape[0], X.shape[1]))
        if self._use_cpu_kernel(X):
            return cpu_kernel.CPUExpKernelMatVec.apply(X, A, c, plan.mask, plan.tile_m, plan.tile_n)
        chunk = max(1, self.tile_elements // (plan.tile_m * plan.tile_n))
        return cutoff.MaskedExpKernelMatVec.apply(X, A, c, plan.mask, plan.tile_m, plan.tile_n, chunk)

    def _evaluate(self, m: Tensor, points: Tensor, same_set: bool, weight_sets: Tensor | None = None) -> Tensor:
        batch = m.shape[:-2]
        d = gm.n_dims(m)
        if points.shape[-1] != d:
            raise ValueError(f"points have {points.shape[-1]} coordinates but the mixture is {d}D")
        if points.dim() == 2:
            points = points.expand(*batch, *points.shape)
        if points.shape[:-2] != batch:
            raise ValueError(f"points {tuple(points.shape)} do not match mixtures {tuple(m.shape)}")
        out_dtype = m.dtype
        if self.compute_dtype is not None:
            m, points = m.to(self.compute_dtype), points.to(self.compute_dtype)
            weight_sets = None if weight_sets is None else weight_sets.to(self.compute_dtype)
        m_flat = m.reshape(-1, *m.shape[-2:])
        p_flat = points.reshape(-1, *points.shape[-2:])
        sets_flat = None if weight_sets is None else weight_sets.reshape(-1, *weight_sets.shape[-2:]).to(m.dtype)
        # Centring on the (detached) mean position: exact shift, removes the
        # cancellation of x^T P x - 2 x^T P b + b^T P b far from the origin.
        centre = gm.positions(m_flat).mean(-2, keepdim=True).detach()
        if same_set and self._use_cpu_centroid_terms(m_flat):
            X, A, c = cpu_kernel.CPUCentroidTerms.apply(m_flat, centre, sets_flat)
        elif same_set:
            X, A, c = centroid_terms(m_flat, centre, sets_flat)
        else:
            A, c = gaussian_coefficients(m_flat, centre, sets_flat)
            X = gm.quadratic_features(p_flat - centre)
        if self.cutoff is None:
            out = self._matvec_sets(X, A, c, None)
        elif self._use_cpu_kernel(X) and cutoff_native.load() is not None:
            # Pair lists over kd tiles (cutoff_native): one plan for every weight set and for backward.
            peaks = c if c.dim() == 2 else c.abs().amax(-1)
            plan = cutoff_native.make_plan(p_flat, gm.positions(m_flat), gm.covariances(m_flat), peaks, self.cutoff)
            out = cutoff_native.matvec_sets(X, A, c, plan)  # rows read and written through plan.point_order
        else:
            tile = self._cutoff_tile(X)
            peaks = c if c.dim() == 2 else c.abs().amax(-1)
            plan = cutoff.make_plan(
                p_flat, gm.positions(m_flat), gm.covariances(m_flat), peaks, self.cutoff, tile, tile, same_set=same_set
            )
            X = cutoff.permute_rows(X, plan.point_order)
            A = cutoff.permute_rows(A, plan.gaussian_order)
            c = cutoff.permute_rows(c, plan.gaussian_order)
            out = cutoff.unpermute_rows(self._matvec_sets(X, A, c, plan), plan.point_order)
        return out.reshape(*batch, *out.shape[1:]).to(out_dtype)

    def convolve(self, data: Tensor, kernels: Tensor) -> Tensor:
        return gm.convolve_dense(data, kernels)


def cpu_kernel_module_reason() -> str | None:
    return cpu_kernel.unavailable_reason()


@hookimpl
def gmbench_backend():
    return TorchBackend
