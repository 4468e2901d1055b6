"""The fitted-mixture cache: round trip, keys, verification, corruption, and `gmbench fit`."""

import pytest
import torch

from gmbench import cache, plugins
from gmbench.cli import main
from gmbench.io import load_torch, save_torch


@pytest.fixture
def split():
    return plugins.create("dataset", "shapes3d", samples_per_class=2, test_samples_per_class=1, n_points=200).load("test")


def test_round_trip_fits_once_and_reuses(split, tmp_path, monkeypatch):
    first = cache.fit_cached(split, "kmeans", 8, {"iterations": 5}, cache_dir=tmp_path, progress=False)
    assert first.shape == (10, 1, 8, 13) and first.dtype == torch.float32
    expected = plugins.create("input_fitting", "kmeans", iterations=5).fit(split.points, 8)
    torch.testing.assert_close(first, expected)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("shapes3d-test-kmeans-n8-")
    calls = []
    monkeypatch.setattr(cache, "fit_split", lambda *a, **k: calls.append(1))
    again = cache.fit_cached(split, "kmeans", 8, {"iterations": 5}, cache_dir=tmp_path, progress=False)
    assert torch.equal(again, first) and not calls


def test_key_separates_method_components_params_and_data(split, tmp_path):
    base = cache.cache_path(split, "kmeans", 8, {"iterations": 5}, tmp_path)
    assert cache.cache_path(split, "kmeans", 8, {"iterations": 5}, tmp_path) == base
    assert cache.cache_path(split, "kmeans", 8, {"iterations": 5, "device": "cuda"}, tmp_path) == base
    others = [
        cache.cache_path(split, "kmeans_em", 8, {"iterations": 5}, tmp_path),
        cache.cache_path(split, "kmeans", 16, {"iterations": 5}, tmp_path),
        cache.cache_path(split, "kmeans", 8, {"iterations": 6}, tmp_path),
        cache.cache_path(split.subset(slice(0, 5)), "kmeans", 8, {"iterations": 5}, tmp_path),
    ]
    assert len({base, *others}) == 5
    assert "gmbench" in base.name and base.parent == tmp_path


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("damage", ["garbage", "nan", "shape", "meta"])
def test_corrupt_cache_file_is_detected_and_refitted(split, tmp_path, damage):
    good = cache.fit_cached(split, "kmeans", 4, None, cache_dir=tmp_path, progress=False)
    path = cache.cache_path(split, "kmeans", 4, None, tmp_path)
    payload = load_torch(path)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "nan":
        payload["mixtures"][0, 0, 0, 1] = float("nan")
        save_torch(path, payload)
    elif damage == "shape":
        payload["mixtures"] = payload["mixtures"][:3]
        save_torch(path, payload)
    else:
        payload["meta"]["data_sha256"] = "0" * 64
        save_torch(path, payload)
    with pytest.warns(cache.CacheWarning, match="unusable"):
        refitted = cache.fit_cached(split, "kmeans", 4, None, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(refitted, good)
    cache.verify(load_torch(path), cache._metadata(split, "kmeans", 4, None, cache.split_fingerprint(split)),
                 tuple(good.shape))  # the file was repaired


def test_writes_are_atomic(split, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        cache.fit_cached(split, "kmeans", 4, None, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_weighted_2d_split_through_the_cache(tmp_path):
    digits = plugins.create("dataset", "digits", samples_per_class=2).load("test")
    m = cache.fit_cached(digits, "kmeans_em", 6, {"reg_covar": 0.1}, cache_dir=tmp_path, progress=False)
    assert m.shape == (20, 1, 6, 7) and bool(torch.isfinite(m).all())


def test_fit_command_prefits_and_reports(tmp_path, capsys):
    args = ["fit", "shapes3d", "--method", "kmeans", "-n", "4", "--split", "test", "--cache-dir", str(tmp_path),
            "--dataset-param", "test_samples_per_class=1", "--dataset-param", "n_points=64",
            "--param", "iterations=3", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "shapes3d/test: 10 samples -> (10, 1, 4, 13)" in out and "fitted" in out
    assert main(args) == 0
    assert "(cached)" in capsys.readouterr().out
    assert len(list(tmp_path.glob("shapes3d-test-kmeans-n4-*.pt"))) == 1


def test_fit_command_figure(tmp_path, capsys):
    figure = tmp_path / "fit.png"
    args = ["fit", "digits", "-n", "4", "--split", "test", "--cache-dir", str(tmp_path), "--param", "reg_covar=0.1",
            "--dataset-param", "samples_per_class=1", "--figure", str(figure), "--no-progress"]
    assert main(args) == 0
    assert figure.stat().st_size > 1000


def test_fit_command_user_errors(tmp_path, capsys):
    assert main(["fit", "shapes3d", "-n", "4", "--param", "bogus=1", "--cache-dir", str(tmp_path)]) == 2
    assert "has no parameter 'bogus'" in capsys.readouterr().err
    assert main(["fit", "shapes3d", "-n", "0"]) == 2
    assert main(["fit", "shapes3d", "-n", "4", "--param", "iterations"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
