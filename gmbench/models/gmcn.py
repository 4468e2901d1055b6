r"""The Gaussian Mixture Convolution Network (paper Section 5, Figure 4): model plugin ``gmcn``.

Input ``[B, 1, N, 1+D+D*D]`` mixtures are rescaled per sample (mean covariance
trace D, as pooling does).  Each block of the layout
(:func:`gmbench.layout.parse_layout`, e.g. ``1/128->8/64->16/32->32/16->64/8->10``)
is

1. :class:`~gmbench.models.conv.GaussianConvolution` over all input channels
   (``[B, F_i, N_i, K] -> [B, F_o, F_i N_i N_k, K]``),
2. :class:`gmbench.layers.ReLUFitting`: the transfer fitting plugin, then the
   reduction plugin down to the next entry's Gaussian count (pooling),
3. :class:`~gmbench.models.pooling.ScaleNormalization` (Section 4.3).

The last block fits the ReLU but does not reduce (as in the paper); its
``num_classes`` channels are integrated to scalars, batch-normalised and
turned into log-probabilities.  The batch norm (``head``):

* ``"batchnorm"`` (default): ``BatchNorm1d`` over the class scores with its
  affine scale and shift per class, ``2 x num_classes`` parameters;
* ``"paper"``: the class scores normalised by their batch statistics without a
  per-class affine map, then multiplied by one learnable scale shared by all
  classes.  Its one parameter is what the paper's counts add to the kernels'
  (Table 8: 651 = 10 kernels x 65 + 1; Tables 13-14 alike); a shared shift
  would be the other way to get +1 but cancels in the softmax.

Regularisation: :meth:`GMCN.regularization_loss` is Eq. 8 summed over all
kernel Gaussians, times ``weight_decay`` (0.1) times the current learning rate
(Section 5), which the trainer passes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from gmbench import mixture as gm
from gmbench.errors import GmbenchError
from gmbench.layout import Layout, LayerSpec, parse_layout
from gmbench.models.conv import GaussianConvolution
from gmbench.models.pooling import ScaleNormalization
from gmbench.parameters import Dims, NumClasses
from gmbench.plugins import hookimpl


HEADS = ("batchnorm", "paper")


@dataclass
class BlockTrace:
    """Intermediate mixtures of one block (for fitting diagnostics).

    ``convolved``: the convolution output, i.e. the ReLU's input ``[B, F_o, F_i N_i N_k, K]``;
    ``dense``: the transfer fitting of it (same shape); ``reduced``: after the reduction
    ``[B, F_o, N_p, K]`` (``dense`` itself in the last block).
    """

    spec: LayerSpec
    convolved: Tensor
    dense: Tensor
    reduced: Tensor


class GMCNBlock(nn.Module):
    """Convolution -> ReLU fitting (+ reduction) -> pooling rescale; one layout entry."""

    def __init__(
        self,
        spec: LayerSpec,
        dims: int,
        kernel_gaussians: int,
        transfer_fitting: str,
        transfer_fitting_params: dict | None,
        reduction: str,
        reduction_params: dict | None,
        covariance_epsilon: float,
        pooling_momentum: float,
        pooling_uses_running_average: bool,
    ):
        super().__init__()
        # Imported here: the fitting layer pulls in every fitting and reduction plugin.
        from gmbench.layers import ReLUFitting

        self.spec = spec
        self.convolution = GaussianConvolution(
            spec.in_channels, spec.out_channels, kernel_gaussians, dims, covariance_epsilon
        )
        self.fitting = ReLUFitting(
            transfer_fitting=transfer_fitting,
            reduction=reduction,
            n_out=None if spec.is_output else spec.out_gaussians,
            transfer_fitting_params=transfer_fitting_params,
            reduction_params=reduction_params,
        )
        self.pooling = None if spec.is_output else ScaleNormalization(
            spec.out_channels, dims, pooling_momentum, pooling_uses_running_average
        )

    def forward(self, m: Tensor, trace: list[BlockTrace] | None = None) -> Tensor:
        convolved = self.convolution(m)
        if trace is None:
            fitted = self.fitting(convolved)
        else:
            fitted, dense = self.fitting(convolved, return_dense=True)
            trace.append(BlockTrace(self.spec, convolved, dense, fitted))
        return fitted if self.pooling is None else self.pooling(fitted)


class GMCN(nn.Module):
    """Gaussian Mixture Convolution Network classifier (Celarek et al. 2022, Section 5).

    Shapes: ``forward(m [B, 1, N, 1+D+D*D]) -> log-probabilities [B, num_classes]``
    with ``N`` the layout's input Gaussian count.

    Parameters: ``layout`` in the paper's notation (last number = ``num_classes``);
    ``kernel_gaussians`` N_k per kernel; ``transfer_fitting``/``reduction`` plugin
    names with their ``*_params``; ``weight_decay`` scales Eq. 8 (times the learning
    rate); ``pooling_momentum`` of the running trace average and
    ``pooling_uses_running_average`` (the authors' choice: running average in training
    too); ``covariance_epsilon`` of Eq. 9; ``head`` "batchnorm" (per-class affine batch
    norm) or "paper" (batch norm without affine map times one learnable scale: the
    paper's parameter counts); ``head_momentum`` of the head's batch norm.
    """

    name = "gmcn"

    def __init__(
        self,
        num_classes: NumClasses,
        dims: Dims,
        layout: Annotated[str, "layers in the paper's notation, e.g. 1/128->8/64->10 (last number: num_classes)"] = "1/128->8/64->16/32->32/16->64/8->10",
        kernel_gaussians: Annotated[int, "Gaussians per convolution kernel (N_k)"] = 5,
        transfer_fitting: Annotated[str, "transfer_fitting plugin of every layer"] = "dense",
        transfer_fitting_params: Annotated[dict | None, "parameters of the transfer_fitting plugin"] = None,
        reduction: Annotated[str, "reduction plugin of every pooling layer"] = "treehem",
        reduction_params: Annotated[dict | None, "parameters of the reduction plugin"] = None,
        weight_decay: Annotated[float, "scale of the Eq. 8 regulariser (times the learning rate)"] = 0.1,
        pooling_momentum: Annotated[float, "momentum of the running average of the covariance trace"] = 0.1,
        pooling_uses_running_average: Annotated[bool, "also scale by the running average in training (the authors' choice)"] = False,
        covariance_epsilon: Annotated[float, "epsilon of Eq. 9 added to the kernel covariances"] = 1e-4,
        head_momentum: Annotated[float, "momentum of the head's batch norm"] = 0.1,
        head: Annotated[
            Literal["batchnorm", "paper"],
            "batchnorm: per-class affine batch norm; paper: batch norm without affine map times one learnable scale",
        ] = "batchnorm",
    ):
        super().__init__()
        if dims not in gm.DIMS:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if kernel_gaussians < 1:
            raise ValueError(f"kernel_gaussians must be at least 1, got {kernel_gaussians}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.layout: Layout = parse_layout(layout)
        if self.layout.num_classes != num_classes:
            raise ValueError(
                f"layout '{layout}' ends in {self.layout.num_classes} but the data set has {num_classes} classes; "
                f"make the layout's last number {num_classes}"
            )
        if self.layout.input_channels != 1:
            raise ValueError(f"layout '{layout}' must start with 1 channel ('1/N'), the input mixture")
        self.num_classes = num_classes
        self.dims = dims
        self.weight_decay = weight_decay
        self.transfer_fitting = transfer_fitting
        self.reduction = reduction
        self.reduction_params = dict(reduction_params or {})
        self.blocks = nn.ModuleList(
            GMCNBlock(
                spec, dims, kernel_gaussians, transfer_fitting, transfer_fitting_params,
                reduction, reduction_params, covariance_epsilon, pooling_momentum,
                pooling_uses_running_average,
            )
            for spec in self.layout.layers
        )
        # Conventional batch norm per class score.  Its running statistics lag while the
        # kernels change quickly (high learning rates); they settle once the plateau
        # scheduler has lowered the rate, as in the paper's 60-epoch runs.
        self.head = nn.BatchNorm1d(num_classes, momentum=head_momentum, affine=head == "batchnorm")
        # The paper's head: one learnable scale of all class scores (its +1 parameter).
        self.head_scale = nn.Parameter(torch.ones(())) if head == "paper" else None

    @property
    def input_gaussians(self) -> int:
        return self.layout.input_gaussians

    def check_input(self, m: Tensor) -> None:
        expected = (1, self.input_gaussians, gm.n_features(self.dims))
        if m.dim() != 4 or tuple(m.shape[1:]) != expected:
            raise GmbenchError(
                f"gmcn with layout '{self.layout}' expects input mixtures [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] ({self.dims}D), got {list(m.shape)}; make the layout's first N match the "
                "input fitting's n_components"
            )

    def features(self, m: Tensor, trace: list[BlockTrace] | None = None) -> Tensor:
        """``[B, num_classes]`` integrals of the last block's output channels (before the head)."""
        self.check_input(m)
        # Per-sample rescale of the input (Section 5: "normalized using the same procedure as for pooling").
        x, _ = gm.normalize_scale(m)
        for block in self.blocks:
            x = block(x, trace)
        return gm.integrate(x)

    def forward(self, m: Tensor) -> Tensor:
        scores = self.head(self.features(m))
        if self.head_scale is not None:
            scores = scores * self.head_scale
        return torch.log_softmax(scores, dim=-1)

    def trace(self, m: Tensor) -> list[BlockTrace]:
        """Run the network on ``m`` and return every block's intermediate mixtures."""
        trace: list[BlockTrace] = []
        self.features(m, trace)
        return trace

    def kernel_parameter_count(self) -> int:
        return sum(p.numel() for block in self.blocks for p in block.convolution.parameters())

    def kernel_count(self) -> int:
        return sum(b.convolution.in_channels * b.convolution.out_channels for b in self.blocks)

    def regularization_loss(self, learning_rate: float | None = None) -> Tensor:
        """Eq. 8 over all kernel Gaussians times ``weight_decay`` times ``learning_rate``
        (Section 5: "weight decay scaled by 0.1 of the learning rate"; ``None``: unscaled by it)."""
        penalty = sum(block.convolution.weight_decay() for block in self.blocks)
        scale = self.weight_decay * (1.0 if learning_rate is None else learning_rate)
        return penalty * scale


@hookimpl
def gmbench_model():
    return GMCN
