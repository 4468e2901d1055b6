r"""PointNet classification network (Qi et al., CVPR 2017), plugin ``pointnet``.

Architecture of the authors' ``pointnet_cls``: input transform (T-net, D x D)
-> shared MLP 64-64 -> feature transform (T-net, 64 x 64) -> shared MLP
64-128-1024 -> max pool -> FC 512-256 (batch norm, ReLU, dropout) -> FC k.
Every shared-MLP layer is a 1x1 convolution + batch norm + ReLU.  A T-net is
shared MLP 64-128-1024 -> max pool -> FC 512-256 -> FC K*K, initialised to
the identity.

The feature transform :math:`A` is pushed towards an orthogonal matrix by
PointNet's regulariser (their Eq. 2)

.. math:: L_{reg} = w \, \| I - A A^T \|_F^2, \qquad w = 0.001,

returned (averaged over the batch of the last ``forward``) by
:meth:`PointNet.regularization_loss`; the trainer adds it to the NLL loss.

Per-point features (``in_features`` > 0, e.g. a Gaussian's weight and
covariance) are concatenated to the coordinates: the input T-net sees all
channels and transforms the coordinates only, as in the authors' code for
points with normals.  About 3.47 M parameters for 3D and k = 10.

Shapes: ``x [B, P, D + in_features]`` -> log-probabilities ``[B, num_classes]``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from gmbench.baselines.batchnorm import BatchNormMomentumSchedule
from gmbench.baselines.inputs import check_classifier_arguments, normalize_to_unit_ball
from gmbench.parameters import Dims, NumClasses
from gmbench.plugins import hookimpl


def shared_mlp(channels: list[int]) -> nn.Sequential:
    """Per-point MLP on ``[B, C, P]``: 1x1 convolution + batch norm + ReLU per layer."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv1d(c_in, c_out, 1), nn.BatchNorm1d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


def fully_connected(channels: list[int], dropout: float = 0.0) -> nn.Sequential:
    """``[B, C]`` MLP: linear + batch norm + ReLU (+ dropout) per layer."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Linear(c_in, c_out), nn.BatchNorm1d(c_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)



def prepare_input(model: nn.Module, x: Tensor) -> Tensor:
    """Shared entry of both baselines: check ``[B, P, dims + in_features]``, advance the
    batch-norm momentum schedule in training, scale coordinates into the unit ball."""
    if x.dim() != 3 or x.shape[-1] != model.dims + model.in_features:
        raise ValueError(
            f"expected input [B, P, {model.dims + model.in_features}] (dims + in_features), got {tuple(x.shape)}"
        )
    if model.training:
        model.bn_schedule.step(model, x.shape[0])
    if model.normalize:
        x = normalize_to_unit_ball(x, model.dims)
    return x

class TransformNet(nn.Module):
    """T-net: predicts a ``K x K`` matrix from a point set ``[B, C, P] -> [B, K, K]``.

    The last layer starts at zero and the identity is added, so the network
    starts as the identity transform (the authors initialise its bias to I).
    """

    def __init__(self, in_channels: int, k: int):
        super().__init__()
        self.k = k
        self.features = shared_mlp([in_channels, 64, 128, 1024])
        self.head = fully_connected([1024, 512, 256])
        self.transform = nn.Linear(256, k * k)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.transform.weight)
        nn.init.zeros_(self.transform.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).amax(dim=-1)
        matrix = self.transform(self.head(pooled)).view(-1, self.k, self.k)
        return matrix + torch.eye(self.k, dtype=x.dtype, device=x.device)


class PointNet(nn.Module):
    """PointNet classifier (Qi et al. 2017) on points or Gaussians-as-points.

    Parameters: ``in_features`` per-point features after the ``dims``
    coordinates (0: plain points; ``1 + D(D+1)/2``: the ``gm`` input);
    ``dropout`` after FC 512 and FC 256 (the authors' keep-probability 0.7);
    ``regularization_weight`` of the feature-transform orthogonality loss;
    ``normalize`` centres each input set and scales it into the unit ball;
    ``bn_momentum`` / ``bn_decay_samples``: the authors' batch-norm momentum
    schedule (halved every ``bn_decay_samples`` training samples, at least
    0.01; see :mod:`gmbench.baselines.batchnorm`).
    """

    name = "pointnet"

    def __init__(
        self,
        num_classes: NumClasses,
        dims: Dims,
        in_features: Annotated[int, "per-point features after the coordinates (set by the runner from 'input')"] = 0,
        dropout: Annotated[float, "dropout after FC 512 and FC 256 (the authors' keep probability 0.7)"] = 0.3,
        regularization_weight: Annotated[float, "weight of the feature-transform orthogonality loss"] = 0.001,
        normalize: Annotated[bool, "centre each input set and scale it into the unit ball"] = True,
        bn_momentum: Annotated[float, "initial batch-norm momentum of the authors' schedule"] = 0.5,
        bn_decay_samples: Annotated[int, "the momentum halves every this many training samples (at least 0.01)"] = 200_000,
    ):
        super().__init__()
        check_classifier_arguments(num_classes, dims, in_features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if regularization_weight < 0:
            raise ValueError(f"regularization_weight must be >= 0, got {regularization_weight}")
        self.bn_schedule = BatchNormMomentumSchedule(bn_momentum, bn_decay_samples, minimum=min(0.01, bn_momentum))
        self.dims = dims
        self.in_features = in_features
        self.normalize = normalize
        self.regularization_weight = regularization_weight
        channels = dims + in_features
        self.input_transform = TransformNet(channels, dims)
        self.point_features = shared_mlp([channels, 64, 64])
        self.feature_transform = TransformNet(64, 64)
        self.global_features = shared_mlp([64, 64, 128, 1024])
        self.classifier = nn.Sequential(fully_connected([1024, 512, 256], dropout), nn.Linear(256, num_classes))
        self._last_feature_transform: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = prepare_input(self, x)
        x = x.transpose(1, 2)  # [B, C, P]
        transform = self.input_transform(x)
        coordinates = torch.bmm(transform.transpose(1, 2), x[:, : self.dims])
        x = torch.cat([coordinates, x[:, self.dims :]], dim=1)
        x = self.point_features(x)
        transform = self.feature_transform(x)
        self._last_feature_transform = transform
        x = torch.bmm(transform.transpose(1, 2), x)
        x = self.global_features(x).amax(dim=-1)
        return torch.log_softmax(self.classifier(x), dim=-1)

    def __getstate__(self):
        # The last transform is a non-leaf tensor of the current graph; it must
        # not travel with copy.deepcopy or pickle (both refuse such tensors).
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_last_feature_transform": None}

    def regularization_loss(self) -> Tensor:
        """``w * mean_b ||I - A_b A_b^T||_F^2`` of the last forward's feature transforms."""
        transform = self._last_feature_transform
        if transform is None or self.regularization_weight == 0:
            return torch.zeros((), device=self.feature_transform.transform.weight.device)
        eye = torch.eye(transform.shape[-1], dtype=transform.dtype, device=transform.device)
        deviation = eye - transform @ transform.transpose(1, 2)
        return self.regularization_weight * deviation.pow(2).sum(dim=(1, 2)).mean()


@hookimpl
def gmbench_model():
    return PointNet
