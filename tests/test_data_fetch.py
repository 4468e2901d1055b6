"""gmbench data fetch against an HTTP server on 127.0.0.1 that the tests start; nothing reaches the internet.

The server serves archives the tests build (gzipped IDX files, a small ModelNet zip)
and can drop a connection part-way, ignore Range requests, or serve other bytes than
the recorded checksums promise.  Fetched data are read back through the real plugins.
"""

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import re
import socket
import threading
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from gmbench import plugins
from gmbench.cli import main
from gmbench.data import fetch as fetching
from gmbench.data.download import RemoteFile
from gmbench.errors import DataError
from test_data_mnist import idx_bytes
from test_data_modelnet import CUBE, TETRA

IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")


class Server:
    """``http.server`` in a thread with Range support and scripted faults; records every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, list[int]] = {}  # path -> bytes to send before closing, one per request
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                drops = server.drop_after.get(self.path)
                if drops:
                    self.wfile.write(data[start:start + drops.pop(0)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def requests_for(self, path):
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    running = Server()
    running.thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()
    running.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("GMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GMBENCH_DATA", raising=False)
    monkeypatch.delenv(fetching.MIRROR_VARIABLE, raising=False)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused: what offline looks like here)."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def tiny_mnist():
    """Four gzipped IDX files: 6 train and 3 test 28x28 digits with distinct labels."""
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
              "test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    labels = {"train": np.array([0, 1, 2, 3, 4, 5], np.uint8), "test": np.array([7, 8, 9], np.uint8)}
    payload = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        payload[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images[split]), mtime=0)
        payload[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels[split]), mtime=0)
    return payload, labels


def publish(monkeypatch, server, name, payload, base=None, **source_changes):
    """Serve ``payload`` under /<name>/ and point the registry entry at it with the files' real checksums."""
    base = base or f"{server.url}/{name}"
    for file_name, data in payload.items():
        server.files[f"/{name}/{file_name}"] = data
    source = fetching.SOURCES[name]
    files = tuple(RemoteFile(f, (f"{base}/{f}",), len(payload[f]), hashlib.sha256(payload[f]).hexdigest(), "test")
                  for f in payload)
    monkeypatch.setitem(fetching.SOURCES, name, replace(source, files=files, **source_changes))
    return files


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def fetch_cli(*args):
    return main(["data", "fetch", *args, "--no-progress"])


def test_fetch_mnist_verifies_unpacks_and_loads_through_the_plugin(tmp_path, server, monkeypatch, capsys):
    payload, labels = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    root = tmp_path / "data"
    assert fetch_cli("mnist", "--root", str(root)) == 0
    out = capsys.readouterr().out
    assert f"mnist: fetched in {root / 'MNIST' / 'raw'}" in out and f"--data-root {root}" in out
    for name, data in payload.items():
        assert (root / "MNIST" / "raw" / name).read_bytes() == data
    assert not (root / "downloads").exists() and not list(root.glob("MNIST/.raw*"))
    record = json.loads((root / "gmbench-fetch.json").read_text())["mnist"]
    assert record["train-images-idx3-ubyte.gz"]["sha256"] == hashlib.sha256(payload["train-images-idx3-ubyte.gz"]).hexdigest()
    dataset = plugins.create("dataset", "mnist", data_root=str(root))
    assert dataset.load("train").labels.tolist() == labels["train"].tolist()
    assert dataset.load("test").labels.tolist() == labels["test"].tolist()

    served = len(server.requests)
    assert fetch_cli("mnist", "--root", str(root)) == 0  # complete and verified: nothing downloaded again
    assert "mnist: already present" in capsys.readouterr().out and len(server.requests) == served


def test_a_truncated_download_resumes_with_a_range_request(tmp_path, server, monkeypatch):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    name = "train-images-idx3-ubyte.gz"
    half = len(payload[name]) // 2
    part = tmp_path / "data" / "downloads" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[name][:half])  # what an interrupted earlier fetch leaves behind
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 0
    assert server.requests_for(f"/mnist/{name}") == [f"bytes={half}-"]
    assert (tmp_path / "data" / "MNIST" / "raw" / name).read_bytes() == payload[name]


def test_a_server_that_ignores_range_restarts_the_file(tmp_path, server, monkeypatch):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    server.ignore_range = True
    name = "train-images-idx3-ubyte.gz"
    part = tmp_path / "data" / "downloads" / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[name][:100])
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 0
    assert (tmp_path / "data" / "MNIST" / "raw" / name).read_bytes() == payload[name]


def test_a_dropped_connection_is_resumed_where_it_stopped(tmp_path, server, monkeypatch):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    name = "train-images-idx3-ubyte.gz"
    server.drop_after[f"/mnist/{name}"] = [1000]
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 0
    assert server.requests_for(f"/mnist/{name}") == [None, "bytes=1000-"]
    assert (tmp_path / "data" / "MNIST" / "raw" / name).read_bytes() == payload[name]


def test_a_connection_that_keeps_dropping_ends_in_one_line_and_keeps_the_part(tmp_path, server, monkeypatch, capsys):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    name = "train-images-idx3-ubyte.gz"
    server.drop_after[f"/mnist/{name}"] = [100] * 10
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 2
    err = one_line_error(capsys)
    part = tmp_path / "data" / "downloads" / f"{name}.part"
    assert "stopped 4 times" in err and str(part) in err and "run the command again to resume" in err
    assert part.read_bytes() == payload[name][:400]  # four attempts, 100 bytes each
    server.drop_after.clear()
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 0
    assert server.requests_for(f"/mnist/{name}")[-1] == "bytes=400-"


def test_a_wrong_checksum_is_one_line_with_url_expected_value_and_manual_path(tmp_path, server, monkeypatch, capsys):
    payload, _ = tiny_mnist()
    files = publish(monkeypatch, server, "mnist", payload)
    wrong = "0" * 64
    source = fetching.SOURCES["mnist"]
    monkeypatch.setitem(fetching.SOURCES, "mnist", replace(source, files=(replace(files[0], sha256=wrong), *files[1:])))
    root = tmp_path / "data"
    assert fetch_cli("mnist", "--root", str(root)) == 2
    err = one_line_error(capsys)
    name = files[0].name
    assert files[0].urls[0] in err and wrong in err and hashlib.sha256(payload[name]).hexdigest() in err
    assert str(root / "downloads" / name) in err
    assert not (root / "downloads" / name).exists() and not (root / "MNIST").exists()


def test_offline_is_one_line_with_url_expected_checksum_and_manual_path(tmp_path, server, monkeypatch, capsys):
    payload, _ = tiny_mnist()
    files = publish(monkeypatch, server, "mnist", payload, base=f"{closed_port_url()}/mnist")
    root = tmp_path / "data"
    assert fetch_cli("mnist", "--root", str(root)) == 2
    err = one_line_error(capsys)
    assert err.startswith("gmbench data: error: cannot download train-images-idx3-ubyte.gz for mnist")
    assert files[0].urls[0] in err and files[0].sha256 in err and str(root / "downloads" / files[0].name) in err


def test_a_file_downloaded_by_hand_is_verified_and_used(tmp_path, server, monkeypatch, capsys):
    payload, labels = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload, base=f"{closed_port_url()}/mnist")
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    for name, data in payload.items():
        (downloads / name).write_bytes(data)
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 0
    assert plugins.create("dataset", "mnist", data_root=str(tmp_path / "data")).load("test").labels.tolist() == [7, 8, 9]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_mirror_replaces_the_publisher(tmp_path, server, monkeypatch, how):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "fashion_mnist", payload, base=f"{closed_port_url()}/fashion")
    for name, data in payload.items():
        server.files[f"/mirror/fashion_mnist/{name}"] = data
    args = ["fashion_mnist", "--root", str(tmp_path / "data")]
    if how == "option":
        args += ["--mirror", f"{server.url}/mirror/"]
    else:
        monkeypatch.setenv(fetching.MIRROR_VARIABLE, f"{server.url}/mirror")
    assert fetch_cli(*args) == 0
    assert {p for p, _ in server.requests} == {f"/mirror/fashion_mnist/{n}" for n in payload}
    loaded = plugins.create("dataset", "fashion_mnist", data_root=str(tmp_path / "data")).load("train")
    assert loaded.labels.tolist() == [0, 1, 2, 3, 4, 5] and loaded.class_names[0] == "T-shirt/top"


def modelnet_zip(stored: bool = False) -> bytes:
    """ModelNet10.zip as Princeton lays it out: ModelNet10/<class>/{train,test}/*.off plus __MACOSX junk."""
    members = {"ModelNet10/chair/train/chair_0001.off": TETRA, "ModelNet10/chair/train/chair_0002.off": CUBE,
               "ModelNet10/chair/test/chair_0003.off": TETRA, "ModelNet10/table/train/table_0001.off": CUBE,
               "ModelNet10/table/train/table_0002.off": TETRA, "ModelNet10/table/test/table_0003.off": CUBE,
               "__MACOSX/ModelNet10/chair/train/._chair_0001.off": "\x00\x05junk",
               "ModelNet10/README.txt": "not a mesh"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def publish_modelnet(monkeypatch, server, data: bytes, meshes=None):
    server.files["/modelnet10/ModelNet10.zip"] = data
    source = fetching.SOURCES["modelnet10"]
    (remote,) = source.files
    # Princeton publishes no checksum: the registry holds none, as the real entry does.
    assert remote.sha256 is None and remote.size is None
    monkeypatch.setitem(fetching.SOURCES, "modelnet10", replace(
        source, files=(replace(remote, urls=(f"{server.url}/modelnet10/ModelNet10.zip",)),),
        meshes=meshes or {"train": 4, "test": 2}))


def test_fetch_modelnet_unpacks_the_off_tree_pins_the_checksum_and_loads(tmp_path, server, monkeypatch, capsys):
    data = modelnet_zip()
    publish_modelnet(monkeypatch, server, data)
    root = tmp_path / "data"
    assert fetch_cli("modelnet10", "--root", str(root)) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(data).hexdigest()
    assert f"pinned sha256 {digest} ({len(data)} bytes)" in out and f"modelnet10: fetched in {root / 'ModelNet10'}" in out
    meshes = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert meshes == [".gmbench-fetch.lock", "ModelNet10/chair/test/chair_0003.off", "ModelNet10/chair/train/chair_0001.off",
                      "ModelNet10/chair/train/chair_0002.off", "ModelNet10/table/test/table_0003.off",
                      "ModelNet10/table/train/table_0001.off", "ModelNet10/table/train/table_0002.off",
                      "gmbench-fetch.json"]
    record = json.loads((root / "gmbench-fetch.json").read_text())["modelnet10"]["ModelNet10.zip"]
    assert record["sha256"] == digest and record["size"] == len(data) and "pinned" in record["checksum_source"]
    train = plugins.create("dataset", "modelnet10", data_root=str(root), n_points=32, cache_points=False).load("train")
    assert train.points.shape == (4, 32, 3) and train.class_names == ["chair", "table"]
    assert train.labels.tolist() == [0, 0, 1, 1]


def test_a_changed_archive_does_not_match_its_pin_and_the_old_data_stay(tmp_path, server, monkeypatch, capsys):
    original = modelnet_zip(stored=True)
    publish_modelnet(monkeypatch, server, original)
    root = tmp_path / "data"
    assert fetch_cli("modelnet10", "--root", str(root)) == 0
    before = sorted(p for p in (root / "ModelNet10").rglob("*.off"))
    changed = original.replace(b"0 0 1\n", b"0 0 2\n")  # same size, other meshes (the CRCs no longer match either)
    assert len(changed) == len(original) and changed != original
    publish_modelnet(monkeypatch, server, changed)
    capsys.readouterr()
    assert fetch_cli("modelnet10", "--root", str(root), "--force") == 2
    err = one_line_error(capsys)
    assert f"has sha256 {hashlib.sha256(changed).hexdigest()}" in err
    assert f"the pinned (in {root / 'gmbench-fetch.json'}) sha256 is {hashlib.sha256(original).hexdigest()}" in err
    assert sorted(p for p in (root / "ModelNet10").rglob("*.off")) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".ModelNet10")]


def test_an_archive_with_the_wrong_mesh_count_is_refused_and_nothing_is_unpacked(tmp_path, server, monkeypatch, capsys):
    publish_modelnet(monkeypatch, server, modelnet_zip(), meshes={"train": 3991, "test": 908})
    root = tmp_path / "data"
    assert fetch_cli("modelnet10", "--root", str(root)) == 2
    err = one_line_error(capsys)
    assert "holds 4 train meshes, the published modelnet10 split has 3991" in err
    assert sorted(p.name for p in root.iterdir()) == [".gmbench-fetch.lock", "downloads"]
    assert not list((root / "downloads").iterdir())  # the bad archive is not kept for a later run


def test_a_damaged_archive_member_is_refused_and_nothing_is_unpacked(tmp_path, server, monkeypatch, capsys):
    data = bytearray(modelnet_zip(stored=True))
    offset = data.index(b"3 1 2 3")  # inside a stored member: its CRC-32 no longer matches
    data[offset] = ord("4")
    publish_modelnet(monkeypatch, server, bytes(data))
    root = tmp_path / "data"
    assert fetch_cli("modelnet10", "--root", str(root)) == 2
    assert "is damaged" in one_line_error(capsys)
    assert not (root / "ModelNet10").exists() and not [p for p in root.iterdir() if p.name.startswith(".ModelNet10")]


def test_an_incomplete_existing_folder_is_not_overwritten_without_force(tmp_path, server, monkeypatch, capsys):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 2
    assert "pass --force" in one_line_error(capsys)
    assert fetch_cli("mnist", "--root", str(tmp_path / "data"), "--force") == 0
    assert sorted(p.name for p in (tmp_path / "data" / "MNIST" / "raw").iterdir()) == sorted(IDX_NAMES)


def test_the_registry_records_published_checksums_or_none_never_a_guess():
    for source in fetching.SOURCES.values():
        for remote in source.files:
            assert remote.checksum_source and remote.urls
            if remote.sha256 is not None:
                assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256) and remote.size > 0
                assert "TensorFlow Datasets" in remote.checksum_source
            else:
                assert source.meshes, f"{remote.name}: without a checksum the content check is all there is"


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "modelnet10", "modelnet40"])
def test_missing_data_names_the_fetch_command(tmp_path, name):
    with pytest.raises(DataError, match=f"gmbench data fetch {name} --root"):
        plugins.create("dataset", name, data_root=str(tmp_path)).load("train")
    with pytest.raises(DataError, match=f"gmbench data fetch {name} --root"):
        plugins.create("dataset", name).check()  # no data root at all


def test_gmbench_run_on_missing_data_says_which_fetch_command_gets_it(tmp_path, capsys):
    suite = tmp_path / "mn.yaml"
    suite.write_text("name: mn\ncell:\n  dataset: modelnet10\n  model: pointnet\n  input: points\n  n_gaussians: 8\n")
    code = main(["run", str(suite), "--out", str(tmp_path / "run"), "--no-progress"])  # no data root set
    assert code == 2
    assert "gmbench data fetch modelnet10 --root" in one_line_error(capsys)


def test_a_second_fetch_into_the_same_root_is_refused_while_one_runs(tmp_path, server, monkeypatch):
    payload, _ = tiny_mnist()
    publish(monkeypatch, server, "mnist", payload)
    root = tmp_path / "data"
    root.mkdir()
    with fetching._lock(root / fetching.LOCK):  # another fetch holds the root
        with pytest.raises(DataError, match="another 'gmbench data fetch' is downloading into"):
            fetching.fetch("mnist", root, progress=False)
    assert fetching.fetch("mnist", root, progress=False).status == "fetched"


def test_a_server_sending_more_than_the_recorded_size_is_cut_off_and_refused(tmp_path, server, monkeypatch, capsys):
    payload, _ = tiny_mnist()
    files = publish(monkeypatch, server, "mnist", payload)
    name = files[0].name
    server.files[f"/mnist/{name}"] = payload[name] + bytes(1 << 20)  # 1 MiB more than recorded
    assert fetch_cli("mnist", "--root", str(tmp_path / "data")) == 2
    err = one_line_error(capsys)
    assert f"is larger than {len(payload[name])} bytes (the download stopped there) but the published sha256 is " \
           f"{files[0].sha256}" in err
    assert (tmp_path / "data" / "downloads").is_dir() and not list((tmp_path / "data" / "downloads").iterdir())
