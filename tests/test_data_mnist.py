"""IDX parsing and the MNIST / Fashion-MNIST loaders on files the tests write."""

import gzip
import struct

import numpy as np
import pytest
import torch

from gmbench import plugins
from gmbench.data.mnist import parse_idx
from gmbench.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) + \
        array.astype(np.uint8).tobytes()


def write_mnist(folder, images, labels, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.fixture
def tiny_images():
    rng = np.random.default_rng(0)
    images = np.zeros((5, 28, 28), np.uint8)
    for i in range(5):
        images[i, 5 + i : 10 + i, 8:12] = rng.integers(1, 256, size=(5, 4))
    return images, np.array([3, 1, 4, 1, 5], np.uint8)


def test_parse_idx_plain_and_gzipped():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)
    np.testing.assert_array_equal(parse_idx(gzip.compress(idx_bytes(array))), array)
    big_endian = struct.pack(">BBBB", 0, 0, 0x0C, 1) + struct.pack(">i", 2) + struct.pack(">2i", -7, 70000)
    assert parse_idx(big_endian).tolist() == [-7, 70000]


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated or corrupt"),
    (b"PK\x03\x04....", "bad magic"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
])
def test_parse_idx_rejects_bad_files(data, message):
    with pytest.raises(DataError, match=message):
        parse_idx(data, "file.idx")


@pytest.mark.parametrize("gz, layout", [(False, "MNIST/raw"), (True, "mnist")])
def test_mnist_loader_makes_pixel_weighted_point_sets(tmp_path, tiny_images, gz, layout):
    images, labels = tiny_images
    write_mnist(tmp_path / layout, images, labels, gz=gz)
    split = plugins.create("dataset", "mnist", data_root=str(tmp_path)).load("test")
    assert split.labels.tolist() == labels.tolist() and split.num_classes == 10
    assert split.points.shape == (5, 20, 2) and split.weights.shape == (5, 20)
    # Pixel (row i, column j) is the point (j + 0.5, i + 0.5) weighted by intensity / 255.
    i, j = 6, 9
    hit = (split.points[0] == torch.tensor([j + 0.5, i + 0.5])).all(-1)
    assert split.weights[0][hit].item() == pytest.approx(images[0, i, j] / 255)
    torch.testing.assert_close(split.weights.sum(-1), torch.tensor(images.reshape(5, -1).sum(-1) / 255.0).float())


def test_jittered_samples_stay_in_lit_pixels(tmp_path, tiny_images):
    images, labels = tiny_images
    write_mnist(tmp_path / "FashionMNIST", images, labels)
    split = plugins.create("dataset", "fashion_mnist", data_root=str(tmp_path), n_points=4000, seed=3).load("train")
    assert split.points.shape == (5, 4000, 2) and split.weights is None
    assert split.class_names[1] == "Trouser"
    pixels = split.points.floor().long()
    lit = torch.tensor(images)[torch.arange(5)[:, None], pixels[..., 1], pixels[..., 0]]
    assert bool((lit > 0).all())
    # Drawn proportional to intensity.
    counts = torch.zeros(28 * 28).index_add_(0, (pixels[0, :, 1] * 28 + pixels[0, :, 0]), torch.ones(4000))
    expected = torch.tensor(images[0].reshape(-1) / images[0].sum(), dtype=torch.float32) * 4000
    assert float((counts - expected).abs().max()) < 5 * float(expected.max().sqrt())
    again = plugins.create("dataset", "fashion_mnist", data_root=str(tmp_path), n_points=4000, seed=3).load("train")
    assert torch.equal(split.points, again.points)


def test_mnist_errors_name_the_files(tmp_path, tiny_images):
    images, labels = tiny_images
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found.*MNIST/"):
        plugins.create("dataset", "mnist", data_root=str(tmp_path)).load("train")
    write_mnist(tmp_path / "MNIST", images, labels[:4])
    with pytest.raises(DataError, match="do not match"):
        plugins.create("dataset", "mnist", data_root=str(tmp_path)).load("train")
    data = idx_bytes(images)
    (tmp_path / "MNIST" / "train-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX file .* truncated"):
        plugins.create("dataset", "mnist", data_root=str(tmp_path)).load("train")


def test_max_samples(tmp_path, tiny_images):
    images, labels = tiny_images
    write_mnist(tmp_path, images, labels)
    assert len(plugins.create("dataset", "mnist", data_root=str(tmp_path), max_samples=2).load("train")) == 2


def _corrupt_gzip(data: bytes) -> bytes:
    packed = gzip.compress(data)
    return packed[:12] + bytes(b ^ 0xFF for b in packed[12:30]) + packed[30:]


@pytest.mark.parametrize("damage, message", [
    (_corrupt_gzip, r"corrupt gzip file \(Error -3"),
    (lambda data: gzip.compress(data)[:-20], "corrupt gzip file .*ended before"),
    (lambda data: b"\x00\x00\x08", "bad magic number"),
    (lambda data: b"<html>404 Not Found</html>", "bad magic number"),
    (lambda data: data[:9], "truncated IDX header"),
    (lambda data: data + b"\x00" * 7, "holds .* data bytes but its header"),
    (lambda data: data[:4] + struct.pack(">3i", -5, 28, 28) + data[16:], "truncated or corrupt"),
])
def test_damaged_idx_file_error_names_the_file_and_says_to_download_it_again(tmp_path, tiny_images, damage, message):
    images, labels = tiny_images
    write_mnist(tmp_path / "MNIST", images, labels)
    bad = tmp_path / "MNIST" / "train-images-idx3-ubyte"
    bad.unlink()
    bad = bad.with_name(bad.name + ".gz")
    bad.write_bytes(damage(idx_bytes(images)))
    with pytest.raises(DataError, match=rf"train-images-idx3-ubyte\.gz: .*{message}.*download train-images-idx3-ubyte\.gz again"):
        plugins.create("dataset", "mnist", data_root=str(tmp_path)).load("train")
