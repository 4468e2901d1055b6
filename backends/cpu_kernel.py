r"""A small C++ kernel (vectorised, multi-threaded) for the exponential-kernel mat-vec on CPU.

Computes the same function as :class:`gmbench.backends.torch.ExpKernelMatVec`,

.. math:: f_{g,i} = \sum_j c_{g,j} \exp(\min(X_{g,i} \cdot A_{g,j}, 0)),

(``X [G, M, F]`` quadratic point features, ``A [G, N, F]`` Gaussian
coefficients, ``c [G, N]`` peak values; ``F = 10`` in 3D, ``6`` in 2D) and its
gradients with respect to ``X``, ``A`` and ``c``, without ever forming an
``M x N`` tensor.  Why it is faster than the GEMM form: the exponent, the
exponential and the ``c``-weighted sum happen in registers (one pass over the
``M x N`` pairs instead of writing and re-reading a tile three times), the
exponential is an inlined polynomial that GCC vectorises (AVX2/AVX-512 with
``-march=native``), and the backward pass computes each exponential once for
all three gradients.  Threads: ``torch.get_num_threads()`` plain threads.

The source is compiled with the machine's C++ compiler on first use (about a
second; no PyTorch headers, loaded with :mod:`ctypes`) into
``$GMBENCH_CACHE/kernels`` (default ``~/.cache/gmbench/kernels``), keyed by a
hash of the source, the flags and the CPU's instruction-set flags.  Without a
compiler (or with ``GMBENCH_DISABLE_CPU_KERNEL=1``) :func:`load` returns
``None`` and callers fall back to the GEMM form; :func:`unavailable_reason`
says why.

An optional tile mask (``uint8 [G, ceil(M/tile_m), ceil(N/tile_n)]``, from
:mod:`gmbench.backends.cutoff`) skips whole (point tile, Gaussian tile) pairs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

typedef int64_t i64;

// Runs body(worker, workers) on `threads` std::threads.  Plain threads rather
// than an OpenMP runtime: PyTorch ships its own libgomp, and two OpenMP
// runtimes in one process spin against each other (measured: PyTorch's
// kernels became 10x slower after this one ran).
template <typename Body>
static void run_parallel(int threads, Body body) {
    if (threads <= 1) { body(0, 1); return; }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) pool.emplace_back(body, t, threads);
    body(0, threads);
    for (auto& thread : pool) thread.join();
}

// exp for x <= 0 (or NaN), written out so that GCC vectorises it: Cody-Waite
// range reduction, a degree-7 polynomial (Cephes expf, about 1 ulp), and the
// power of two assembled in the exponent bits.  Below -87 it returns about
// 1e-38 instead of underflowing; NaN stays NaN.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
static inline double exp_nonpositive(double x) { return std::exp(x); }

// Forward: one task per (mixture, point tile); Gaussian coefficients are
// stored transposed (At [G, F, N], c [G, W, N]) so the inner loop over
// Gaussians is contiguous and vectorises, exponential included.  W (1 or 2)
// weight sets share each exponential; out is [G, M, W].
template <typename T, int F, int W>
static void forward(i64 G, i64 M, i64 N, const T* X, const T* At, const T* c, T* out,
                    i64 tm, i64 tn, const uint8_t* mask, int threads) {
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn;
    std::atomic<i64> next(0);
    run_parallel(threads, [&](int, int) {
        for (i64 item = next++; item < G * nmt; item = next++) {
            const i64 g = item / nmt, pt = item % nmt;
            {
            const T* a = At + g * F * N;
            const T* c0 = c + g * W * N;
            const T* c1 = c0 + (W - 1) * N;
            const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
            const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
            for (i64 i = pt * tm; i < i1; ++i) {
                T x[F];
                for (int f = 0; f < F; ++f) x[f] = X[(g * M + i) * F + f];
                T acc0 = 0, acc1 = 0;
                for (i64 nt = 0; nt < nnt; ++nt) {
                    if (row && !row[nt]) continue;
                    // Merge a run of active tiles into one loop (Morton order clusters them).
                    const i64 j0 = nt * tn;
                    if (row) while (nt + 1 < nnt && row[nt + 1]) ++nt; else nt = nnt - 1;
                    const i64 j1 = (nt + 1) * tn < N ? (nt + 1) * tn : N;
                    #pragma omp simd reduction(+ : acc0, acc1)
                    for (i64 j = j0; j < j1; ++j) {
                        T q = 0;
                        for (int f = 0; f < F; ++f) q += x[f] * a[f * N + j];
                        q = q > T(0) ? T(0) : q;  // NaN stays NaN
                        const T e = exp_nonpositive(q);
                        acc0 += c0[j] * e;
                        if (W == 2) acc1 += c1[j] * e;
                    }
                }
                out[(g * M + i) * W] = acc0;
                if (W == 2) out[(g * M + i) * W + 1] = acc1;
            }
            }
        }
    });
}

// Backward: each exponential is computed once and feeds all three gradients.
// Work items (mixture, point chunk) are split contiguously over the threads;
// each thread accumulates dA and dc of its current mixture privately and adds
// them to the output (under a lock) when it moves on.  go is [G, M, W],
// gc [G, N, W].
template <typename T, int F, int W>
static void backward(i64 G, i64 M, i64 N, const T* X, const T* At, const T* c, const T* go,
                     T* gX, T* gA, T* gc, i64 tm, i64 tn, const uint8_t* mask, int threads) {
    const i64 nmt = (M + tm - 1) / tm, nnt = (N + tn - 1) / tn;
    const i64 chunks_per_g = G >= threads ? 1 : (threads + G - 1) / G;
    const i64 pts_per_chunk = ((nmt + chunks_per_g - 1) / chunks_per_g);
    const i64 items = G * chunks_per_g;
    if (gX) std::memset(gX, 0, sizeof(T) * G * M * F);
    if (gA) std::memset(gA, 0, sizeof(T) * G * N * F);
    if (gc) std::memset(gc, 0, sizeof(T) * G * N * W);
    std::mutex flush_lock;
    run_parallel(threads, [&](int tid, int nth) {
        const i64 w0 = items * tid / nth, w1 = items * (tid + 1) / nth;
        std::vector<T> dAt((size_t)F * N), dc((size_t)W * N), s((size_t)N);
        i64 current = -1;
        auto flush = [&](i64 g) {
            if (g < 0) return;
            std::lock_guard<std::mutex> guard(flush_lock);
            for (i64 j = 0; j < N; ++j) {
                if (gc) for (int w = 0; w < W; ++w) gc[(g * N + j) * W + w] += dc[w * N + j];
                if (gA) for (int f = 0; f < F; ++f) gA[(g * N + j) * F + f] += dAt[f * N + j];
            }
        };
        for (i64 w = w0; w < w1; ++w) {
            const i64 g = w / chunks_per_g, chunk = w % chunks_per_g;
            if (g != current) {
                flush(current);
                std::fill(dAt.begin(), dAt.end(), T(0));
                std::fill(dc.begin(), dc.end(), T(0));
                current = g;
            }
            const T* a = At + g * F * N;
            const T* c0 = c + g * W * N;
            const T* c1 = c0 + (W - 1) * N;
            const i64 pt0 = chunk * pts_per_chunk;
            const i64 pt1 = pt0 + pts_per_chunk < nmt ? pt0 + pts_per_chunk : nmt;
            for (i64 pt = pt0; pt < pt1; ++pt) {
                const uint8_t* row = mask ? mask + (g * nmt + pt) * nnt : nullptr;
                const i64 i1 = (pt + 1) * tm < M ? (pt + 1) * tm : M;
                for (i64 i = pt * tm; i < i1; ++i) {
                    const T g0 = go[(g * M + i) * W];
                    const T g1 = W == 2 ? go[(g * M + i) * W + 1] : T(0);
                    if (g0 == T(0) && g1 == T(0)) continue;
                    T x[F], dx[F];
                    for (int f = 0; f < F; ++f) { x[f] = X[(g * M + i) * F + f]; dx[f] = 0; }
                    for (i64 nt = 0; nt < nnt; ++nt) {
                        if (row && !row[nt]) continue;
                        const i64 j0 = nt * tn;
                        if (row) while (nt + 1 < nnt && row[nt + 1]) ++nt; else nt = nnt - 1;
                        const i64 j1 = (nt + 1) * tn < N ? (nt + 1) * tn : N;
                        T* sp = s.data();
                        T* dc0 = dc.data();
                        T* dc1 = dc0 + (W - 1) * N;
                        T* dap = dAt.data();
                        #pragma omp simd
                        for (i64 j = j0; j < j1; ++j) {
                            T q = 0;
                            for (int f = 0; f < F; ++f) q += x[f] * a[f * N + j];
                            q = q > T(0) ? T(0) : q;  // NaN stays NaN
                            const T e = exp_nonpositive(q);
                            dc0[j] += g0 * e;
                            if (W == 2) dc1[j] += g1 * e;
                            const T sj = W == 2 ? e * (g0 * c0[j] + g1 * c1[j]) : g0 * e * c0[j];
                            sp[j] = sj;
                            for (int f = 0; f < F; ++f) dap[f * N + j] += sj * x[f];
                        }
                        if (gX) for (int f = 0; f < F; ++f) {
                            T acc = 0;
                            #pragma omp simd reduction(+ : acc)
                            for (i64 j = j0; j < j1; ++j) acc += sp[j] * a[f * N + j];
                            dx[f] += acc;
                        }
                    }
                    if (gX) for (int f = 0; f < F; ++f) gX[(g * M + i) * F + f] = dx[f];
                }
            }
        }
        flush(current);
    });
}

#define INSTANTIATE(T, F, W, SUFFIX)                                                         \
extern "C" void ekmv_forward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* At,      \
        const T* c, T* out, i64 tm, i64 tn, const uint8_t* mask, int threads) {           \
    forward<T, F, W>(G, M, N, X, At, c, out, tm, tn, mask, threads);                       \
}                                                                                          \
extern "C" void ekmv_backward_##SUFFIX(i64 G, i64 M, i64 N, const T* X, const T* At,     \
        const T* c, const T* go, T* gX, T* gA, T* gc, i64 tm, i64 tn,                     \
        const uint8_t* mask, int threads) {                                                \
    backward<T, F, W>(G, M, N, X, At, c, go, gX, gA, gc, tm, tn, mask, threads);           \
}
INSTANTIATE(float, 6, 1, f32_6_w1)
INSTANTIATE(float, 10, 1, f32_10_w1)
INSTANTIATE(double, 6, 1, f64_6_w1)
INSTANTIATE(double, 10, 1, f64_10_w1)
INSTANTIATE(float, 6, 2, f32_6_w2)
INSTANTIATE(float, 10, 2, f32_10_w2)
INSTANTIATE(double, 6, 2, f64_6_w2)
INSTANTIATE(double, 10, 2, f64_10_w2)
"""

# -ffast-math lets GCC reassociate the reductions into vector lanes;
# -fno-finite-math-only keeps inf/NaN semantics so a diverging model still shows
# up as NaN; -fopenmp-simd honours `omp simd` without linking an OpenMP runtime.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp-simd", "-pthread",
         "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict = {"library": None, "reason": None, "tried": False}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("GMBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gmbench")
    return Path(root) / "kernels"


def _compile() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"ekmv_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / "ekmv.cpp"
            source.write_text(SOURCE)
            built = Path(tmp) / "ekmv.so"
            result = subprocess.run(
                [compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: concurrent processes never load a partial file
    library = ctypes.CDLL(str(target))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    for suffix in (f"{t}_{f}_w{w}" for t in ("f32", "f64") for f in (6, 10) for w in (1, 2)):
        forward = getattr(library, f"ekmv_forward_{suffix}")
        forward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, cint]
        forward.restype = None
        backward = getattr(library, f"ekmv_backward_{suffix}")
        backward.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, cint]
        backward.restype = None
    return library


def load() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` (see :func:`unavailable_reason`)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            if os.environ.get("GMBENCH_DISABLE_CPU_KERNEL"):
                _state["reason"] = "disabled by GMBENCH_DISABLE_CPU_KERNEL"
            else:
                try:
                    _state["library"] = _compile()
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _state["reason"] = f"cannot build the C++ CPU kernel: {error}"
        return _state["library"]


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]


def supports(X: Tensor) -> bool:
    """Whether the kernel handles these features (CPU, float32/float64, F in {6, 10})."""
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and X.shape[-1] in (6, 10)


def _suffix(X: Tensor, sets: int) -> str:
    return f"{'f32' if X.dtype == torch.float32 else 'f64'}_{X.shape[-1]}_w{sets}"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
        G, M, _ = X.shape
        N = A.shape[1]
        sets = 1 if c.dim() == 2 else c.shape[-1]
        if sets not in (1, 2):
            raise ValueError(f"the C++ kernel takes one or two weight sets, got {sets}")
        X = X.contiguous()
        At = A.transpose(1, 2).contiguous()
        ct = c.reshape(G, N, sets).transpose(1, 2).contiguous()  # [G, W, N]: contiguous over Gaussians
        mask = None if mask is None else mask.to(torch.uint8).contiguous()
        out = X.new_empty(G, M, sets)
        getattr(library, f"ekmv_forward_{_suffix(X, sets)}")(
            G, M, N, _ptr(X), _ptr(At), _ptr(ct), _ptr(out), tile_m, tile_n, _ptr(mask), torch.get_num_threads()
        )
        ctx.save_for_backward(X, At, ct, mask)
        ctx.tiles = (tile_m, tile_n)
        ctx.c_shape = c.shape
        return out.view(G, M, *c.shape[2:])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        library = load()
        X, At, ct, mask = ctx.saved_tensors
        G, M, F = X.shape
        N, sets = At.shape[2], ct.shape[1]
        need_x, need_a, need_c = ctx.needs_input_grad[:3]
        grad_out = grad_out.to(X.dtype).reshape(G, M, sets).contiguous()
        grad_x = X.new_empty(G, M, F) if need_x else None
        grad_a = X.new_empty(G, N, F) if need_a else None
        grad_c = X.new_empty(G, N, sets) if need_c else None
        if need_x or need_a or need_c:
            getattr(library, f"ekmv_backward_{_suffix(X, sets)}")(
                G, M, N, _ptr(X), _ptr(At), _ptr(ct), _ptr(grad_out), _ptr(grad_x), _ptr(grad_a), _ptr(grad_c),
                *ctx.tiles, _ptr(mask), torch.get_num_threads(),
            )
        if grad_c is not None:
            grad_c = grad_c.view(ctx.c_shape)
        return grad_x, grad_a, grad_c, None, None, None
