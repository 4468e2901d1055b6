"""PointNet / PointNet++ baselines, their input variants and augmentation (paper Section 5.2, Table 1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.baselines.augment import PointCloudAugmentation
from gmbench.baselines.batchnorm import BatchNormMomentumSchedule
from gmbench.baselines.inputs import (
    gm_point_features,
    matching_point_count,
    mixture_point_features,
    normalize_to_unit_ball,
    sample_points,
)
from gmbench.baselines.pointnet import PointNet
from gmbench.baselines.pointnet2 import PointNet2
from gmbench.data.records import PointSetSplit
from gmbench.errors import DataError, PluginError

MODELS = ["pointnet", "pointnet2"]


def random_mixture(s, n, dims, seed=0):
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(s, 1, n, dims, dims, generator=generator)
    return gm.pack(
        torch.rand(s, 1, n, generator=generator),
        torch.randn(s, 1, n, dims, generator=generator),
        gm.covariance_from_factor(factor, eps=0.05),
    )


# --- inputs --------------------------------------------------------------------


@pytest.mark.parametrize(("n", "dims", "points"), [(32, 3, 106), (64, 3, 213), (128, 3, 426), (64, 2, 192), (1, 2, 3)])
def test_matching_point_count_reproduces_table_1(n, dims, points):
    assert matching_point_count(n, dims) == points


def test_matching_point_count_takes_no_more_floats_than_the_mixture():
    for n in range(1, 300):
        p = matching_point_count(n, 3)
        assert p * 3 <= n * 10 < (p + 1) * 3


def test_matching_point_count_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        matching_point_count(10, 4)
    with pytest.raises(ValueError, match="n_gaussians"):
        matching_point_count(0, 3)


def cloud_split(s=4, p=50, dims=3, weights=None):
    points = torch.randn(s, p, dims)
    return PointSetSplit(points=points, labels=torch.arange(s) % 2, class_names=["a", "b"], weights=weights)


def test_sample_points_draws_distinct_source_points_deterministically():
    split = cloud_split()
    x = sample_points(split, 20, seed=7)
    assert x.shape == (4, 20, 3)
    assert torch.equal(x, sample_points(split, 20, seed=7))
    assert not torch.equal(x, sample_points(split, 20, seed=8))
    for s in range(4):
        matches = (x[s][:, None, :] == split.points[s][None]).all(-1)
        assert (matches.sum(1) == 1).all()  # every sample is a source point
        assert len({tuple(r.tolist()) for r in x[s]}) == 20  # without replacement


def test_sample_points_repeats_points_only_when_the_cloud_is_too_small():
    split = cloud_split(p=10)
    x = sample_points(split, 25, seed=0)
    assert x.shape == (4, 25, 3)
    assert all(len({tuple(r.tolist()) for r in x[s]}) <= 10 for s in range(4))


def test_sample_points_follows_pixel_weights_and_skips_empty_pixels():
    weights = torch.zeros(1, 8)
    weights[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    split = cloud_split(s=1, p=8, dims=2, weights=weights)
    x = sample_points(split, 60000, seed=0)  # 3 inked pixels < 60000: with replacement
    which = (x[0][:, None, :] == split.points[0][None]).all(-1).float().argmax(1)
    frequency = torch.bincount(which, minlength=8).float() / 60000
    assert frequency[3:].sum() == 0
    # Monte Carlo: standard error of each frequency is below 0.0021.
    assert torch.allclose(frequency[:3], torch.tensor([1 / 6, 2 / 6, 3 / 6]), atol=0.01)


def test_sample_points_rejects_nan_coordinates_and_weightless_samples():
    split = cloud_split()
    split.points[1, 3, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        sample_points(split, 5, seed=0)
    empty = cloud_split(s=2, p=5, dims=2, weights=torch.tensor([[1.0, 0, 0, 0, 0], [0.0] * 5]))
    with pytest.raises(DataError, match="no point with positive weight"):
        sample_points(empty, 5, seed=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_mixture_point_features_are_centre_weight_and_upper_covariance(dims):
    m = random_mixture(3, 5, dims)
    features = mixture_point_features(m)
    assert features.shape == (3, 5, dims + gm_point_features(dims))
    assert torch.equal(features[..., :dims], gm.positions(m)[:, 0])
    assert torch.equal(features[..., dims], gm.weights(m)[:, 0])
    cov = gm.covariances(m)[:, 0]
    if dims == 2:
        expected = torch.stack([cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]], -1)
    else:
        expected = torch.stack(
            [cov[..., 0, 0], cov[..., 0, 1], cov[..., 0, 2], cov[..., 1, 1], cov[..., 1, 2], cov[..., 2, 2]], -1
        )
    assert torch.equal(features[..., dims + 1 :], expected)


def test_mixture_point_features_rejects_multi_channel_mixtures():
    with pytest.raises(ValueError, match=r"\[S, 1, N, K\]"):
        mixture_point_features(random_mixture(2, 4, 3).expand(2, 2, 4, 13))


def test_normalize_to_unit_ball_centres_scales_coordinates_and_keeps_features():
    x = torch.randn(3, 40, 5) * 7 + 3
    y = normalize_to_unit_ball(x, dims=3)
    assert torch.allclose(y[..., :3].mean(1), torch.zeros(3, 3), atol=1e-5)
    assert torch.allclose(y[..., :3].norm(dim=-1).amax(1), torch.ones(3))
    assert torch.equal(y[..., 3:], x[..., 3:])


# --- models --------------------------------------------------------------------


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def test_pointnet_has_the_papers_3_4_million_parameters():
    # Hand count of the authors' pointnet_cls (3D, k = 10, batch norm everywhere):
    # input T-net 803,081 + feature T-net 1,857,344 + shared MLPs 151,680 + head 660,234.
    count = parameter_count(PointNet(num_classes=10, dims=3))
    assert count == 3_472_339
    assert 3.4e6 <= count <= 3.5e6


def test_pointnet2_has_the_papers_1_4_million_parameters():
    # SA1 13,248 + SA2 67,456 + global SA 727,040 + head 660,234 (3D, k = 10).
    count = parameter_count(PointNet2(num_classes=10, dims=3))
    assert count == 1_467_978
    assert 1.4e6 <= count <= 1.5e6


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("variant", ["points", "gm"])
def test_forward_returns_log_probabilities_for_both_inputs(name, dims, variant):
    if variant == "points":
        in_features, x = 0, torch.randn(4, 3 * 16, dims)
    else:
        x = mixture_point_features(random_mixture(4, 16, dims))
        in_features = gm_point_features(dims)
    model = plugins.create("model", name, num_classes=5, dims=dims, in_features=in_features)
    out = model(x)
    assert out.shape == (4, 5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)
    model.eval()
    assert model(x).shape == (4, 5)


@pytest.mark.parametrize("name", MODELS)
def test_models_reject_inputs_with_the_wrong_feature_count(name):
    model = plugins.create("model", name, num_classes=3, dims=3, in_features=7)
    with pytest.raises(ValueError, match=r"\[B, P, 10\]"):
        model(torch.randn(2, 16, 3))


@pytest.mark.parametrize("name", MODELS)
def test_plugin_validates_parameters(name):
    with pytest.raises(PluginError, match="no parameter 'hidden'"):
        plugins.create("model", name, num_classes=3, dims=3, hidden=5)
    with pytest.raises(PluginError, match="dims must be 2 or 3"):
        plugins.create("model", name, num_classes=3, dims=4)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variant", ["points", "gm"])
def test_prediction_does_not_depend_on_point_order(name, variant):
    torch.manual_seed(1)
    if variant == "points":
        x, in_features = torch.rand(3, 60, 3), 0
    else:
        x, in_features = mixture_point_features(random_mixture(3, 60, 3)), 7
    model = plugins.create("model", name, num_classes=4, dims=3, in_features=in_features)
    model.train()
    for _ in range(2):  # non-trivial batch-norm running statistics
        model(x)
    model.eval()
    permutation = torch.stack([torch.randperm(60) for _ in range(3)])
    shuffled = torch.gather(x, 1, permutation[..., None].expand_as(x))
    with torch.no_grad():
        assert torch.allclose(model(x), model(shuffled), atol=1e-5)


def test_pointnet_transforms_start_as_the_identity_and_regulariser_is_zero_then():
    model = PointNet(num_classes=3, dims=2)
    x = torch.randn(5, 30, 2).transpose(1, 2)
    assert torch.equal(model.input_transform(x), torch.eye(2).expand(5, 2, 2))
    model(torch.randn(5, 30, 2))
    assert model.regularization_loss().item() == 0.0


def test_pointnet_regulariser_is_weighted_orthogonality_defect():
    model = PointNet(num_classes=3, dims=3)
    with torch.no_grad():
        model.feature_transform.transform.bias.copy_(torch.eye(64).flatten())  # A = 2 I
    model(torch.randn(4, 20, 3))
    # ||I - 4 I||_F^2 = 9 * 64, weight 0.001
    assert model.regularization_loss().item() == pytest.approx(0.001 * 9 * 64)
    model.regularization_loss().backward()
    assert model.feature_transform.transform.bias.grad.abs().sum() > 0


def overfit(model, x, y, steps, lr=1e-3):
    """Adam steps on one batch; returns (loss, accuracy) on it with batch statistics.

    Batch norm is measured in training mode: after so few steps its running
    averages still lag, which is not what an overfitting check is about.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.nll_loss(model(x), y)
        regularization = getattr(model, "regularization_loss", None)
        if regularization is not None:
            loss = loss + regularization()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        out = model(x)
    return F.nll_loss(out, y).item(), (out.argmax(-1) == y).float().mean().item()


@pytest.mark.parametrize(("name", "steps"), [("pointnet", 25), ("pointnet2", 40)])
def test_model_overfits_a_tiny_batch_of_random_labels(name, steps):
    torch.manual_seed(0)
    x = torch.randn(12, 64, 3)
    y = torch.arange(12) % 4  # labels carry no structure: only memorising fits them
    model = plugins.create("model", name, num_classes=4, dims=3, dropout=0.0)
    loss, accuracy = overfit(model, x, y, steps)
    assert accuracy == 1.0
    assert loss < 0.25 < math.log(4)  # chance level is log 4 = 1.39


def test_pointnet2_overfits_gaussians_as_points_in_2d():
    torch.manual_seed(0)
    x = mixture_point_features(random_mixture(10, 32, 2))
    y = torch.arange(10) % 2
    model = PointNet2(num_classes=2, dims=2, in_features=4, dropout=0.0)
    loss, accuracy = overfit(model, x, y, steps=30)
    assert accuracy == 1.0
    assert loss < 0.2


def test_trainer_trains_pointnet_and_adds_its_regulariser(tmp_path):
    training = pytest.importorskip("gmbench.training")
    torch.manual_seed(0)
    x, y = torch.randn(12, 32, 2), torch.arange(12) % 3
    model = PointNet(num_classes=3, dims=2, regularization_weight=0.5)
    config = training.TrainConfig(epochs=2, batch_size=6, progress=False)
    result = training.train(model, x, y, x, y, config, run_dir=tmp_path)
    assert result.epochs_completed == 2
    assert (tmp_path / "epochs.jsonl").read_text().count("\n") == 2
    assert model.regularization_loss().item() > 0  # the feature transform moved away from I


# --- augmentation ----------------------------------------------------------------


def test_augmentation_is_off_by_default_and_returns_the_input():
    x = torch.randn(2, 10, 3)
    augment = PointCloudAugmentation(dims=3)
    assert not augment.enabled
    assert augment(x, torch.Generator().manual_seed(0)) is x


def test_rotation_about_the_up_axis_keeps_heights_and_distances():
    x = torch.randn(4, 30, 3, dtype=torch.float64)
    augment = PointCloudAugmentation(dims=3, rotate=True, up_axis=1)
    y = augment(x, torch.Generator().manual_seed(3))
    assert torch.allclose(y[..., 1], x[..., 1])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y, x)
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(3)))


def test_jitter_is_clipped_and_scale_is_uniform_per_sample():
    x = torch.randn(3, 500, 2)
    jittered = PointCloudAugmentation(dims=2, jitter=0.01, jitter_clip=0.02)(x, torch.Generator().manual_seed(0))
    assert 0 < (jittered - x).abs().max() <= 0.02 + 1e-6
    scaled = PointCloudAugmentation(dims=2, scale=(0.8, 1.25))(x, torch.Generator().manual_seed(0))
    ratio = scaled.norm(dim=-1) / x.norm(dim=-1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    assert ((ratio >= 0.8 - 1e-5) & (ratio <= 1.25 + 1e-5)).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_gm_augmentation_rotates_and_scales_covariances_with_the_centres(dims):
    m = random_mixture(3, 6, dims).double()
    augment = PointCloudAugmentation(dims=dims, input="gm", rotate=True, scale=(0.5, 2.0))
    y = augment(mixture_point_features(m), torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    rotation = augment.rotation_matrices(3, generator, torch.float64)
    factor = 0.5 + 1.5 * torch.rand(3, generator=generator, dtype=torch.float64)
    t = (rotation * factor[:, None, None])[:, None, None]  # [S, 1, 1, D, D]
    expected = gm.pack(
        gm.weights(m),
        (t @ gm.positions(m).unsqueeze(-1)).squeeze(-1),
        t @ gm.covariances(m) @ t.transpose(-1, -2),
    )
    assert torch.allclose(y, mixture_point_features(expected), atol=1e-12)


def test_augmentation_rejects_bad_parameters():
    with pytest.raises(ValueError, match="input"):
        PointCloudAugmentation(dims=3, input="mesh")
    with pytest.raises(ValueError, match="scale"):
        PointCloudAugmentation(dims=3, scale=(2.0, 1.0))


# --- batch-norm momentum schedule ---------------------------------------------------


def test_bn_momentum_schedule_halves_every_decay_step_down_to_the_clip():
    schedule = BatchNormMomentumSchedule()
    expected = {0: 0.5, 199_999: 0.5, 200_000: 0.25, 450_000: 0.125, 10**7: 0.01}
    for samples, momentum in expected.items():
        schedule.samples_seen.fill_(samples)
        assert schedule.momentum() == momentum


@pytest.mark.parametrize("name", MODELS)
def test_training_forward_counts_samples_and_sets_every_bn_momentum(name):
    model = plugins.create("model", name, num_classes=3, dims=2, bn_decay_samples=10)
    x = torch.randn(6, 24, 2)
    model(x)
    model(x)  # 12 samples seen before the third batch: one halving
    model(x)
    assert int(model.bn_schedule.samples_seen) == 18
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert momenta == {0.25}
    model.eval()
    with torch.no_grad():
        model(x)
    assert int(model.bn_schedule.samples_seen) == 18
    assert model.state_dict()["bn_schedule.samples_seen"] == 18  # checkpointed, so resume continues


def test_bn_momentum_rejects_values_outside_the_unit_interval():
    with pytest.raises(PluginError, match="momentum"):
        plugins.create("model", "pointnet", num_classes=3, dims=3, bn_momentum=1.5)


def test_pointnet_can_be_deep_copied_after_a_training_forward():
    import copy

    model = PointNet(num_classes=3, dims=3)
    model(torch.randn(4, 20, 3))
    clone = copy.deepcopy(model)
    assert clone._last_feature_transform is None
    clone.eval()
    model.eval()
    x = torch.randn(2, 20, 3)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
