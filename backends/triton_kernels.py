r"""Triton kernels of the ``fused`` backend (imported only when that backend runs).

Kernels (one program per tile, FlashAttention-style: the ``M x N`` matrix of
exponentials lives only in registers, one ``[BLOCK_M, BLOCK_N]`` tile at a time):

* :func:`ekmv_forward_kernel`   ``f[g, i] = sum_j c[g, j] exp(min(X[g, i] . A[g, j], 0))``
* :func:`ekmv_grad_x_kernel`    ``dX[g, i] = sum_j s[g, i, j] A[g, j]``
* :func:`ekmv_grad_a_c_kernel`  ``dA[g, j] = sum_i s[g, i, j] X[g, i]``, ``dc[g, j] = sum_i go[g, i] e[g, i, j]``

with ``e = exp(min(X . A, 0))`` recomputed in backward and ``s = go * c * e``.
Features are zero-padded to ``FP = 16`` columns so the exponents are one
``tl.dot`` (IEEE float32, no TF32: the exponent needs full precision).  An
optional tile mask (spatial cut-off, :mod:`gmbench.backends.cutoff`) skips
whole tiles.

* :func:`convolve_kernel`  the convolution's outer product (paper Eq. 3):
  ``out[b, o, (i, n, k)] = (a_n alpha_k, b_n + beta_k, C_n + Gamma_k)``.

Importing this module needs ``triton``.  Whether the kernels compile for CUDA
or run in Triton's CPU interpreter is decided when the module is imported
(``TRITON_INTERPRET=1`` must be set before).
"""

from __future__ import annotations

import triton
import triton.language as tl

FEATURES_PADDED = 16


@triton.jit
def _exponentials(x, a_ptrs, row_ok):
    """``exp(min(x @ a^T, 0))`` for a ``[BLOCK_M, FP]`` tile ``x`` and the Gaussian tile at ``a_ptrs``."""
    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
    q = tl.dot(x, tl.trans(a), input_precision="ieee")
    return tl.exp(tl.minimum(q, 0.0)), a


@triton.jit
def ekmv_forward_kernel(
    X, A, C, MASK, OUT, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, FP)
    row_ok = rows < M
    x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for nt in range(0, n_nt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + pid_m) * n_nt + nt)
        if active != 0:
            j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = j < N
            e, a = _exponentials(x, A + (g * N + j)[:, None] * FP + cols[None, :], j_ok)
            c = tl.load(C + g * N + j, mask=j_ok, other=0.0)
            acc += tl.sum(e * c[None, :], axis=1)
    tl.store(OUT + g * M + rows, acc, mask=row_ok)


@triton.jit
def ekmv_grad_x_kernel(
    X, A, C, GO, MASK, GX, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, FP)
    row_ok = rows < M
    x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
    go = tl.load(GO + g * M + rows, mask=row_ok, other=0.0)
    gx = tl.zeros((BLOCK_M, FP), dtype=tl.float32)
    for nt in range(0, n_nt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + pid_m) * n_nt + nt)
        if active != 0:
            j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = j < N
            e, a = _exponentials(x, A + (g * N + j)[:, None] * FP + cols[None, :], j_ok)
            c = tl.load(C + g * N + j, mask=j_ok, other=0.0)
            s = e * go[:, None] * c[None, :]
            gx += tl.dot(s, a, input_precision="ieee")
    tl.store(GX + (g * M + rows)[:, None] * FP + cols[None, :], gx, mask=row_ok[:, None])


@triton.jit
def ekmv_grad_a_c_kernel(
    X, A, C, GO, MASK, GA, GC, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, FP)
    j_ok = j < N
    a_ptrs = A + (g * N + j)[:, None] * FP + cols[None, :]
    c = tl.load(C + g * N + j, mask=j_ok, other=0.0)
    ga = tl.zeros((BLOCK_N, FP), dtype=tl.float32)
    gc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mt in range(0, n_mt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + mt) * n_nt + pid_n)
        if active != 0:
            rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
            go = tl.load(GO + g * M + rows, mask=row_ok, other=0.0)
            e, a = _exponentials(x, a_ptrs, j_ok)
            ge = e * go[:, None]
            gc += tl.sum(ge, axis=0)
            ga += tl.dot(tl.trans(ge * c[None, :]), x, input_precision="ieee")
    tl.store(GA + (g * N + j)[:, None] * FP + cols[None, :], ga, mask=j_ok[:, None])
    tl.store(GC + g * N + j, gc, mask=j_ok)


@triton.jit
def convolve_kernel(
    DATA, KERNELS, OUT, F_i, N_i, N_k, F_o, K,
    BLOCK: tl.constexpr, KP: tl.constexpr,
):
    """One program: ``BLOCK`` output Gaussians of one (batch, output channel)."""
    pid = tl.program_id(0)
    bo = tl.program_id(1)
    b = bo // F_o
    o = bo % F_o
    total = F_i * N_i * N_k
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    i = idx // (N_i * N_k)
    n = (idx // N_k) % N_i
    k = idx % N_k
    cols = tl.arange(0, KP)
    col_ok = cols < K
    both = ok[:, None] & col_ok[None, :]
    d = tl.load(DATA + ((b * F_i + i) * N_i + n)[:, None] * K + cols[None, :], mask=both, other=0.0)
    kern = tl.load(KERNELS + ((o * F_i + i) * N_k + k)[:, None] * K + cols[None, :], mask=both, other=0.0)
    # Weights multiply, positions and covariances add (Eq. 3).
    out = tl.where(cols[None, :] == 0, d * kern, d + kern)
    tl.store(OUT + (bo * total + idx)[:, None] * K + cols[None, :], out, mask=both)
