"""The example third-party package examples/gmbench-runnalls, installed for real.

The package is built and installed with pip (no network: --no-deps
--no-build-isolation --no-index) into a temporary target folder, from a copy of
its source so the repository stays clean; subprocesses put that folder on
PYTHONPATH, so gmbench discovers the plugin through its ``gmbench`` entry point
exactly as in a user's environment.  Nothing in the test venv changes.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gmbench import mixture as gm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gmbench-runnalls"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site_dir, env)``: the example installed into a temporary site folder."""
    root = tmp_path_factory.mktemp("runnalls")
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("GMBENCH_DISABLE_ENTRYPOINTS", None)
    env["OMP_NUM_THREADS"] = "1"
    return site, env


def run_python(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=True)


@pytest.mark.slow
def test_gmbench_plugins_lists_the_installed_plugin(installed):
    _, env = installed
    result = subprocess.run(
        [sys.executable, "-m", "gmbench", "plugins", "--kind", "reduction", "--json"],
        env=env, capture_output=True, text=True, check=True,
    )
    listing = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert "runnalls" in listing
    assert listing["runnalls"]["origin"] == "gmbench-runnalls 0.1.0"
    assert listing["runnalls"]["class"] == "gmbench_runnalls.plugin.RunnallsReduction"
    assert {"treehem", "mem"} <= set(listing)


@pytest.mark.slow
def test_relu_fitting_layer_uses_the_installed_plugin(installed):
    _, env = installed
    result = run_python(
        """
        import json, torch
        from gmbench import mixture as gm
        from gmbench.layers import ReLUFitting
        g = torch.Generator().manual_seed(0)
        m = gm.pack(torch.randn(2, 3, 30, generator=g, dtype=torch.float64),
                    torch.randn(2, 3, 30, 2, generator=g, dtype=torch.float64) * 2,
                    gm.covariance_from_factor(torch.randn(2, 3, 30, 2, 2, generator=g, dtype=torch.float64)))
        layer = ReLUFitting("dense", "runnalls", n_out=5)
        reduced, dense = layer(m, return_dense=True)
        print(json.dumps({"cls": type(layer.reduction).__module__, "shape": list(reduced.shape),
                          "mass_error": (gm.integrate(reduced) - gm.integrate(dense)).abs().max().item()}))
        """,
        env,
    )
    payload = json.loads(result.stdout)
    assert payload["cls"] == "gmbench_runnalls.plugin"
    assert payload["shape"] == [2, 3, 5, 7]
    assert payload["mass_error"] < 1e-9


@pytest.mark.slow
def test_without_the_package_the_plugin_is_unknown():
    if importlib.util.find_spec("gmbench_runnalls") is not None:
        pytest.skip("gmbench-runnalls is installed in this environment itself")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "gmbench", "plugins", "--kind", "reduction", "--json"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert "runnalls" not in {entry["name"] for entry in json.loads(result.stdout)}


# -- the algorithm itself, imported from the example's source -----------------

def load_example_module():
    spec = importlib.util.spec_from_file_location(
        "gmbench_runnalls_plugin_under_test", EXAMPLE / "src" / "gmbench_runnalls" / "plugin.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_mixture(n, dims, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(2, 2, n, generator=g, dtype=torch.float64) + 0.1
    p = torch.randn(2, 2, n, dims, generator=g, dtype=torch.float64) * 2
    f = torch.randn(2, 2, n, dims, dims, generator=g, dtype=torch.float64) * 0.4 + 0.6 * torch.eye(dims, dtype=torch.float64)
    return gm.pack(w, p, gm.covariance_from_factor(f, 0.05))


@pytest.mark.parametrize("dims", [2, 3])
def test_runnalls_preserves_mass_and_mean(dims):
    module = load_example_module()
    m = random_mixture(25, dims, seed=dims)
    out = module.RunnallsReduction().reduce(m, 6)
    assert out.shape == (2, 2, 6, gm.n_features(dims))
    torch.testing.assert_close(gm.integrate(out), gm.integrate(m))
    mean = lambda x: (gm.weights(x).unsqueeze(-1) * gm.positions(x)).sum(-2)  # noqa: E731
    torch.testing.assert_close(mean(out), mean(m))


def test_runnalls_merges_the_cheapest_pair_first():
    module = load_example_module()
    # Two nearly identical Gaussians and one far away: 3 -> 2 merges the twins.
    m = gm.pack(
        torch.tensor([[[1.0, 1.0, 1.0]]], dtype=torch.float64),
        torch.tensor([[[[0.0, 0.0], [0.1, 0.0], [9.0, 9.0]]]], dtype=torch.float64),
        torch.eye(2, dtype=torch.float64).expand(1, 1, 3, 2, 2),
    )
    out = module.RunnallsReduction().reduce(m, 2)
    positions = sorted(gm.positions(out)[0, 0].tolist())
    assert positions[0] == pytest.approx([0.05, 0.0])
    assert positions[1] == pytest.approx([9.0, 9.0])
    # The merged covariance is the moment match: I + spread of the two means.
    merged = gm.covariances(out)[0, 0][gm.weights(out)[0, 0].argmax()]
    torch.testing.assert_close(merged, torch.tensor([[1.0025, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_runnalls_is_scale_equivariant():
    module = load_example_module()
    m = random_mixture(12, 3, seed=6)
    factor = torch.tensor(4.0, dtype=torch.float64)
    out = module.RunnallsReduction().reduce(gm.scale(m, factor), 4)
    torch.testing.assert_close(out, gm.scale(module.RunnallsReduction().reduce(m, 4), factor))


def test_runnalls_is_differentiable():
    module = load_example_module()
    m = random_mixture(6, 2, seed=5)[:1, :1].requires_grad_(True)
    reduction = module.RunnallsReduction()
    assert torch.autograd.gradcheck(lambda x: reduction.reduce(x, 3), (m,), eps=1e-6, atol=1e-5)


SUITE = """\
name: runnalls-e2e
cell:
  dataset: digits
  model: gmcn
  input: gm
  input_fitting: kmeans
  n_gaussians: 8
  train_samples: 40
  test_samples: 20
  training: {epochs: 1, batch_size: 10}
matrix:
  method:
    - {label: Runnalls, model_params: {layout: "1/{n_gaussians}->4/4->{num_classes}", reduction: runnalls}}
"""


@pytest.mark.slow
def test_a_suite_cell_trains_a_gmcn_with_the_installed_plugin(installed, tmp_path):
    _, env = installed
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    env = dict(env, GMBENCH_CACHE=str(tmp_path / "cache"))
    subprocess.run(
        [sys.executable, "-m", "gmbench", "run", str(suite), "--out", str(tmp_path / "run"), "--no-progress", "--no-report"],
        env=env, capture_output=True, text=True, check=True,
    )
    (metrics_file,) = (tmp_path / "run" / "cells").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["reduction"] == "runnalls"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
