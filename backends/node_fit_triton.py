r"""The reduction methods' node fits (E and M steps) as Triton kernels for CUDA tensors.

:func:`em_step` computes :func:`gmbench.reduction.em.em_step` (MEM's one
call: the ``N_o x N_p`` pairs of a mixture in programs of
:data:`ROWS_PER_PROGRAM` target rows, ``BLOCK_S`` rows at a time); :func:`fit_nodes` computes
:func:`gmbench.reduction.node_fit.fit_nodes` (TreeHEM's node fits: one
kernel launch picks the initial Gaussians of every node of a tree level,
one more runs the E and M step of all of them).  The kernels are in
:mod:`gmbench.backends.node_fit_triton_kernels`.

What runs where: the ``O(S x Q)`` work of a problem (the pair terms, the
sign and KL gates, the softmax over fitting Gaussians, the M step's weighted
sums) and the single-linkage clustering run in the kernels, in the input's
dtype; the ``O(S + Q)`` per-Gaussian features before (centring, second
moments, closed-form precisions and log determinants, virtual sample counts)
and the moment division after are a few vectorised PyTorch operations with
the reference's formulas.

Backward: :func:`em_step_backward_kernel` recomputes each block's pair
terms, gates and responsibilities from the saved per-Gaussian features and
applies the chain rule of the softmax and the weighted sums (the gates are
constants, as the reference's ``no_grad`` block makes them); the features and
the moment division are differentiated by autograd through the same PyTorch
formulas (and detached terms) as the reference, so the gradients are the
reference's up to float rounding (``tests/test_node_fit_triton.py``).  What
autograd keeps is per-Gaussian, ``O(S + Q)`` per problem, never the
``S x Q`` pair terms (TreeHEM's ``recompute`` has nothing left to save).
Not twice differentiable.

Availability: ``triton`` installed and a CUDA tensor (Triton's cache folder
checked private, :mod:`gmbench.backends.triton_cache`); with
``TRITON_INTERPRET=1`` set before the kernels are imported, the same kernels
run on CPU tensors in Triton's interpreter (slow; for tests).

Shapes: targets ``[M, S, K]`` with mask ``[M, S]``; fitting ``[M, Q, K]``
with mask ``[M, Q]``; results ``([M, Q, K], valid [M, Q])``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gmbench import mixture as gm
from gmbench.backends import triton_cache
from gmbench.errors import GmbenchError
from gmbench.reduction.node_fit import take

# Elements of the [BLOCK_S, BLOCK_Q, FP] tile of pair terms one program holds.
TILE_ELEMENTS = 4096
# Target rows per program of the E+M kernel: a MEM mixture of 2560 Gaussians is split over 10
# programs (its partial sums added afterwards), so 8 x 8 mixtures fill a GPU's SMs several times.
ROWS_PER_PROGRAM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def unavailable_reason(m: Tensor) -> str | None:
    """Why the kernels cannot run on tensors like ``m`` (``None`` if they can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'gmbench[fused]')"
    if m.dtype not in (torch.float32, torch.float64) or m.shape[-1] not in (7, 13):
        return "the Triton node fits take 2D or 3D mixtures of float32 or float64"
    if m.device.type != "cuda" and not interpreting():
        return "the Triton node fits run on CUDA tensors (TRITON_INTERPRET=1 runs them on CPU in Triton's interpreter, for tests)"
    if not interpreting():
        return triton_cache.prepare_cache()
    return None


def supports(m: Tensor) -> bool:
    return unavailable_reason(m) is None


def _kernels():
    if not interpreting():
        reason = triton_cache.prepare_cache()  # before Triton compiles or loads anything
        if reason:
            raise GmbenchError(f"the Triton node fits cannot run here: {reason}; use implementation: auto or torch")
    from gmbench.backends import node_fit_triton_kernels

    return node_fit_triton_kernels


def _padded_width(d: int) -> int:
    return 8 if d == 2 else 16  # D*D + D + 1 = 7 or 13 feature columns, padded to a power of two


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _padded(parts: list[Tensor], fp: int) -> Tensor:
    """``[..., F]`` pieces concatenated and zero-padded to ``fp`` columns, contiguous."""
    width = sum(x.shape[-1] for x in parts)
    return torch.cat([*parts, parts[0].new_zeros(*parts[0].shape[:-1], fp - width)], -1).contiguous()


def em_launch_config(s: int, q: int, d: int) -> dict:
    """Compile-time constants and warps of :func:`em_step_kernel` for ``S`` targets onto ``Q`` (without ``USE_KL``)."""
    fp = _padded_width(d)
    block_q = max(2, _pow2(q))
    block_s = max(2, min(_pow2(s), _pow2(max(1, TILE_ELEMENTS // (block_q * fp)))))
    # A TreeHEM node (S = 2T, Q = T) is a few dozen pair terms: one warp.
    return dict(D=d, FP=fp, BLOCK_S=block_s, BLOCK_Q=block_q, num_warps=4 if block_s * block_q * fp >= 2048 else 1)


def launch_variants(node_sizes=(2, 4, 8), mem_components=(32,)) -> list[tuple[str, str, dict]]:
    """``(kernel, dtype, constants with num_warps)`` the reductions launch: TreeHEM with ``T`` in
    ``node_sizes`` (levels and partial fit), MEM onto ``mem_components`` Gaussians; for compile checks."""
    variants = []
    for dtype in ("fp32", "fp64"):
        for d in (2, 3):
            shapes = {(2 * t, t) for t in node_sizes} | {(2 * t, 2 * t) for t in node_sizes}
            shapes |= {(1 << 16, q) for q in mem_components}
            for s, q in sorted(shapes):
                for use_kl in (True, False):
                    for kernel in ("em_step_kernel", "em_step_backward_kernel"):
                        variants.append((kernel, dtype, dict(USE_KL=use_kl, **em_launch_config(s, q, d))))
            for t in node_sizes:
                variants.append(("initial_order_kernel", dtype, dict(S=2 * t, D=d, num_warps=initial_order_warps(2 * t))))
    return variants


class _EMSums(torch.autograd.Function):
    """:func:`em_step_kernel` (forward) and :func:`em_step_backward_kernel` (backward).

    Differentiable inputs ``ft [M, S, FP]``, ``w_i``, ``virtual [M, S]``, ``fs [M, Q, FP]``,
    ``lnorm``, ``log_prior [M, Q]``; the rest only feed the gates.  Returns the M step's sums
    ``ws [M, Q]`` and ``U [M, Q, FP]``.
    """

    @staticmethod
    def forward(ctx, ft, w_i, virtual, fs, lnorm, log_prior, tv, logdet_i, logdet_s, w_s, fv, threshold, use_kl):
        k = _kernels()
        m, s, fp = ft.shape
        q = fs.shape[1]
        config = em_launch_config(s, q, 2 if fp == 8 else 3)
        rows = max(ROWS_PER_PROGRAM, config["BLOCK_S"])
        chunks = -(-s // rows)
        inputs = (ft, w_i, tv, logdet_i, virtual, fs, lnorm, logdet_s, log_prior, w_s, fv, threshold)
        out_w = ft.new_empty(m, chunks, q)
        out_u = ft.new_empty(m, chunks, q, fp)
        k.em_step_kernel[(m, chunks)](*inputs, out_w, out_u, s, q, rows, USE_KL=use_kl, **config)
        ctx.save_for_backward(*inputs)
        ctx.launch = (m, s, q, rows, chunks, use_kl, config)
        if chunks == 1:
            return out_w[:, 0], out_u[:, 0]
        return out_w.sum(1), out_u.sum(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w, grad_u):
        k = _kernels()
        inputs = ctx.saved_tensors
        m, s, q, rows, chunks, use_kl, config = ctx.launch
        ft, fs = inputs[0], inputs[5]
        g_ft, g_w, g_virtual = torch.empty_like(ft), ft.new_empty(m, s), ft.new_empty(m, s)
        g_fs = fs.new_empty(m, chunks, q, fs.shape[-1])
        g_lnorm, g_prior = fs.new_empty(m, chunks, q), fs.new_empty(m, chunks, q)
        k.em_step_backward_kernel[(m, chunks)](
            *inputs, grad_w.to(ft.dtype).contiguous(), grad_u.to(ft.dtype).contiguous(),
            g_ft, g_w, g_virtual, g_fs, g_lnorm, g_prior, s, q, rows, USE_KL=use_kl, **config,
        )
        g_fs, g_lnorm, g_prior = g_fs.sum(1), g_lnorm.sum(1), g_prior.sum(1)
        return g_ft, g_w, g_virtual, g_fs, g_lnorm, g_prior, *[None] * 7


def _em_step(target, target_valid, fitting, fitting_valid, virtual_points, kl_threshold):
    """:func:`em.em_step`: the reference's per-Gaussian features (differentiable PyTorch, the same
    detached terms), the pair terms and sums in the kernels, the M step's division in PyTorch."""
    d = gm.n_dims(target)
    fp = _padded_width(d)
    centre = gm.positions(target).mean(-2, keepdim=True).detach()
    mu_i = gm.positions(target) - centre
    mu_s = gm.positions(fitting) - centre
    second_i = (gm.covariances(target) + mu_i.unsqueeze(-1) * mu_i.unsqueeze(-2)).flatten(-2)
    ft = _padded([second_i, mu_i, torch.ones_like(mu_i[..., :1])], fp)
    precision_s, logdet_s = gm.symmetric_inverse_and_logdet(gm.covariances(fitting))
    p_mu_s = (precision_s @ mu_s.unsqueeze(-1)).squeeze(-1)
    fs = _padded([precision_s.flatten(-2), -2.0 * p_mu_s, (mu_s * p_mu_s).sum(-1, keepdim=True)], fp)
    w_i, w_s = gm.weights(target), gm.weights(fitting)
    abs_w_i = w_i.abs() * target_valid
    total = abs_w_i.sum(-1, keepdim=True)
    virtual = virtual_points * abs_w_i / torch.where(total > 0, total, torch.ones_like(total))
    log_prior = torch.log(w_s.abs().clamp_min(torch.finfo(w_s.dtype).tiny))
    with torch.no_grad():  # the gates' inputs
        _, logdet_i = gm.symmetric_inverse_and_logdet(gm.covariances(target))
        threshold = target.new_full((1,), kl_threshold if kl_threshold is not None else 0.0)
    ws, u = _EMSums.apply(
        ft, w_i.contiguous(), virtual.contiguous(), fs, gm.log_normaliser(logdet_s, d).contiguous(),
        log_prior.contiguous(), target_valid.to(torch.uint8).contiguous(), logdet_i.contiguous(),
        logdet_s.detach().contiguous(), w_s.detach().contiguous(), fitting_valid.to(torch.uint8).contiguous(),
        threshold, kl_threshold is not None,
    )
    # M step (Eq. 16) from the sums, as em.m_step forms it.
    nonzero = ws.detach().abs() > torch.finfo(ws.dtype).tiny * 1e6
    safe_w = torch.where(nonzero, ws, torch.ones_like(ws)).unsqueeze(-1)
    mean = u[..., d * d : d * d + d] / safe_w
    cov_s = (u[..., : d * d] / safe_w).unflatten(-1, (d, d)) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    cov_s = 0.5 * (cov_s + cov_s.transpose(-1, -2))
    keep = nonzero.unsqueeze(-1)
    positions = torch.where(keep, mean + centre, gm.positions(fitting).detach())
    covariances = torch.where(keep.unsqueeze(-1), cov_s, gm.covariances(fitting).detach())
    out = gm.pack(torch.where(nonzero, ws, torch.zeros_like(ws)), positions, covariances)
    return out, nonzero & fitting_valid


def em_step(
    target: Tensor, target_valid: Tensor, fitting: Tensor, fitting_valid: Tensor,
    virtual_points: float, kl_threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """:func:`gmbench.reduction.em.em_step` by the Triton kernel: ``-> ([M, Q, K], valid [M, Q])``."""
    if target.shape[0] == 0 or fitting.shape[1] == 0:
        return fitting.new_zeros(fitting.shape), fitting_valid.new_zeros(fitting_valid.shape)
    return _em_step(target, target_valid, fitting, fitting_valid, float(virtual_points), kl_threshold)


def initial_order_warps(s: int) -> int:
    return 1 if s <= 8 else 4  # an S x S tile of distances and comparisons per node


@torch.no_grad()
def initial_order(target: Tensor, valid: Tensor, n_out: Tensor, max_out: int) -> tuple[Tensor, Tensor]:
    """:func:`node_fit.initial_gaussians`'s choice as indices: ``(order [M, max_out], valid [M, max_out])``."""
    k = _kernels()
    m, s, _ = target.shape
    width = max(2, _pow2(s))
    if width != s:  # the kernel's tiles are powers of two: pad with invalid Gaussians (never chosen)
        target = gm.pad(target, width)
        valid = torch.cat([valid, valid.new_zeros(m, width - s)], 1)
    order = torch.empty(m, width, dtype=torch.int32, device=target.device)
    order_valid = torch.empty(m, width, dtype=torch.uint8, device=target.device)
    k.initial_order_kernel[(m,)](
        target.contiguous(), valid.to(torch.uint8).contiguous(), n_out.to(torch.int64).contiguous(), order, order_valid,
        S=width, D=gm.n_dims(target), num_warps=initial_order_warps(width),
    )
    return order[:, :max_out].long(), order_valid[:, :max_out].bool()


def fit_nodes(
    target: Tensor, valid: Tensor, n_out: Tensor, max_out: int, virtual_points: float,
    kl_threshold: float | None, recompute: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`gmbench.reduction.node_fit.fit_nodes` by the Triton kernels: ``[M, S, K] -> ([M, max_out, K], valid)``.

    ``recompute`` is accepted for the reference's signature: the backward
    kernel always recomputes the pair terms (only per-Gaussian tensors are kept).
    """
    m, s, k = target.shape
    if max_out > s:
        raise ValueError(f"a node fit returns at most its {s} input Gaussians, asked for {max_out}")
    if m == 0:
        return target.new_zeros(0, max_out, k), valid.new_zeros(0, max_out)
    order, init_valid = initial_order(target.detach(), valid, n_out, max_out)
    return em_step(target, valid, take(target, order), init_valid, virtual_points, kl_threshold)
