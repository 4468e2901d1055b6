"""Which implementation of the node fits (E and M steps) a reduction uses.

``"torch"``: the PyTorch functions of :mod:`gmbench.reduction.em` and
:mod:`gmbench.reduction.node_fit` (the reference, any device).
``"native"``: the fused C++ kernel (:mod:`gmbench.backends.node_fit_cpu`; CPU
tensors); an error where it cannot run.  ``"triton"``: the Triton kernels
(:mod:`gmbench.backends.node_fit_triton`; CUDA tensors, or CPU tensors in
Triton's interpreter with ``TRITON_INTERPRET=1``); an error where they cannot
run.  ``"auto"`` (default): on CPU the C++ kernel where it builds, on CUDA the
Triton kernels where ``triton`` is importable, else PyTorch.  All compute the
same function up to float rounding (``tests/test_node_fit_cpu.py``,
``tests/test_node_fit_triton.py``).
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from gmbench.errors import GmbenchError

IMPLEMENTATIONS = ("auto", "native", "torch", "triton")


def check_implementation(value: str) -> str:
    """Raise ``ValueError`` unless ``value`` is one of :data:`IMPLEMENTATIONS`."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {value!r}")
    return value


def _triton_kernel(implementation: str, m: Tensor) -> ModuleType | None:
    from gmbench.backends import node_fit_triton

    reason = node_fit_triton.unavailable_reason(m)
    if reason is None:
        return node_fit_triton
    if implementation == "triton":
        raise GmbenchError(
            f"reduction implementation 'triton' cannot run on this {m.device.type} {str(m.dtype)[6:]} tensor: "
            f"{reason}; use implementation: auto or torch"
        )
    return None


def native_kernel(implementation: str, m: Tensor) -> ModuleType | None:
    """The kernel module to use for mixtures ``m``, or ``None`` for the PyTorch path.

    The native module fuses a whole TreeHEM (``treehem``); the Triton module
    has the reference's ``em_step`` and ``fit_nodes`` only.
    """
    if implementation == "torch":
        return None
    if implementation == "triton" or (implementation == "auto" and m.device.type == "cuda"):
        return _triton_kernel(implementation, m)
    from gmbench.backends import node_fit_cpu

    if node_fit_cpu.supports(m):
        return node_fit_cpu
    if implementation == "native":
        reason = node_fit_cpu.unavailable_reason() if m.device.type == "cpu" else None
        raise GmbenchError(
            f"reduction implementation 'native' cannot run on this {m.device.type} {str(m.dtype)[6:]} tensor: "
            f"{reason or 'the node-fit kernel runs on CPU tensors of float32/float64 only'}; "
            "use implementation: auto or torch"
        )
    return None
