r"""Triton kernels of the ``fused`` backend (imported only when that backend runs).

Kernels (one program per tile, FlashAttention-style: the ``M x N`` matrix of
exponentials lives only in registers, one ``[BLOCK_M, BLOCK_N]`` tile at a time):

* :func:`ekmv_forward_kernel`   ``f[g, i, w] = sum_j c[g, j, w] exp(min(X[g, i] . A[g, j], 0))``
* :func:`ekmv_grad_x_kernel`    ``dX[g, i] = sum_j s[g, i, j] A[g, j]``
* :func:`ekmv_grad_a_c_kernel`  ``dA[g, j] = sum_i s[g, i, j] X[g, i]``, ``dc[g, j, w] = sum_i go[g, i, w] e[g, i, j]``

with ``e = exp(min(X . A, 0))`` recomputed in backward and
``s = e * sum_w go[., w] c[., w]``.  ``W`` (1 or 2, a compile-time constant)
weight sets share every exponential: the dense ReLU fit evaluates the input
and its coarse approximation (same Gaussians, two weight vectors) in one pass.
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
def _load_sets(C, base, ok, W: tl.constexpr):
    """The ``W`` (1 or 2) values at ``C + base * W + w``; the second is 0 when ``W == 1``."""
    v0 = tl.load(C + base * W, mask=ok, other=0.0)
    if W == 2:
        v1 = tl.load(C + base * W + 1, mask=ok, other=0.0)
    else:
        v1 = tl.zeros_like(v0)
    return v0, v1


@triton.jit
def ekmv_forward_kernel(
    X, A, C, MASK, OUT, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr, W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, FP)
    row_ok = rows < M
    x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
    acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for nt in range(0, n_nt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + pid_m) * n_nt + nt)
        if active != 0:
            j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = j < N
            e, a = _exponentials(x, A + (g * N + j)[:, None] * FP + cols[None, :], j_ok)
            c0, c1 = _load_sets(C, g * N + j, j_ok, W)
            acc0 += tl.sum(e * c0[None, :], axis=1)
            if W == 2:
                acc1 += tl.sum(e * c1[None, :], axis=1)
    tl.store(OUT + (g * M + rows) * W, acc0, mask=row_ok)
    if W == 2:
        tl.store(OUT + (g * M + rows) * W + 1, acc1, mask=row_ok)


@triton.jit
def ekmv_grad_x_kernel(
    X, A, C, GO, MASK, GX, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr, W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, FP)
    row_ok = rows < M
    x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
    go0, go1 = _load_sets(GO, g * M + rows, row_ok, W)
    gx = tl.zeros((BLOCK_M, FP), dtype=tl.float32)
    for nt in range(0, n_nt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + pid_m) * n_nt + nt)
        if active != 0:
            j = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = j < N
            e, a = _exponentials(x, A + (g * N + j)[:, None] * FP + cols[None, :], j_ok)
            c0, c1 = _load_sets(C, g * N + j, j_ok, W)
            if W == 2:
                s = e * (go0[:, None] * c0[None, :] + go1[:, None] * c1[None, :])
            else:
                s = e * go0[:, None] * c0[None, :]
            gx += tl.dot(s, a, input_precision="ieee")
    tl.store(GX + (g * M + rows)[:, None] * FP + cols[None, :], gx, mask=row_ok[:, None])


@triton.jit
def ekmv_grad_a_c_kernel(
    X, A, C, GO, MASK, GA, GC, M, N, n_mt, n_nt,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP: tl.constexpr, W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, FP)
    j_ok = j < N
    a_ptrs = A + (g * N + j)[:, None] * FP + cols[None, :]
    c0, c1 = _load_sets(C, g * N + j, j_ok, W)
    ga = tl.zeros((BLOCK_N, FP), dtype=tl.float32)
    gc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mt in range(0, n_mt):
        active = 1
        if HAS_MASK:
            active = tl.load(MASK + (g * n_mt + mt) * n_nt + pid_n)
        if active != 0:
            rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            x = tl.load(X + (g * M + rows)[:, None] * FP + cols[None, :], mask=row_ok[:, None], other=0.0)
            go0, go1 = _load_sets(GO, g * M + rows, row_ok, W)
            e, a = _exponentials(x, a_ptrs, j_ok)
            ge0 = e * go0[:, None]
            gc0 += tl.sum(ge0, axis=0)
            s = ge0 * c0[None, :]
            if W == 2:
                ge1 = e * go1[:, None]
                gc1 += tl.sum(ge1, axis=0)
                s += ge1 * c1[None, :]
            ga += tl.dot(tl.trans(s), x, input_precision="ieee")
    tl.store(GA + (g * N + j)[:, None] * FP + cols[None, :], ga, mask=j_ok[:, None])
    tl.store(GC + (g * N + j) * W, gc0, mask=j_ok)
    if W == 2:
        tl.store(GC + (g * N + j) * W + 1, gc1, mask=j_ok)


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
