"""The ReLU fitting layer: transfer-function fitting followed by reduction (paper Section 4.1).

This is the step the GMCN convolution layer runs after every convolution:
``relu(gm)`` is fitted densely (same Gaussians, new weights) and the dense fit
is reduced to ``n_out`` Gaussians.  Both steps are plugins chosen by name and
parameters, so a suite can swap them (``transfer_fitting: dense|lstsq|...``,
``reduction: treehem|mem|<third-party>``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gmbench import mixture as gm
from gmbench import plugins


class ReLUFitting(nn.Module):
    r"""Fit ``relu(m)`` by a mixture of ``n_out`` Gaussians.

    Shapes: ``forward(m [B, C, N, 1+D+D*D]) -> [B, C, n_out, 1+D+D*D]``
    (``[B, C, N, ...]`` when ``n_out`` is ``None``: dense fitting only).
    ``forward(m, return_dense=True)`` returns ``(reduced, dense)`` for the
    error metrics of :mod:`gmbench.metrics`.
    """

    def __init__(
        self,
        transfer_fitting: str = "dense",
        reduction: str = "treehem",
        n_out: int | None = None,
        transfer_fitting_params: dict[str, Any] | None = None,
        reduction_params: dict[str, Any] | None = None,
    ):
        super().__init__()
        if n_out is not None and (isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1):
            raise ValueError(f"n_out must be a positive integer or None, got {n_out!r}")
        self.n_out = n_out
        self.transfer_fitting_name = transfer_fitting
        self.reduction_name = reduction
        self.transfer_fitting = plugins.create("transfer_fitting", transfer_fitting, **(transfer_fitting_params or {}))
        self.reduction = plugins.create("reduction", reduction, **(reduction_params or {}))

    def extra_repr(self) -> str:
        return f"transfer_fitting={self.transfer_fitting!r}, reduction={self.reduction!r}, n_out={self.n_out}"

    def forward(self, m: Tensor, return_dense: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        gm.n_dims(m)
        dense = self.transfer_fitting.fit(m)
        reduced = dense if self.n_out is None else self.reduction.reduce(dense, self.n_out)
        return (reduced, dense) if return_dense else reduced
