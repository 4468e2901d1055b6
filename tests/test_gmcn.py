"""GMCN model: Gaussian convolution layer, pooling normalisation, the network and its plugin."""

import math

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import GmbenchError, PluginError
from gmbench.layers import ReLUFitting
from gmbench.models.conv import GaussianConvolution
from gmbench.models.gmcn import GMCN
from gmbench.models.pooling import ScaleNormalization


def random_mixtures(batch, channels, n, dims, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(batch, channels, n, generator=g, dtype=dtype)
    positions = 2 * torch.randn(batch, channels, n, dims, generator=g, dtype=dtype)
    factor = torch.randn(batch, channels, n, dims, dims, generator=g, dtype=dtype) * 0.4
    covariances = factor @ factor.transpose(-1, -2) + 0.3 * torch.eye(dims, dtype=dtype)
    return gm.pack(weights, positions, covariances)


# ---------------------------------------------------------------- convolution layer

def test_kernels_use_eq9_covariances_from_the_learned_factors():
    layer = GaussianConvolution(2, 3, kernel_gaussians=4, dims=3, covariance_epsilon=1e-3)
    kernels = layer.kernels()
    assert kernels.shape == (3, 2, 4, 13)
    factor = layer.covariance_factors.detach()
    expected = factor.transpose(-1, -2) @ factor + 1e-3 * torch.eye(3)
    torch.testing.assert_close(gm.covariances(kernels).detach(), expected)
    torch.testing.assert_close(gm.weights(kernels).detach(), layer.weights.detach())
    assert bool((torch.linalg.eigvalsh(gm.covariances(kernels).detach()) > 0).all())


def test_convolution_matches_hand_computed_eq3_on_a_tiny_case():
    layer = GaussianConvolution(2, 2, kernel_gaussians=2, dims=2).double()
    data = random_mixtures(1, 2, 3, 2, dtype=torch.float64)
    out = layer(data)
    assert out.shape == (1, 2, 2 * 3 * 2, 7)
    kernels = layer.kernels().detach()
    for o in range(2):
        expected = []
        for i in range(2):  # output channel o sums over all input channels (Figure 1)
            for n in range(3):
                for k in range(2):
                    a, b = data[0, i, n], kernels[o, i, k]
                    cov = gm.covariances(a) + gm.covariances(b)
                    expected.append(gm.pack(gm.weights(a) * gm.weights(b), gm.positions(a) + gm.positions(b), cov))
        torch.testing.assert_close(out[0, o].detach(), torch.stack(expected))


def test_initialisation_follows_section_5_in_2d():
    layer = GaussianConvolution(32, 64, kernel_gaussians=5, dims=2)
    w = layer.weights.detach()
    # N(0.1, 1) over 10240 draws: the sample mean is within 5 standard errors.
    assert abs(w.mean().item() - 0.1) < 5 / math.sqrt(w.numel())
    assert abs(w.std().item() - 1.0) < 0.05
    positions = layer.positions.detach()
    assert torch.equal(positions[:, :, 0], torch.zeros(64, 32, 2))
    expected = torch.tensor([[2.5, 0.0], [0.0, 2.5], [-2.5, 0.0], [0.0, -2.5]])
    torch.testing.assert_close(positions[:, :, 1:], expected.expand(64, 32, 4, 2), atol=1e-6, rtol=0)
    factor = layer.covariance_factors.detach()
    deviation = factor / 0.7 - torch.eye(2)  # = 0.05 R with R ~ U[-1, 1]
    assert deviation.abs().max() <= 0.05 + 1e-6
    assert deviation.abs().max() > 0.049  # the full range is used
    assert abs(deviation.mean().item()) < 0.002


def test_initialisation_places_3d_gaussians_at_distance_2_5_in_random_directions():
    layer = GaussianConvolution(16, 16, kernel_gaussians=5, dims=3)
    outer = layer.positions.detach()[:, :, 1:]
    torch.testing.assert_close(outer.norm(dim=-1), torch.full((16, 16, 4), 2.5))
    directions = (outer / 2.5).reshape(-1, 3)
    # Uniform directions on the sphere: mean ~ 0, second moment ~ I/3.
    assert directions.mean(0).abs().max() < 0.1
    torch.testing.assert_close(directions.T @ directions / len(directions), torch.eye(3) / 3, atol=0.05, rtol=0)
    assert torch.equal(layer.positions.detach()[:, :, 0], torch.zeros(16, 16, 3))


def test_weight_decay_is_eq8_summed_over_kernel_gaussians():
    layer = GaussianConvolution(1, 2, kernel_gaussians=3, dims=2)
    eye = torch.eye(2)
    expected = 0.0
    for o in range(2):
        for k in range(3):
            factor = layer.covariance_factors[o, 0, k].detach()
            cov = factor.T @ factor + 1e-4 * eye
            expected += layer.weights[o, 0, k].item() ** 2 + ((cov - eye) ** 2).mean().item()
    assert layer.weight_decay().item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- pooling normalisation

def test_pooling_uses_batch_statistics_in_training_and_the_running_average_at_evaluation():
    pool = ScaleNormalization(3, dims=2, momentum=0.25)
    m = random_mixtures(4, 3, 6, 2)
    out = pool(m)
    # The batch-mean covariance trace of every channel becomes D.
    torch.testing.assert_close(gm.mean_covariance_trace(out).mean(0), torch.full((3,), 2.0))
    batch_trace = gm.mean_covariance_trace(m).mean(0)
    torch.testing.assert_close(pool.running_trace, 0.75 * torch.full((3,), 2.0) + 0.25 * batch_trace)
    pool.eval()
    running = pool.running_trace.clone()
    evaluated = pool(m)
    torch.testing.assert_close(pool.running_trace, running)  # evaluation does not update it
    factor = torch.sqrt(2.0 / running)
    torch.testing.assert_close(evaluated, gm.scale(m, factor.expand(4, 3)))
    torch.testing.assert_close(gm.weights(evaluated), gm.weights(m))


def test_pooling_can_use_the_running_average_in_training_as_the_authors_did():
    pool = ScaleNormalization(2, dims=3, momentum=0.5, use_running_average=True)
    m = random_mixtures(3, 2, 5, 3)
    out = pool(m)
    running = 0.5 * 3.0 + 0.5 * gm.mean_covariance_trace(m).mean(0)
    torch.testing.assert_close(out, gm.scale(m, torch.sqrt(3.0 / running).expand(3, 2)))



def test_pooling_without_momentum_averages_the_batch_means_since_its_reset():
    pool = ScaleNormalization(3, dims=2, momentum=0.25)
    batches = [random_mixtures(4, 3, 6, 2, seed=seed) for seed in range(3)]
    pool(batches[0])  # an exponential update that the reset forgets
    pool.reset_running_stats()
    torch.testing.assert_close(pool.running_trace, torch.full((3,), 2.0))
    pool.momentum = None
    for m in batches:
        pool(m)
    expected = torch.stack([gm.mean_covariance_trace(m).mean(0) for m in batches]).mean(0)
    torch.testing.assert_close(pool.running_trace, expected)
    assert "batches_tracked" not in pool.state_dict()  # checkpoints keep their keys

# ---------------------------------------------------------------- the network

TABLE_8 = [  # (layout, kernels, kernel parameters) of the paper's Table 8 (3D, N_k = 5)
    ("1/128->10", 10, 650),
    ("1/128->8/64->10", 88, 5720),
    ("1/128->8/64->16/32->10", 296, 19240),
    ("1/128->8/64->16/32->32/16->10", 968, 62920),
    ("1/128->8/64->16/32->32/16->64/8->10", 3336, 216840),
]


@pytest.mark.parametrize("layout, kernels, kernel_parameters", TABLE_8)
def test_kernel_parameter_counts_match_table_8(layout, kernels, kernel_parameters):
    model = GMCN(num_classes=10, dims=3, layout=layout, kernel_gaussians=5)
    assert model.kernel_count() == kernels
    assert model.kernel_parameter_count() == 65 * kernels == kernel_parameters
    head = sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for p in model.parameters()) == kernel_parameters + head
    assert head == 20  # batch norm over the 10 class scores


def test_block_output_is_convolution_then_relu_fitting_then_pooling():
    torch.manual_seed(1)
    model = GMCN(num_classes=3, dims=2, layout="1/4->2/3->3", reduction="treehem")
    m = random_mixtures(2, 1, 4, 2)
    x, _ = gm.normalize_scale(m)  # the per-sample input rescale
    block = model.blocks[0]
    convolved = gm.convolve_dense(x, block.convolution.kernels())
    fitted = ReLUFitting("dense", "treehem", n_out=3)(convolved)
    factor = torch.sqrt(2.0 / gm.mean_covariance_trace(fitted).mean(0))
    expected = gm.scale(fitted, factor.expand(2, 2))
    trace = model.trace(m)
    torch.testing.assert_close(trace[0].convolved, convolved)
    torch.testing.assert_close(block(x), expected)
    assert trace[0].reduced.shape == (2, 2, 3, 7)
    # The last block fits the ReLU but does not reduce: 2 channels x 3 Gaussians x 5 kernel Gaussians.
    assert trace[1].reduced.shape == (2, 3, 2 * 3 * 5, 7)
    assert trace[1].reduced is trace[1].dense


@pytest.mark.parametrize("dims, layout, n", [(2, "1/8->4/4->6/2->5", 8), (3, "1/6->3/4->5", 6)])
def test_forward_gives_log_probabilities_for_2d_and_3d(dims, layout, n):
    model = GMCN(num_classes=5, dims=dims, layout=layout)
    m = random_mixtures(3, 1, n, dims).abs()  # positive weights like fitted inputs
    out = model(m)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))
    model.eval()
    assert model(m).shape == (3, 5)


def test_input_is_normalised_per_sample_so_the_domain_scale_does_not_matter():
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/3->3").double().eval()
    m = random_mixtures(2, 1, 6, 2, dtype=torch.float64).abs()
    scaled = gm.scale(m, torch.tensor([[3.0], [0.2]], dtype=torch.float64))
    torch.testing.assert_close(model(scaled), model(m))


def test_regularization_loss_scales_eq8_by_0_1_times_the_learning_rate():
    model = GMCN(num_classes=3, dims=2, layout="1/4->2/2->3")
    penalty = sum(block.convolution.weight_decay() for block in model.blocks)
    assert model.regularization_loss(learning_rate=1e-3).item() == pytest.approx(0.1 * 1e-3 * penalty.item(), rel=1e-6)
    assert model.regularization_loss().item() == pytest.approx(0.1 * penalty.item(), rel=1e-6)


def test_layout_class_count_must_match_and_input_size_is_checked():
    with pytest.raises(PluginError, match="last number 10"):
        plugins.create("model", "gmcn", num_classes=10, dims=2, layout="1/4->2/2->3")
    model = plugins.create("model", "gmcn", num_classes=3, dims=2, layout="1/4->2/2->3")
    with pytest.raises(GmbenchError, match="n_components"):
        model(random_mixtures(2, 1, 5, 2))
    with pytest.raises(GmbenchError, match="2D"):
        model(random_mixtures(2, 1, 4, 3))


def test_model_plugin_is_registered_with_the_contract_parameters():
    info = plugins.get("model", "gmcn")
    names = [p.name for p in info.parameters]
    assert names[:9] == [
        "num_classes", "dims", "layout", "kernel_gaussians", "transfer_fitting",
        "transfer_fitting_params", "reduction", "reduction_params", "weight_decay",
    ]
    model = plugins.create("model", "gmcn", num_classes=4, dims=3, layout="1/8->4", reduction="mem",
                           reduction_params={})
    assert isinstance(model, GMCN)


def tiny_classification_batch():
    """Three classes of 2D mixtures with 6 Gaussians: a line along x, a line along y, a ring."""
    t = torch.linspace(-2.5, 2.5, 6)
    angles = torch.arange(6) * (2 * math.pi / 6)
    shapes = [
        torch.stack([t, torch.zeros(6)], -1),
        torch.stack([torch.zeros(6), t], -1),
        2.5 * torch.stack([angles.cos(), angles.sin()], -1),
    ]
    g = torch.Generator().manual_seed(0)
    samples, labels = [], []
    for label, centres in enumerate(shapes):
        for _ in range(3):
            jittered = centres + 0.15 * torch.randn(6, 2, generator=g)
            samples.append(gm.pack(torch.full((6,), 1 / 6), jittered, 0.4 * torch.eye(2).expand(6, 2, 2)))
            labels.append(label)
    return torch.stack(samples)[:, None], torch.tensor(labels)


@pytest.mark.slow  # about 5-25 s per reduction on 2 shared cores
@pytest.mark.parametrize("reduction", ["treehem", "mem"])
def test_two_layer_gmcn_overfits_a_tiny_batch_with_each_reduction(reduction):
    torch.manual_seed(0)
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/4->3", reduction=reduction)
    x, y = tiny_classification_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.nll_loss(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    # Chance level is log(3) = 1.1; both reductions reach about 0.05 in 60 steps.
    assert losses[0] > 1.0 and losses[-1] < 0.1


@pytest.mark.parametrize("reduction", ["treehem", "mem"])
def test_gradients_reach_every_kernel_through_fitting_and_reduction(reduction):
    model = GMCN(num_classes=3, dims=2, layout="1/6->4/4->3", reduction=reduction)
    x, y = tiny_classification_batch()
    torch.nn.functional.nll_loss(model(x), y).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name



def test_gmcn_resumes_bit_identically_including_pooling_statistics(tmp_path):
    from gmbench.training import TrainConfig, seed_everything, train

    x, y = tiny_classification_batch()
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False)

    def build():
        seed_everything(0)
        return GMCN(num_classes=3, dims=2, layout="1/6->4/4->3", reduction="mem")

    straight_model = build()
    straight = train(straight_model, x, y, x, y, config, run_dir=tmp_path / "straight")
    train(build(), x, y, x, y, TrainConfig(epochs=1, batch_size=4, lr=1e-2, progress=False), run_dir=tmp_path / "resumed")
    resumed_model = build()
    resumed = train(resumed_model, x, y, x, y, config, run_dir=tmp_path / "resumed")
    keys = ("train_loss", "train_accuracy", "test_accuracy", "lr")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in straight.history]
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight_model.blocks[0].pooling.running_trace, torch.full((4,), 2.0))


@pytest.mark.parametrize("layout, kernels, kernel_parameters", TABLE_8)
def test_paper_head_gives_table_8_parameter_counts(layout, kernels, kernel_parameters):
    model = GMCN(num_classes=10, dims=3, layout=layout, kernel_gaussians=5, head="paper")
    paper_params = {650: 651, 5720: 5721, 19240: 19241, 62920: 62921, 216840: 216841}[kernel_parameters]
    assert sum(p.numel() for p in model.parameters()) == paper_params


@pytest.mark.parametrize("layout, paper_params", [
    ("1/128->8/64->16/32->32/16->64/8->40", 341641),  # Table 13
    ("1/128->8/64->16/32->32/16->64/8->128/4->40", 1040521),  # Table 14
])
def test_paper_head_gives_modelnet40_parameter_counts(layout, paper_params):
    model = GMCN(num_classes=40, dims=3, layout=layout, kernel_gaussians=5, head="paper")
    assert sum(p.numel() for p in model.parameters()) == paper_params


def test_paper_head_is_batch_norm_without_affine_times_one_scale():
    torch.manual_seed(0)
    model = GMCN(num_classes=3, dims=2, layout="1/6->3", kernel_gaussians=2, reduction="mem", head="paper")
    with torch.no_grad():
        model.head_scale.fill_(2.5)
    x = random_mixtures(5, 1, 6, 2)
    features = model.features(x)
    normalised = (features - features.mean(0)) / torch.sqrt(features.var(0, unbiased=False) + model.head.eps)
    torch.testing.assert_close(model(x), torch.log_softmax(2.5 * normalised, dim=-1))


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="head"):
        GMCN(num_classes=10, dims=3, layout="1/8->10", head="linear")
