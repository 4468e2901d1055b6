r"""Theoretical minimal memory footprint of a GMCN (paper Appendix A, Eq. 10).

For a convolution module with ``F_i`` input and ``F_o`` output channels, batch
size ``B``, ``N_i`` input Gaussians per channel, kernels of ``N_k`` Gaussians,
``N_o`` Gaussians produced by the convolution and ``N_p`` after pooling:

.. math::

    K = F_i F_o N_k, \qquad D = B (F_o N_o + F_o N_p), \qquad G = 2 (K + D)

(the factor 2 holds the gradients).  Without integrated convolution-fitting
the convolution stores every product, ``N_o = F_i N_i N_k`` (Table 6); an
integrated module produces ``N_o = 2 N_p`` directly (Table 5).  Memory counts
the minimal storage of a Gaussian, ``1 + d + d(d+1)/2`` float32 values (6 in
2D, 10 in 3D), in MiB (``2**20`` bytes), which is how the paper's ``M_2D`` and
``M_3D`` columns and its totals (434,256 3D Gaussians < 17 MB; 781 MB) come out.
"""

from __future__ import annotations

import dataclasses

from gmbench.errors import GmbenchError
from gmbench.layout import Layout, parse_layout

FLOAT_BYTES = 4  # float32
MIB = 2**20
PAPER_DIMS = (2, 3)  # the paper's M_2D and M_3D columns


def floats_per_gaussian(dims: int) -> int:
    """Minimal storage of one ``dims``-D Gaussian: weight, position, unique covariance entries."""
    return 1 + dims + dims * (dims + 1) // 2


def mebibytes(gaussians: int, dims: int) -> float:
    """MiB of float32 storage for ``gaussians`` minimal ``dims``-D Gaussians."""
    return gaussians * floats_per_gaussian(dims) * FLOAT_BYTES / MIB


@dataclasses.dataclass(frozen=True)
class FootprintRow:
    """One convolution module of Table 5/6 (Eq. 10 terms; ``D`` is the data term, not dims)."""

    B: int
    F_i: int
    F_o: int
    N_i: int
    N_o: int
    N_p: int
    N_k: int
    K: int
    D: int
    G: int

    def mebibytes(self, dims: int) -> float:
        return mebibytes(self.G, dims)


def module_footprint(
    batch: int, in_channels: int, out_channels: int, in_gaussians: int, pooled_gaussians: int,
    kernel_gaussians: int, integrated: bool,
) -> FootprintRow:
    """Eq. 10 for one module.

    ``integrated``: ``N_o = 2 N_p`` (never more than the ``F_i N_i N_k``
    Gaussians the convolution can produce); otherwise ``N_o = F_i N_i N_k``.
    """
    produced = in_channels * in_gaussians * kernel_gaussians
    n_o = min(2 * pooled_gaussians, produced) if integrated else produced
    k = in_channels * out_channels * kernel_gaussians
    d = batch * (out_channels * n_o + out_channels * pooled_gaussians)
    return FootprintRow(
        B=batch, F_i=in_channels, F_o=out_channels, N_i=in_gaussians, N_o=n_o,
        N_p=pooled_gaussians, N_k=kernel_gaussians, K=k, D=d, G=2 * (k + d),
    )


@dataclasses.dataclass(frozen=True)
class Footprint:
    """All modules of a layout plus totals of ``K``, ``D`` and ``G``."""

    layout: Layout
    integrated: bool
    rows: list[FootprintRow]

    @property
    def total_K(self) -> int:
        return sum(row.K for row in self.rows)

    @property
    def total_D(self) -> int:
        return sum(row.D for row in self.rows)

    @property
    def total_G(self) -> int:
        return sum(row.G for row in self.rows)

    def total_mebibytes(self, dims: int) -> float:
        return mebibytes(self.total_G, dims)

    def parameters(self, dims: int) -> int:
        """Trainable floats of the kernels (Appendix A: ``K`` times floats per Gaussian)."""
        return self.total_K * floats_per_gaussian(dims)


def footprint(
    layout: Layout | str, batch: int = 32, kernel_gaussians: int = 5, integrated: bool = False
) -> Footprint:
    """Eq. 10 for every module of ``layout`` (the paper's last module pools to ``N_i / 2`` too)."""
    if isinstance(layout, str):
        layout = parse_layout(layout)
    if batch < 1:
        raise GmbenchError(f"batch size must be >= 1, got {batch}; pass --batch with a positive integer")
    if kernel_gaussians < 1:
        raise GmbenchError(
            f"kernel Gaussians must be >= 1, got {kernel_gaussians}; pass --kernel-gaussians with a positive integer"
        )
    rows = [
        module_footprint(
            batch, layer.in_channels, layer.out_channels, layer.in_gaussians, layer.out_gaussians,
            kernel_gaussians, integrated,
        )
        for layer in layout.layers
    ]
    return Footprint(layout=layout, integrated=integrated, rows=rows)
