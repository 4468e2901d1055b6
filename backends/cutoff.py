r"""Spatial cut-off: skip (point, Gaussian) pairs whose contribution is negligible.

After the pooling rescale most Gaussian pairs of a mixture are far apart, and
:math:`|c_j| \exp(-\tfrac12 (x-b_j)^T C_j^{-1} (x-b_j))` is below float
precision.  With a relative tolerance ``tol`` the cut-off drops every pair with

.. math:: |c_j| e^{-\frac12 d_M^2} < \tau, \qquad \tau = \mathrm{tol} \cdot \max_k |c_k|,

(per mixture; :math:`c_j = a_j / \sqrt{(2\pi)^D \det C_j}` is the peak value).
Gaussian ``j`` exceeds ``tau`` only inside the ellipsoid
:math:`d^T C_j^{-1} d \le R_j^2 = 2 \ln(|c_j| / \tau)` (the Mahalanobis bound),
whose axis-aligned bounding box has half-widths :math:`R_j \sqrt{C_j[k, k]}`.

Points and Gaussians are sorted along a Morton (Z-order) curve and grouped in
tiles; a (point tile, Gaussian tile) pair is evaluated only if the points'
bounding box meets the union of the Gaussians' influence boxes.  Every
dropped pair contributes less than ``tau``, so the error at any point is below
``n_dropped * tau <= N * tol * max|c|`` (in practice far less: measured below
``5 * tol * max|c|``).  Gradients are those of the truncated sum (dropped
pairs get zero gradient).

:class:`MaskedExpKernelMatVec` evaluates only the active tile pairs with
batched GEMMs (any device); the C++ CPU kernel and the Triton kernels take the
same mask.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

DEFAULT_TILE = 64


@dataclasses.dataclass
class CutoffPlan:
    """Morton orders and the tile mask of one evaluation.

    Shapes: ``point_order [G, M]``, ``gaussian_order [G, N]`` (permutations),
    ``mask [G, ceil(M / tile_m), ceil(N / tile_n)]`` (uint8, 1 = evaluate).
    """

    point_order: Tensor
    gaussian_order: Tensor
    mask: Tensor
    tile_m: int
    tile_n: int

    @property
    def active_fraction(self) -> float:
        """Fraction of tile pairs that are evaluated."""
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


# Bit-interleaving by magic numbers ("binary magic numbers"): a handful of tensor
# ops per axis instead of one per bit, which matters when each op is small.
_SPREAD = {
    2: (31, ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
             (2, 0x3333333333333333), (1, 0x5555555555555555))),
    3: (21, ((32, 0x001F00000000FFFF), (16, 0x001F0000FF0000FF), (8, 0x100F00F00F00F00F),
             (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249))),
}


def _spread_bits(v: Tensor, dims: int) -> Tensor:
    """Interleave the low bits of ``v`` (int64) with ``dims - 1`` zero bits between them."""
    for shift, mask in _SPREAD[dims][1]:
        v = (v | (v << shift)) & mask
    return v


def morton_order(x: Tensor) -> Tensor:
    """``[G, P, D] -> [G, P]`` permutation sorting each group's points along a Z-order curve.

    Coordinates are quantised on each group's bounding cube (31 bits per axis in
    2D, 21 in 3D): one scale for all axes, so that a flat or elongated set is
    still split along its long axis first.
    """
    g, p, d = x.shape
    if p == 0:
        return torch.zeros(g, 0, dtype=torch.long, device=x.device)
    bits = _SPREAD[d][0]
    x = x.double()
    lo = x.amin(1, keepdim=True)
    extent = (x.amax(1, keepdim=True) - lo).amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    q = ((x - lo) / extent * ((1 << bits) - 1)).round_().long()
    code = _spread_bits(q[..., 0], d)
    for axis in range(1, d):
        code |= _spread_bits(q[..., axis], d) << axis
    return torch.argsort(code, dim=1)


def _tile_boxes(x: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """Per-tile bounding boxes ``[G, T, D]`` (lo, hi) of sorted ``x [G, P, D]``."""
    g, p, d = x.shape
    n_tiles = -(-p // tile)
    missing = n_tiles * tile - p
    if missing:  # repeat the last point: leaves the last box unchanged
        x = torch.cat([x, x[:, -1:].expand(g, missing, d)], dim=1)
    x = x.reshape(g, n_tiles, tile, d)
    return x.amin(2), x.amax(2)


def influence_half_widths(covariances: Tensor, peaks: Tensor, tolerance: float) -> Tensor:
    """``[G, N, D]`` half-widths of the axis-aligned box outside which each Gaussian is below ``tau``.

    With ``R^2 = 2 ln(|c_j| / tau)`` the region ``|c_j| exp(-d_M^2 / 2) >= tau`` is the
    ellipsoid ``d^T C_j^{-1} d <= R^2``, whose bounding box has half-widths
    ``R sqrt(C_j[k, k])`` (tighter than the sphere of radius ``R sqrt(lambda_max)``
    for elongated Gaussians).  ``-inf`` where the whole Gaussian is below ``tau``
    (including zero-weight padding): it never needs evaluating.
    """
    magnitude = peaks.double().abs()
    tau = tolerance * magnitude.amax(-1, keepdim=True)
    ratio = magnitude / tau.clamp_min(torch.finfo(torch.float64).tiny)
    radius = torch.sqrt(2 * torch.log(ratio.clamp_min(1)))
    variances = torch.diagonal(covariances.double(), dim1=-2, dim2=-1).clamp_min(0)
    half = radius[..., None] * variances.sqrt()
    return torch.where((magnitude > tau)[..., None], half, torch.full_like(half, -math.inf))


def make_plan(
    points: Tensor,
    centres: Tensor,
    covariances: Tensor,
    peaks: Tensor,
    tolerance: float,
    tile_m: int = DEFAULT_TILE,
    tile_n: int = DEFAULT_TILE,
    same_set: bool = False,
) -> CutoffPlan:
    """Plan the cut-off for ``points [G, M, D]`` against Gaussians ``centres [G, N, D]``.

    ``covariances [G, N, D, D]``, ``peaks [G, N]`` (``c_j``; sign ignored).
    ``same_set``: points are the Gaussians' centres (``evaluate_at_centroids``),
    so one Morton sort serves both.  A (point tile, Gaussian tile) pair is
    active iff the points' bounding box meets the union of the Gaussians'
    influence boxes (:func:`influence_half_widths`).  Computed without gradients.
    """
    if not tolerance > 0:
        raise ValueError(f"cut-off tolerance must be positive, got {tolerance}")
    with torch.no_grad():
        points, centres = points.detach(), centres.detach()
        gaussian_order = morton_order(centres)
        point_order = gaussian_order if same_set else morton_order(points)
        sorted_points = points.gather(1, point_order[..., None].expand_as(points))
        order3 = gaussian_order[..., None].expand_as(centres)
        sorted_centres = centres.gather(1, order3).double()
        half = influence_half_widths(covariances.detach(), peaks.detach(), tolerance).gather(1, order3)
        p_lo, p_hi = _tile_boxes(sorted_points.double(), tile_m)
        # Influence boxes; a negligible Gaussian gets an empty box (lo = +inf, hi = -inf).
        g_lo, _ = _tile_boxes(sorted_centres - half, tile_n)
        _, g_hi = _tile_boxes(sorted_centres + half, tile_n)
        overlap = (p_lo[:, :, None] <= g_hi[:, None]) & (g_lo[:, None] <= p_hi[:, :, None])  # [G, Tm, Tn, D]
        mask = overlap.all(-1).to(torch.uint8)
    return CutoffPlan(point_order, gaussian_order, mask, tile_m, tile_n)


def permute_rows(x: Tensor, order: Tensor) -> Tensor:
    """``x [G, P, ...]`` with rows reordered by ``order [G, P]`` (differentiable)."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def unpermute_rows(x: Tensor, order: Tensor) -> Tensor:
    """Inverse of :func:`permute_rows` for ``x [G, P, ...]``."""
    return permute_rows(x, torch.argsort(order, dim=1))


class MaskedExpKernelMatVec(torch.autograd.Function):
    """``f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0))`` over active tile pairs only.

    Shapes: ``X [G, M, F]``, ``A [G, N, F]``, ``c [G, N]``, ``mask [G, Tm, Tn]``
    -> ``[G, M]`` (``c [G, N, W]`` -> ``[G, M, W]``: W weight sets).  The active pairs are gathered into ``[K, tile_m, F]`` and
    ``[K, tile_n, F]`` batches (``chunk`` pairs at a time) and multiplied with
    ``bmm``; backward recomputes the exponentials (no ``M x N`` tensor is kept).
    """

    @staticmethod
    def forward(ctx, X, A, c, mask, tile_m: int, tile_n: int, chunk: int):
        G, M, F = X.shape
        N = A.shape[1]
        Tm, Tn = mask.shape[1:]
        Xt = _pad_rows(X, Tm * tile_m).reshape(G * Tm, tile_m, F)
        At = _pad_rows(A, Tn * tile_n).reshape(G * Tn, tile_n, F)
        sets = c if c.dim() == 3 else c.unsqueeze(-1)
        W = sets.shape[-1]
        ct = _pad_rows(sets, Tn * tile_n).reshape(G * Tn, tile_n, W)
        g, p, q = mask.nonzero(as_tuple=True)
        xi, ai = g * Tm + p, g * Tn + q
        out = X.new_zeros(G * Tm, tile_m, W)
        for start in range(0, xi.numel(), chunk):
            xs, as_ = xi[start : start + chunk], ai[start : start + chunk]
            e = torch.bmm(Xt[xs], At[as_].transpose(1, 2)).clamp_max_(0).exp_()
            out.index_add_(0, xs, torch.bmm(e, ct[as_]))
        ctx.save_for_backward(Xt, At, ct, xi, ai)
        ctx.sizes = (G, M, N, F, chunk, c.dim())
        out = out.reshape(G, Tm * tile_m, W)[:, :M]
        return out if c.dim() == 3 else out.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_out):
        Xt, At, ct, xi, ai = ctx.saved_tensors
        G, M, N, F, chunk, c_dims = ctx.sizes
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        tile_m, W = Xt.shape[1], ct.shape[-1]
        grad_out = grad_out if c_dims == 3 else grad_out.unsqueeze(-1)
        go = _pad_rows(grad_out.contiguous(), Xt.shape[0] // G * tile_m).reshape(-1, tile_m, W)
        grad_x = torch.zeros_like(Xt) if need_x else None
        grad_a = torch.zeros_like(At) if need_a else None
        grad_c = torch.zeros_like(ct) if need_c else None
        for start in range(0, xi.numel(), chunk):
            xs, as_ = xi[start : start + chunk], ai[start : start + chunk]
            x_tile, a_tile, g_tile = Xt[xs], At[as_], go[xs]  # g_tile [K, tm, W]
            e = torch.bmm(x_tile, a_tile.transpose(1, 2)).clamp_max_(0).exp_()  # [K, tm, tn]
            if need_c:
                grad_c.index_add_(0, as_, torch.bmm(e.transpose(1, 2), g_tile))
            if need_x or need_a:
                s = e.mul_(torch.bmm(g_tile, ct[as_].transpose(1, 2)))
                if need_x:
                    grad_x.index_add_(0, xs, torch.bmm(s, a_tile))
                if need_a:
                    grad_a.index_add_(0, as_, torch.bmm(s.transpose(1, 2), x_tile))
        grad_x = grad_x.reshape(G, -1, F)[:, :M] if need_x else None
        grad_a = grad_a.reshape(G, -1, F)[:, :N] if need_a else None
        grad_c = grad_c.reshape(G, -1, W)[:, :N] if need_c else None
        if grad_c is not None and c_dims == 2:
            grad_c = grad_c.squeeze(-1)
        return grad_x, grad_a, grad_c, None, None, None, None


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    missing = rows - x.shape[1]
    if missing <= 0:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)
