"""The active backend is a context variable (gmbench.backends) and every cell sets it (gmbench.cell_environment)."""

import contextvars
import random
import textwrap
import threading

import numpy as np
import pytest
import torch

from gmbench import backends, plugins
from gmbench.cell_environment import cell_environment
from gmbench.errors import GmbenchError, PluginError
from gmbench.run.cell import RunOptions

UNAVAILABLE_BACKEND = textwrap.dedent(
    '''
    from gmbench.backends.torch import TorchBackend
    from gmbench.plugins import hookimpl


    class NeverHereBackend(TorchBackend):
        """A backend that cannot run anywhere (test plugin)."""

        name = "never_here"

        @classmethod
        def unavailable_reason(cls):
            return "it needs hardware nobody has; use backend 'torch'"


    @hookimpl
    def gmbench_backend():
        return NeverHereBackend
    '''
)


@pytest.fixture
def never_here(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "gmbench_test_never_here.py").write_text(UNAVAILABLE_BACKEND)
    plugins.reset()
    plugins.load_modules(["gmbench_test_never_here"])
    yield "never_here"
    plugins.reset()


def test_the_default_is_the_torch_backend_with_its_defaults():
    assert backends.active().name == "torch" and backends.active().cutoff is None


def test_use_sets_the_backend_inside_the_block_only():
    before = backends.active()
    with backends.use("torch", cutoff=1e-5) as outer:
        assert backends.active() is outer and outer.cutoff == 1e-5
        with backends.use("torch", tile_elements=64) as inner:
            assert backends.active() is inner
        assert backends.active() is outer
    assert backends.active() is before


def test_use_without_with_changes_nothing():
    before = backends.active()
    chosen = backends.use("torch", cutoff=1e-3)
    assert backends.active() is before and chosen.backend.cutoff == 1e-3


def test_use_is_restored_when_the_block_raises():
    before = backends.active()
    with pytest.raises(RuntimeError, match="inside"):
        with backends.use("torch", cutoff=1e-5):
            raise RuntimeError("inside")
    assert backends.active() is before


def test_another_thread_does_not_see_this_contexts_backend():
    seen = {}
    with backends.use("torch", cutoff=1e-5):
        thread = threading.Thread(target=lambda: seen.setdefault("cutoff", backends.active().cutoff))
        thread.start()
        thread.join()
        assert backends.active().cutoff == 1e-5
    assert seen == {"cutoff": None}


def test_concurrent_threads_each_keep_their_own_backend():
    barrier = threading.Barrier(2)
    seen = {}

    def cell(cutoff):
        with backends.use("torch", cutoff=cutoff):
            barrier.wait()  # both blocks are entered before either looks
            seen[cutoff] = backends.active().cutoff
            barrier.wait()

    threads = [threading.Thread(target=cell, args=(c,)) for c in (1e-3, 1e-6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {1e-3: 1e-3, 1e-6: 1e-6}


def test_set_active_lasts_in_its_context_only():
    def script():
        backends.set_active("torch", cutoff=1e-4)
        return backends.active().cutoff

    assert contextvars.copy_context().run(script) == 1e-4
    assert backends.active().cutoff is None


def test_check_validates_without_switching(never_here):
    before = backends.active()
    assert backends.check("torch", cutoff=1e-5).name == "torch"
    with pytest.raises(PluginError, match="^backend 'never_here' cannot run here: it needs hardware nobody has"):
        backends.check(never_here)
    with pytest.raises(PluginError, match="cutoff must be a number or null, got 'small'"):
        backends.check("torch", cutoff="small")
    with pytest.raises(PluginError, match="unknown backend plugin 'nope'"):
        backends.check("nope")
    assert backends.active() is before


def test_gmbench_run_refuses_a_backend_that_cannot_run_here_before_starting(tmp_path, monkeypatch, capsys):
    from gmbench import cli

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "gmbench_test_run_backend.py").write_text(UNAVAILABLE_BACKEND)
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nplugins: [gmbench_test_run_backend]\nbackend: never_here\ncell: {dataset: digits, model: gmcn,"
        " model_params: {layout: '1/4->4/2->10'}, n_gaussians: 4, training: {epochs: 1}}\n"
    )
    plugins.reset()
    try:
        code = cli.main(["run", str(suite), "--dry-run", "--out", str(tmp_path / "run")])
    finally:
        plugins.reset()
    error = capsys.readouterr().err
    assert code == 2
    assert "backend 'never_here' cannot run here: it needs hardware nobody has" in error
    assert not (tmp_path / "run").exists()


def test_cell_environment_chooses_the_backend_with_its_parameters_and_restores_it():
    options = RunOptions(backend="torch", backend_params={"cutoff": 1e-5, "cpu_kernel": "gemm"})
    before = backends.active()
    with cell_environment(options):
        backend = backends.active()
        assert (backend.name, backend.cutoff, backend.cpu_kernel) == ("torch", 1e-5, "gemm")
    assert backends.active() is before


def test_cell_environment_seeds_the_generators_and_restores_their_states():
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    expected_after = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    draws = []
    for _ in range(2):
        with cell_environment(RunOptions(), seed=7):
            draws.append((torch.rand(1).item(), random.random(), float(np.random.rand())))
    assert draws[0] == draws[1]
    after = (torch.rand(1), random.random(), np.random.rand())
    assert torch.equal(after[0], expected_after[0]) and after[1:] == expected_after[1:]


def test_cell_environment_loads_the_suites_plugin_modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "gmbench_test_env_plugin.py").write_text(UNAVAILABLE_BACKEND.replace("never_here", "env_loaded"))
    plugins.reset()
    try:
        with pytest.raises(PluginError, match="backend 'env_loaded' cannot run here"):
            with cell_environment(RunOptions(plugins=("gmbench_test_env_plugin",), backend="env_loaded")):
                pass
        assert "env_loaded" in plugins.available("backend")
    finally:
        plugins.reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cell_environment_refuses_cuda_without_a_gpu():
    with pytest.raises(GmbenchError, match="device 'cuda:0' requested but CUDA is not available"):
        with cell_environment(RunOptions(device="cuda:0")):
            pass
