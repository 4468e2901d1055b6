"""Damaged data files end a command with one line that names the file (exit 2, no traceback)."""

import gzip

import pytest

from gmbench.cli import main
from test_data_mnist import idx_bytes, write_mnist
from test_data_modelnet import TETRA, make_princeton


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GMBENCH_DATA", raising=False)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_fit_on_a_mesh_with_a_nan_vertex(tmp_path, capsys):
    folder = make_princeton(tmp_path / "data")
    bad = folder / "chair" / "test" / "chair_0004.off"
    bad.write_text(TETRA.replace("0 0 1", "0 0 nan"))
    code = main(["fit", "modelnet10", "--data-root", str(tmp_path / "data"), "-n", "4", "--split", "test",
                 "--dataset-param", "n_points=32", "--no-progress"])
    assert code == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "NaN or infinite" in err and "re-extract" in err


def test_fit_on_a_corrupt_gzip_idx_file(tmp_path, capsys):
    import numpy as np

    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 10:14, 10:14] = 200
    write_mnist(tmp_path / "data" / "MNIST", images, np.array([1, 2, 3], np.uint8))
    bad = tmp_path / "data" / "MNIST" / "t10k-images-idx3-ubyte.gz"
    (tmp_path / "data" / "MNIST" / "t10k-images-idx3-ubyte").unlink()
    packed = gzip.compress(idx_bytes(images))
    bad.write_bytes(packed[:12] + bytes(b ^ 0xFF for b in packed[12:30]) + packed[30:])
    code = main(["fit", "mnist", "--data-root", str(tmp_path / "data"), "-n", "4", "--split", "test", "--no-progress"])
    assert code == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "corrupt gzip file" in err and "download t10k-images-idx3-ubyte.gz again" in err


def test_run_with_an_empty_class_folder_stops_before_any_cell(tmp_path, capsys):
    folder = make_princeton(tmp_path / "data")
    (folder / "lamp" / "train").mkdir(parents=True)
    suite = tmp_path / "mn.yaml"
    suite.write_text("name: mn\ncell:\n  dataset: modelnet10\n  model: pointnet\n  input: points\n  n_gaussians: 8\n")
    out = tmp_path / "run"
    code = main(["run", str(suite), "--out", str(out), "--data-root", str(tmp_path / "data"), "--no-progress"])
    assert code == 2
    err = one_line_error(capsys)
    assert str(folder / "lamp") in err and "class folder has no meshes" in err
    assert not (out / "cells").exists()  # nothing ran
