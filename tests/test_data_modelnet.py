"""ModelNet loaders on tiny layouts the tests create: Princeton folder, zip, PointNet++ resampled."""

import zipfile

import numpy as np
import pytest
import torch

from gmbench import plugins
from gmbench.errors import DataError

TETRA = "OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"
# ModelNet's defect: keyword and counts on one line.
CUBE = ("OFF8 6 0\n" + "\n".join(f"{x} {y} {z}" for x in (0, 2) for y in (0, 2) for z in (0, 2))
        + "\n4 0 1 3 2\n4 4 6 7 5\n4 0 4 5 1\n4 2 3 7 6\n4 0 2 6 4\n4 1 5 7 3\n")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "cache"))


def make_princeton(root, classes=10):
    folder = root / f"ModelNet{classes}"
    for cls, text in (("bed", CUBE), ("chair", TETRA)):
        for split, numbers in (("train", (1, 2, 3)), ("test", (4,))):
            (folder / cls / split).mkdir(parents=True, exist_ok=True)
            for number in numbers:
                (folder / cls / split / f"{cls}_{number:04d}.off").write_text(text)
    return folder


def test_princeton_folder_layout(tmp_path):
    make_princeton(tmp_path)
    split = plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=256).load("train")
    assert split.points.shape == (6, 256, 3) and split.weights is None
    assert split.class_names == ["bed", "chair"]
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.names[0] == "bed_0001" and split.dataset == "modelnet10" and split.split == "train"
    # Normalised into the unit sphere around the centroid.
    torch.testing.assert_close(split.points.norm(dim=-1).amax(-1), torch.ones(6))
    torch.testing.assert_close(split.points.mean(1), torch.zeros(6, 3), atol=1e-5, rtol=0)
    # Cube samples lie on the cube's faces: one coordinate at its extreme.
    cube = split.points[0]
    at_min = (cube - cube.amin(0)).abs() < 1e-4
    at_max = (cube - cube.amax(0)).abs() < 1e-4
    assert bool((at_min | at_max).any(-1).all())


def test_sampling_is_seeded_per_file(tmp_path):
    make_princeton(tmp_path)
    load = lambda seed, **kw: plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=64,
                                             seed=seed, **kw).load("train")
    a, b, c = load(0), load(0), load(1)
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    # A sample's points do not depend on which other samples are loaded.
    limited = load(0, samples_per_class=1)
    assert limited.names == ["bed_0001", "chair_0001"]
    assert torch.equal(limited.points[1], a.points[3])


def test_zip_archive_gives_the_same_clouds_as_the_folder(tmp_path):
    folder = make_princeton(tmp_path / "unpacked")
    archive_root = tmp_path / "zipped"
    archive_root.mkdir()
    with zipfile.ZipFile(archive_root / "ModelNet10.zip", "w") as archive:
        for path in folder.rglob("*.off"):
            archive.write(path, path.relative_to(folder.parent).as_posix())
        archive.writestr("__MACOSX/ModelNet10/bed/train/._bed_0001.off", "junk")
    from_folder = plugins.create("dataset", "modelnet10", data_root=str(tmp_path / "unpacked"), n_points=32).load("test")
    from_zip = plugins.create("dataset", "modelnet10", data_root=str(archive_root), n_points=32).load("test")
    assert from_zip.names == from_folder.names == ["bed_0004", "chair_0004"]
    assert torch.equal(from_zip.points, from_folder.points)


def test_pointnet2_resampled_layout(tmp_path):
    folder = tmp_path / "modelnet40_normal_resampled"
    rng = np.random.default_rng(0)
    names = {"train": ["airplane_0001", "bathtub_0001", "bathtub_0002"], "test": ["airplane_0002"]}
    for split, listed in names.items():
        (folder).mkdir(exist_ok=True)
        (folder / f"modelnet40_{split}.txt").write_text("\n".join(listed) + "\n")
        for name in listed:
            (folder / name.rsplit("_", 1)[0]).mkdir(exist_ok=True)
            rows = rng.normal(size=(50, 6))
            np.savetxt(folder / name.rsplit("_", 1)[0] / f"{name}.txt", rows, delimiter=",", fmt="%.6f")
    dataset = plugins.create("dataset", "modelnet40", data_root=str(tmp_path), n_points=20, normalize=False)
    train = dataset.load("train")
    assert train.points.shape == (3, 20, 3) and train.class_names == ["airplane", "bathtub"]
    assert train.labels.tolist() == [0, 1, 1]
    expected = np.loadtxt(folder / "bathtub" / "bathtub_0002.txt", delimiter=",")[:20, :3]
    np.testing.assert_allclose(train.points[2].numpy(), expected, rtol=1e-6)
    assert dataset.load("test").labels.tolist() == [0]
    with pytest.raises(DataError, match="need 60 rows"):
        plugins.create("dataset", "modelnet40", data_root=str(tmp_path), n_points=60).load("train")


def test_missing_data_explains_the_expected_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("GMBENCH_DATA", raising=False)
    with pytest.raises(DataError, match=r"no data root is set.*GMBENCH_DATA.*ModelNet10/<class>"):
        plugins.create("dataset", "modelnet10").load("train")
    with pytest.raises(DataError, match=r"no ModelNet10 files under .*modelnet10_train.txt"):
        plugins.create("dataset", "modelnet10", data_root=str(tmp_path)).load("train")
    monkeypatch.setenv("GMBENCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="is not a folder"):
        plugins.create("dataset", "modelnet40").load("test")


def test_corrupt_mesh_error_names_the_file(tmp_path):
    folder = make_princeton(tmp_path)
    (folder / "chair" / "train" / "chair_0002.off").write_text("OFF\n4 4 0\n0 0 0\n1 0 0\n")
    with pytest.raises(DataError, match=r"chair_0002\.off: truncated OFF file"):
        plugins.create("dataset", "modelnet10", data_root=str(tmp_path)).load("train")


def test_data_root_from_environment(tmp_path, monkeypatch):
    make_princeton(tmp_path)
    monkeypatch.setenv("GMBENCH_DATA", str(tmp_path))
    assert len(plugins.create("dataset", "modelnet10", n_points=8).load("test")) == 2


def test_sampled_clouds_are_cached_and_invalidated_by_file_changes(tmp_path, monkeypatch):
    from gmbench.data import modelnet

    folder = make_princeton(tmp_path / "data")
    make = lambda: plugins.create("dataset", "modelnet10", data_root=str(tmp_path / "data"), n_points=16)
    first = make().load("train")
    assert len(list((tmp_path / "cache" / "points").glob("modelnet10-train-*.pt"))) == 1

    def no_parsing(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(modelnet, "read_off", no_parsing)
    second = make().load("train")
    assert torch.equal(first.points, second.points) and second.names == first.names
    assert second.class_names == first.class_names and torch.equal(first.labels, second.labels)
    monkeypatch.undo()
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "cache"))
    (folder / "bed" / "train" / "bed_0001.off").write_text(TETRA)  # a changed file
    changed = make().load("train")
    assert not torch.equal(changed.points[0], first.points[0])


def test_nan_vertex_error_names_the_mesh_file(tmp_path):
    folder = make_princeton(tmp_path)
    (folder / "bed" / "train" / "bed_0002.off").write_text(TETRA.replace("1 0 0", "nan 0 0", 1))
    with pytest.raises(DataError, match=r"bed[/\\]train[/\\]bed_0002\.off: vertex 1 .*NaN or infinite"):
        plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=16).load("train")


def test_zero_area_mesh_error_names_the_file_in_the_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "ModelNet10.zip", "w") as archive:
        archive.writestr("ModelNet10/chair/test/chair_0001.off", TETRA)
        archive.writestr("ModelNet10/chair/test/chair_0002.off", TETRA.replace("1 0 0", "0 0 0").replace("0 1 0", "0 0 0")
                         .replace("0 0 1", "0 0 0"))
    with pytest.raises(DataError, match=r"ModelNet10\.zip:ModelNet10/chair/test/chair_0002\.off: mesh has zero surface area"):
        plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=16).load("test")


def test_empty_class_folder_is_an_error_naming_the_folder(tmp_path):
    folder = make_princeton(tmp_path)
    for split in ("train", "test"):
        (folder / "lamp" / split).mkdir(parents=True)
    dataset = plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=16)
    with pytest.raises(DataError, match=r"ModelNet10[/\\]lamp: class folder has no meshes .*remove the folder"):
        dataset.check()  # before any cell runs
    with pytest.raises(DataError, match=r"ModelNet10[/\\]lamp: class folder has no meshes"):
        dataset.load("train")


def test_a_class_with_meshes_in_one_split_only_is_still_a_class(tmp_path):
    folder = make_princeton(tmp_path)
    (folder / "lamp" / "train").mkdir(parents=True)
    (folder / "lamp" / "train" / "lamp_0001.off").write_text(TETRA)
    test = plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=16).load("test")
    assert test.class_names == ["bed", "chair", "lamp"] and test.labels.tolist() == [0, 1]


def test_removing_an_empty_class_folder_invalidates_the_point_cache(tmp_path):
    # A folder without files changes the classes, so it is part of the cache key.
    folder = make_princeton(tmp_path / "data")
    make = lambda: plugins.create("dataset", "modelnet10", data_root=str(tmp_path / "data"), n_points=16)
    make().load("train")
    (folder / "lamp" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder has no meshes"):
        make().load("train")


def test_resampled_cloud_with_nan_row_names_the_file_and_row(tmp_path):
    folder = tmp_path / "modelnet40_normal_resampled"
    (folder / "airplane").mkdir(parents=True)
    (folder / "modelnet40_train.txt").write_text("airplane_0001\n")
    rows = np.ones((10, 6))
    rows[3, 1] = np.nan
    np.savetxt(folder / "airplane" / "airplane_0001.txt", rows, delimiter=",", fmt="%.6f")
    with pytest.raises(DataError, match=r"airplane_0001\.txt: row 4 has a NaN"):
        plugins.create("dataset", "modelnet40", data_root=str(tmp_path), n_points=10).load("train")


def test_resampled_list_with_a_class_missing_from_shape_names_is_an_error(tmp_path):
    folder = tmp_path / "modelnet40_normal_resampled"
    (folder / "sofa").mkdir(parents=True)
    (folder / "modelnet40_train.txt").write_text("sofa_0001\n")
    (folder / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\n")
    np.savetxt(folder / "sofa" / "sofa_0001.txt", np.ones((10, 6)), delimiter=",")
    with pytest.raises(DataError, match=r"modelnet40_train\.txt lists class 'sofa' which .*shape_names\.txt does not name"):
        plugins.create("dataset", "modelnet40", data_root=str(tmp_path), n_points=10).load("train")


def test_damaged_zip_member_names_the_archive_and_member(tmp_path):
    with zipfile.ZipFile(tmp_path / "ModelNet10.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ModelNet10/chair/test/chair_0001.off", CUBE * 20)
    data = bytearray((tmp_path / "ModelNet10.zip").read_bytes())
    start = data.index(b"chair_0001.off") + len("chair_0001.off")
    data[start + 10 : start + 30] = bytes(b ^ 0xFF for b in data[start + 10 : start + 30])  # inside the deflate stream
    (tmp_path / "ModelNet10.zip").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"ModelNet10\.zip:ModelNet10/chair/test/chair_0001\.off: damaged archive member "
                                        r".*download ModelNet10\.zip again"):
        plugins.create("dataset", "modelnet10", data_root=str(tmp_path), n_points=16).load("test")
