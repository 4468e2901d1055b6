r"""The Gaussian convolution layer's learnable kernels and analytic convolution.

Paper Section 4 / Figure 1: every output channel is the sum over all input
channels of the input mixture convolved with its own kernel mixture, so an
input ``[B, F_i, N_i, K]`` becomes ``[B, F_o, F_i * N_i * N_k, K]`` (Eq. 3-4,
:func:`gmbench.mixture.convolve`).

Each kernel Gaussian has a weight :math:`a`, a position :math:`b` and a
covariance factor :math:`C'`; its covariance is Eq. 9,
:math:`C = C'^T C' + \epsilon I`, which is symmetric positive definite for any
:math:`C'`.  Weight decay (Eq. 8) pushes weights to 0 and covariances to the
identity: :math:`d_i = a_i^2 + \operatorname{mean}((C_i - I) \odot (C_i - I))`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gmbench import mixture as gm

# Section 5 initialisation (found by the authors' grid search).
INIT_WEIGHT_MEAN = 0.1
INIT_WEIGHT_STD = 1.0
INIT_RADIUS = 2.5
INIT_FACTOR_NOISE = 0.05
INIT_FACTOR_SCALE = 0.7


class GaussianConvolution(nn.Module):
    r"""Learnable kernels ``[F_o, F_i, N_k]`` and their analytic convolution with the data.

    Parameters: ``weights [F_o, F_i, N_k]``, ``positions [F_o, F_i, N_k, D]``,
    ``covariance_factors [F_o, F_i, N_k, D, D]`` -- ``N_k (1 + D + D^2)``
    scalars per kernel (65 for 3D and ``N_k = 5``, the paper's Table 8).

    Shapes: ``forward(m [B, F_i, N_i, 1+D+D*D]) -> [B, F_o, F_i*N_i*N_k, 1+D+D*D]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_gaussians: int = 5,
        dims: int = 2,
        covariance_epsilon: float = 1e-4,
    ):
        super().__init__()
        if dims not in gm.DIMS:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if kernel_gaussians < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("kernel_gaussians, in_channels and out_channels must be at least 1")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_gaussians = kernel_gaussians
        self.dims = dims
        self.covariance_epsilon = covariance_epsilon
        shape = (out_channels, in_channels, kernel_gaussians)
        self.weights = nn.Parameter(torch.empty(shape))
        self.positions = nn.Parameter(torch.empty(*shape, dims))
        self.covariance_factors = nn.Parameter(torch.empty(*shape, dims, dims))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper Section 5: weights ~ N(0.1, 1); the first Gaussian at the origin, the
        others at distance 2.5 (2D: along +x, +y, -x, -y, evenly spaced on the circle
        when N_k != 5; 3D: random directions); factor ``(I + 0.05 R) 0.7``, R ~ U[-1, 1]."""
        with torch.no_grad():
            self.weights.normal_(INIT_WEIGHT_MEAN, INIT_WEIGHT_STD)
            n_outer = self.kernel_gaussians - 1
            if self.dims == 2:
                angles = torch.arange(n_outer, dtype=torch.float64) * (2 * math.pi / max(n_outer, 1))
                directions = torch.stack([torch.cos(angles), torch.sin(angles)], -1).to(self.positions.dtype)
                directions = directions.expand(self.out_channels, self.in_channels, n_outer, 2)
            else:
                directions = torch.randn(self.out_channels, self.in_channels, n_outer, 3)
                directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.positions.zero_()
            self.positions[:, :, 1:] = INIT_RADIUS * directions
            eye = torch.eye(self.dims)
            noise = torch.empty_like(self.covariance_factors).uniform_(-1.0, 1.0)
            self.covariance_factors.copy_((eye + noise * INIT_FACTOR_NOISE) * INIT_FACTOR_SCALE)

    def covariances(self) -> Tensor:
        """``[F_o, F_i, N_k, D, D]`` kernel covariances, Eq. 9."""
        return gm.covariance_from_factor(self.covariance_factors, self.covariance_epsilon)

    def kernels(self) -> Tensor:
        """``[F_o, F_i, N_k, 1+D+D*D]`` kernel mixtures."""
        return gm.pack(self.weights, self.positions, self.covariances())

    def forward(self, m: Tensor) -> Tensor:
        if m.shape[1] != self.in_channels or gm.n_dims(m) != self.dims:
            raise ValueError(
                f"convolution expects [B, {self.in_channels}, N, {gm.n_features(self.dims)}] mixtures, "
                f"got {tuple(m.shape)}"
            )
        return gm.convolve(m, self.kernels())

    def weight_decay(self) -> Tensor:
        """Eq. 8 summed over all kernel Gaussians: ``sum_i a_i^2 + mean((C_i - I)^2)``."""
        eye = torch.eye(self.dims, dtype=self.weights.dtype, device=self.weights.device)
        covariance_term = ((self.covariances() - eye) ** 2).mean(dim=(-2, -1))
        return (self.weights**2 + covariance_term).sum()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_gaussians={self.kernel_gaussians}, "
            f"dims={self.dims}"
        )
