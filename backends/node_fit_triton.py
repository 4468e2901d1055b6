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

Backward recomputes through the PyTorch reference (:func:`em.em_step` on the
saved inputs, inside :class:`torch.autograd.Function`): the gradients are the
reference's by construction (its gates, detached terms and the closed-form
inverse's use of the upper triangle), only the inputs are kept between the
passes, and the backward costs one reference forward and backward, as
TreeHEM's ``recompute`` does today.  A Triton backward kernel would remove
that cost; it is not written yet.

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
from gmbench.reduction import em
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


def _features(target: Tensor, target_valid: Tensor, fitting: Tensor, fitting_valid: Tensor, virtual_points: float):
    """The per-Gaussian inputs of :func:`em_step_kernel`, by :func:`em.responsibilities`'s formulas."""
    d = gm.n_dims(target)
    fp = _padded_width(d)
    centre = gm.positions(target).mean(-2, keepdim=True)
    mu_i = gm.positions(target) - centre
    mu_s = gm.positions(fitting) - centre
    second_i = (gm.covariances(target) + mu_i.unsqueeze(-1) * mu_i.unsqueeze(-2)).flatten(-2)
    ft = target.new_zeros(*target.shape[:2], fp)
    ft[..., : d * d] = second_i
    ft[..., d * d : d * d + d] = mu_i
    ft[..., d * d + d] = 1.0
    precision_s, logdet_s = gm.symmetric_inverse_and_logdet(gm.covariances(fitting))
    p_mu_s = (precision_s @ mu_s.unsqueeze(-1)).squeeze(-1)
    fs = fitting.new_zeros(*fitting.shape[:2], fp)
    fs[..., : d * d] = precision_s.flatten(-2)
    fs[..., d * d : d * d + d] = -2.0 * p_mu_s
    fs[..., d * d + d] = (mu_s * p_mu_s).sum(-1)
    w_i, w_s = gm.weights(target), gm.weights(fitting)
    abs_w_i = w_i.abs() * target_valid
    total = abs_w_i.sum(-1, keepdim=True)
    virtual = virtual_points * abs_w_i / torch.where(total > 0, total, torch.ones_like(total))
    _, logdet_i = gm.symmetric_inverse_and_logdet(gm.covariances(target))
    log_prior = torch.log(w_s.abs().clamp_min(torch.finfo(w_s.dtype).tiny))
    contiguous = lambda *ts: [t.contiguous() for t in ts]  # noqa: E731
    target_part = contiguous(ft, w_i, target_valid.to(torch.uint8), logdet_i, virtual)
    fitting_part = contiguous(fs, gm.log_normaliser(logdet_s, d), logdet_s, log_prior, w_s, fitting_valid.to(torch.uint8))
    return centre, target_part, fitting_part


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
                    variants.append(("em_step_kernel", dtype, dict(USE_KL=use_kl, **em_launch_config(s, q, d))))
            for t in node_sizes:
                variants.append(("initial_order_kernel", dtype, dict(S=2 * t, D=d, num_warps=initial_order_warps(2 * t))))
    return variants


def _em_step_forward(target, target_valid, fitting, fitting_valid, virtual_points, kl_threshold):
    k = _kernels()
    d = gm.n_dims(target)
    m, s, _ = target.shape
    q = fitting.shape[1]
    config = em_launch_config(s, q, d)
    centre, target_part, fitting_part = _features(target, target_valid, fitting, fitting_valid, virtual_points)
    rows = max(ROWS_PER_PROGRAM, config["BLOCK_S"])
    chunks = -(-s // rows)
    out_w = target.new_empty(m, chunks, q)
    out_u = target.new_empty(m, chunks, q, config["FP"])
    threshold = target.new_full((1,), kl_threshold if kl_threshold is not None else 0.0)
    k.em_step_kernel[(m, chunks)](
        *target_part, *fitting_part, threshold, out_w, out_u, s, q, rows, USE_KL=kl_threshold is not None, **config
    )
    out_w, out_u = (out_w[:, 0], out_u[:, 0]) if chunks == 1 else (out_w.sum(1), out_u.sum(1))
    # M step (Eq. 16) from the sums, as em.m_step forms it.
    nonzero = out_w.abs() > torch.finfo(out_w.dtype).tiny * 1e6
    safe_w = torch.where(nonzero, out_w, torch.ones_like(out_w)).unsqueeze(-1)
    mu_s = out_u[..., d * d : d * d + d] / safe_w
    cov_s = (out_u[..., : d * d] / safe_w).unflatten(-1, (d, d)) - mu_s.unsqueeze(-1) * mu_s.unsqueeze(-2)
    cov_s = 0.5 * (cov_s + cov_s.transpose(-1, -2))
    keep = nonzero.unsqueeze(-1)
    positions = torch.where(keep, mu_s + centre, gm.positions(fitting))
    covariances = torch.where(keep.unsqueeze(-1), cov_s, gm.covariances(fitting))
    out = gm.pack(torch.where(nonzero, out_w, torch.zeros_like(out_w)), positions, covariances)
    return out, nonzero & fitting_valid


class _EMStep(torch.autograd.Function):
    """Forward by :func:`em_step_kernel`; backward recomputes :func:`em.em_step` (the reference)."""

    @staticmethod
    def forward(ctx, target, target_valid, fitting, fitting_valid, virtual_points, kl_threshold):
        out, valid = _em_step_forward(target, target_valid, fitting, fitting_valid, virtual_points, kl_threshold)
        ctx.save_for_backward(target, target_valid, fitting, fitting_valid)
        ctx.settings = (virtual_points, kl_threshold)
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_valid):
        target, target_valid, fitting, fitting_valid = ctx.saved_tensors
        need_target, _, need_fitting = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            t = target.detach().requires_grad_(need_target)
            f = fitting.detach().requires_grad_(need_fitting)
            out, _ = em.em_step(t, target_valid, f, fitting_valid, *ctx.settings)
            inputs = [x for x in (t, f) if x.requires_grad]
            grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True)) if inputs else []
        grad_target = grads.pop(0) if need_target else None
        grad_fitting = grads.pop(0) if need_fitting else None
        return grad_target, None, grad_fitting, None, None, None


def em_step(
    target: Tensor, target_valid: Tensor, fitting: Tensor, fitting_valid: Tensor,
    virtual_points: float, kl_threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """:func:`gmbench.reduction.em.em_step` by the Triton kernel: ``-> ([M, Q, K], valid [M, Q])``."""
    if target.shape[0] == 0 or fitting.shape[1] == 0:
        return fitting.new_zeros(fitting.shape), fitting_valid.new_zeros(fitting_valid.shape)
    return _EMStep.apply(target, target_valid, fitting, fitting_valid, float(virtual_points), kl_threshold)


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

    ``recompute`` is accepted for the reference's signature: backward always
    recomputes (only the inputs are kept).
    """
    m, s, k = target.shape
    if max_out > s:
        raise ValueError(f"a node fit returns at most its {s} input Gaussians, asked for {max_out}")
    if m == 0:
        return target.new_zeros(0, max_out, k), valid.new_zeros(0, max_out)
    order, init_valid = initial_order(target.detach(), valid, n_out, max_out)
    return em_step(target, valid, take(target, order), init_valid, virtual_points, kl_threshold)
