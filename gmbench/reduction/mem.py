r"""Modified EM reduction (MEM, paper Section 4.1).

The ``N_p`` Gaussians with the largest integrals ``|w|`` are the initial
mixture; one E step (Eq. 15, Preiner's virtual-sample likelihood with the
trace term) and one M step (Eq. 16) fit them to all ``N_o`` input Gaussians.
Every input Gaussian is compared with every initial one, so time is
``O(N_o x N_p)`` per mixture, as in the paper, and so is the memory of the
PyTorch path (including autograd's saved tensors); the C++ kernel
(:func:`gmbench.backends.node_fit_cpu.mem`, the default on CPU) keeps only the
pairs the KL gate lets through.  ``benchmarks/bench_reduction.py`` measures both.

Shapes: ``reduce(m [..., N_o, K], N_p) -> [..., N_p, K]``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.plugins import hookimpl
from gmbench.reduction.em import em_step
from gmbench.reduction.implementation import check_implementation, native_kernel
from gmbench.reduction.node_fit import take
from gmbench.reduction.scaling import check_reduction_input, reduce_batched


class ModifiedEMReduction:
    """Modified EM (MEM): the N_p largest Gaussians as initial mixture, one E and one M step, O(N_o N_p).

    ``virtual_points`` Preiner's virtual sample count (the authors' code used 20);
    ``kl_threshold`` KL gate of the E step, gmbench's documented choice (Preiner's
    geometric regularisation, Appendix D; the closest pair is always allowed, so
    mass is preserved).  The authors' Python MHEM has this gate commented out (the
    threshold of 2.0 in their config is unused): ``kl_threshold: null`` turns it off
    and reproduces their MHEM on positive mixtures (``tests/test_reduction.py``);
    ``weight_threshold`` Gaussians with smaller ``|w|`` are ignored;
    ``normalize_scale`` pre-scale each mixture to mean covariance trace D;
    ``implementation`` of the E and M step: ``auto`` (the fused C++ kernel on
    CPU where it builds, the Triton kernel on CUDA where triton is installed,
    else PyTorch), ``native``, ``triton`` or ``torch`` (see
    :mod:`gmbench.reduction.implementation`).
    """

    name = "mem"

    def __init__(
        self,
        virtual_points: Annotated[float, "Preiner's virtual sample count (the authors' code used 20)"] = 20.0,
        kl_threshold: Annotated[float | None, "KL gate of the E step; the closest pair always passes (null: off, as the authors' MHEM)"] = 1.0,
        weight_threshold: Annotated[float, "Gaussians with a smaller |weight| are ignored"] = 1e-7,
        normalize_scale: Annotated[bool, "pre-scale each mixture to mean covariance trace D"] = True,
        implementation: Annotated[
            Literal["auto", "native", "torch", "triton"],
            "E and M step: auto (the C++ kernel on CPU where it builds, Triton on CUDA where installed, else PyTorch), native, triton or torch",
        ] = "auto",
    ):
        if virtual_points <= 0:
            raise ValueError(f"virtual_points must be positive, got {virtual_points!r}")
        if kl_threshold is not None and kl_threshold <= 0:
            raise ValueError(f"kl_threshold must be positive or null, got {kl_threshold!r}")
        if weight_threshold < 0:
            raise ValueError(f"weight_threshold must be >= 0, got {weight_threshold!r}")
        self.virtual_points = float(virtual_points)
        self.kl_threshold = kl_threshold
        self.weight_threshold = float(weight_threshold)
        self.normalize_scale = normalize_scale
        self.implementation = check_implementation(implementation)

    def __repr__(self) -> str:
        return f"ModifiedEMReduction(virtual_points={self.virtual_points}, kl_threshold={self.kl_threshold})"

    def reduce(self, m: Tensor, n_components: int) -> Tensor:
        check_reduction_input(m, n_components)
        if m.shape[-2] > n_components:
            kernel = native_kernel(self.implementation, m)
            if kernel is not None and hasattr(kernel, "mem"):  # the C++ kernel: the whole reduction in one call
                batch, n, k = m.shape[:-2], m.shape[-2], m.shape[-1]
                fitted, _ = kernel.mem(
                    m.reshape(-1, n, k), n_components, self.virtual_points, self.kl_threshold,
                    self.weight_threshold, self.normalize_scale,
                )
                return fitted.reshape(*batch, n_components, k)
        return reduce_batched(m, n_components, self.normalize_scale, self._reduce_flat)

    def _reduce_flat(self, flat: Tensor, n_components: int) -> Tensor:
        valid = gm.weights(flat).detach().abs() >= self.weight_threshold
        with torch.no_grad():
            magnitude = torch.where(valid, gm.weights(flat).abs(), torch.full_like(gm.weights(flat), -1.0))
            largest = torch.argsort(-magnitude, dim=-1, stable=True)[:, :n_components]
        init = take(flat, largest)
        kernel = native_kernel(self.implementation, flat)
        fitted, fitted_valid = (kernel.em_step if kernel is not None else em_step)(
            flat, valid, init, valid.gather(1, largest), self.virtual_points, self.kl_threshold
        )
        return gm.with_weights(fitted, torch.where(fitted_valid, gm.weights(fitted), torch.zeros_like(gm.weights(fitted))))


@hookimpl
def gmbench_reduction():
    return ModifiedEMReduction
