"""The embedded data sets: scikit-learn's digits and the procedural shapes3d."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gmbench import plugins
from gmbench.data.shapes3d import CLASSES
from gmbench.errors import DataError, PluginError


def test_all_contract_datasets_are_registered():
    assert {"digits", "shapes3d", "modelnet10", "modelnet40", "mnist", "fashion_mnist", "mnist5k",
            "mnist5k_3d"} <= set(plugins.available("dataset"))
    for name in plugins.available("dataset"):
        accepted = {p.name: p for p in plugins.get("dataset", name).parameters}
        assert accepted["data_root"].default is None and accepted["seed"].default == 0


def test_digits_fixed_stratified_split():
    train = plugins.create("dataset", "digits").load("train")
    test = plugins.create("dataset", "digits", seed=5).load("test")
    assert (len(train), len(test)) == (1347, 450)
    assert set(train.names).isdisjoint(test.names)
    assert train.class_names == [str(c) for c in range(10)] and train.dims == 2
    # Stratified: every class has the same share in both splits (within one sample).
    for c in range(10):
        assert abs((train.labels == c).float().mean() - (test.labels == c).float().mean()) < 0.01
    again = plugins.create("dataset", "digits", seed=9).load("test")  # the split does not depend on seed
    assert again.names == test.names


def test_digits_points_are_pixel_centres_weighted_by_intensity():
    split = plugins.create("dataset", "digits").load("test")
    index = int(split.names[0].split("/")[1])
    image = load_digits().images[index]
    points, weights = split.points[0], split.weights[0]
    for (x, y), w in zip(points.tolist(), weights.tolist()):
        if w > 0:
            assert image[int(y - 0.5), int(x - 0.5)] / 16 == pytest.approx(w)
    assert weights.sum().item() == pytest.approx(image.sum() / 16, rel=1e-5)
    assert split.labels[0].item() == load_digits().target[index]


def test_digits_samples_per_class_and_jittered_points():
    split = plugins.create("dataset", "digits", samples_per_class=3, n_points=100, seed=1).load("train")
    assert len(split) == 30 and torch.bincount(split.labels).tolist() == [3] * 10
    assert split.points.shape == (30, 100, 2) and split.weights is None
    assert float(split.points.min()) >= 0 and float(split.points.max()) <= 8


def test_shapes3d_sizes_classes_and_determinism():
    dataset = plugins.create("dataset", "shapes3d", samples_per_class=4, test_samples_per_class=2, n_points=128)
    train, test = dataset.load("train"), dataset.load("test")
    assert train.points.shape == (40, 128, 3) and test.points.shape == (20, 128, 3)
    assert train.class_names == CLASSES and torch.bincount(train.labels).tolist() == [4] * 10
    assert torch.equal(train.points, dataset.load("train").points)
    other = plugins.create("dataset", "shapes3d", samples_per_class=4, n_points=128, seed=1).load("train")
    assert not torch.equal(train.points, other.points)
    assert not torch.equal(train.points[:2], test.points[:2])
    # Unit sphere plus the jitter.
    assert float(train.points.norm(dim=-1).max()) < 1.06


def test_shapes3d_shapes_have_their_geometry():
    dataset = plugins.create("dataset", "shapes3d", samples_per_class=3, n_points=2000, noise=0.0, rotation="none")
    split = dataset.load("train")
    sphere = split.points[split.labels == CLASSES.index("sphere")]
    radius = sphere.norm(dim=-1)
    assert float((radius.amax(-1) - radius.amin(-1)).max()) < 0.15  # up to 7 % axis jitter, faceted
    ellipsoid = split.points[split.labels == CLASSES.index("ellipsoid")].norm(dim=-1)
    assert float((ellipsoid.amax(-1) - ellipsoid.amin(-1)).min()) > 0.18  # one axis at most 0.8
    torus = split.points[split.labels == CLASSES.index("torus")]
    assert float((torus[..., :2].norm(dim=-1)).min()) > 0.2  # a hole around the axis
    box = split.points[split.labels == CLASSES.index("box")][0]
    at_extreme = ((box - box.amin(0)).abs() < 1e-4) | ((box - box.amax(0)).abs() < 1e-4)
    assert bool(at_extreme.any(-1).all())  # every point on a face of the box


def _d2_features(points, generator):
    """Osada et al.'s D2 shape distribution: histogram of distances between random point pairs."""
    index = torch.randint(0, points.shape[1], (points.shape[0], 2, 1000), generator=generator)
    gather = lambda i: torch.gather(points, 1, i[..., None].expand(-1, -1, 3))
    distances = (gather(index[:, 0]) - gather(index[:, 1])).norm(dim=-1)
    return torch.stack([torch.histc(d, 16, 0, 2.1) for d in distances]).numpy()


def test_shapes3d_is_learnable_from_global_shape_features():
    from sklearn.neighbors import KNeighborsClassifier

    dataset = plugins.create("dataset", "shapes3d", samples_per_class=30, test_samples_per_class=10, n_points=512)
    train, test = dataset.load("train"), dataset.load("test")
    generator = torch.Generator().manual_seed(0)
    classifier = KNeighborsClassifier(1).fit(_d2_features(train.points, generator), train.labels.numpy())
    accuracy = (classifier.predict(_d2_features(test.points, generator)) == test.labels.numpy()).mean()
    assert accuracy > 0.5  # chance is 0.1; docs/data.md reports the full-size numbers


def test_shapes3d_classes_chooses_the_shapes_and_their_labels():
    everything = plugins.create("dataset", "shapes3d", samples_per_class=2, test_samples_per_class=1, n_points=64)
    chosen = plugins.create("dataset", "shapes3d", samples_per_class=2, test_samples_per_class=1, n_points=64,
                            classes=["torus", "box"])
    split = chosen.load("train")
    assert split.class_names == ["torus", "box"] and split.labels.tolist() == [0, 0, 1, 1]
    full = everything.load("train")
    # A class's shapes do not depend on which other classes are generated.
    assert torch.equal(split.points[:2], full.points[full.labels == CLASSES.index("torus")])
    with pytest.raises(PluginError, match="classes"):
        plugins.create("dataset", "shapes3d", classes=["box", "box"])
    with pytest.raises(PluginError, match="classes"):
        plugins.create("dataset", "shapes3d", classes=["blob"])


def test_dataset_parameter_and_split_errors():
    with pytest.raises(PluginError, match="rotation"):
        plugins.create("dataset", "shapes3d", rotation="xyz")
    with pytest.raises(PluginError, match="test_fraction"):
        plugins.create("dataset", "digits", test_fraction=1.5)
    with pytest.raises(DataError, match="unknown split 'val'"):
        plugins.create("dataset", "shapes3d").load("val")
