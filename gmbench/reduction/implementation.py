"""Which implementation of the node fits (E and M steps) a reduction uses.

``"torch"``: the PyTorch functions of :mod:`gmbench.reduction.em` and
:mod:`gmbench.reduction.node_fit` (the reference, any device).
``"native"``: the fused C++ kernel (:mod:`gmbench.backends.node_fit_cpu`; CPU
tensors); an error where it cannot run.  ``"auto"`` (default): the kernel
where it can run, else PyTorch.  Both compute the same function up to float
rounding (``tests/test_node_fit_cpu.py``).
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from gmbench.errors import GmbenchError

IMPLEMENTATIONS = ("auto", "native", "torch")


def check_implementation(value: str) -> str:
    """Raise ``ValueError`` unless ``value`` is one of :data:`IMPLEMENTATIONS`."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {value!r}")
    return value


def native_kernel(implementation: str, m: Tensor) -> ModuleType | None:
    """The kernel module to use for mixtures ``m``, or ``None`` for the PyTorch path."""
    if implementation == "torch":
        return None
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
