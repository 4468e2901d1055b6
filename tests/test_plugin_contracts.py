"""Plugin contracts: hooks, their protocols, the built-ins satisfying them, tracing, documentation."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from gmbench import hookspecs, plugin_contracts, plugins

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BUILT_IN = [(info.kind, info.name) for info in plugins.describe_all() if info.origin.endswith("(built-in)")]


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield plugins
    plugins.reset()


def test_kinds_are_the_hooks_of_hookspecs_in_order():
    hooks = [name for name in vars(hookspecs) if name.startswith("gmbench_")]
    assert plugins.KINDS == hookspecs.KINDS == tuple(name.removeprefix("gmbench_") for name in hooks)
    assert set(hookspecs.PROTOCOLS) == set(plugins.KINDS)


def test_every_hook_names_its_protocol_in_its_return_annotation():
    for kind, hook in hookspecs.HOOKS.items():
        protocol = hookspecs.PROTOCOLS[kind]
        assert getattr(protocol, "_is_protocol", False), kind
        assert hook.__annotations__["return"] == f"type[{protocol.__name__}] | list[type[{protocol.__name__}]]"
        assert protocol.__doc__ and hook.__doc__


@pytest.mark.parametrize("kind, name", BUILT_IN, ids=[f"{kind}-{name}" for kind, name in BUILT_IN])
def test_every_built_in_plugin_satisfies_its_protocol(kind, name):
    assert plugin_contracts.problems(kind, plugins.get(kind, name).cls) == []


class _Reduction:
    name = "broken"

    def __init__(self, strength: float = "strong"):  # a default that does not fit its annotation
        pass

    def reduce(self, m):  # n_components missing
        return m


class _NotAModule:
    name = "not_a_module"

    def forward(self, x):
        return x


class _Dataset:
    name = "rootless"

    def __init__(self, seed: int = 0):
        pass

    def load(self, split):
        return None

    def check(self, strict):  # gmbench calls check() without arguments
        pass


class _Backend:
    name = 7

    def evaluate(self, m, points):
        return m

    def convolve(self, data, kernels):
        return data

    @classmethod
    def unavailable_reason(cls):
        return None


def test_a_plugin_breaking_its_contract_is_reported():
    found = plugin_contracts.problems("reduction", _Reduction)
    assert any(problem.startswith("reduce cannot be called as reduce(m, n_components)") for problem in found)
    assert "default of strength: float = 'strong' does not fit its annotation" in found
    assert "a model must be a torch.nn.Module subclass" in plugin_contracts.problems("model", _NotAModule)
    assert "__init__ must accept 'num_classes' (the framework passes it)" in plugin_contracts.problems("model", _NotAModule)
    dataset = plugin_contracts.problems("dataset", _Dataset)
    assert "__init__ must accept 'data_root' (the framework passes it)" in dataset
    assert any(problem.startswith("check cannot be called as check()") for problem in dataset)
    backend = plugin_contracts.problems("backend", _Backend)
    assert "class attribute 'name' must be a string" in backend
    assert "missing method evaluate_at_centroids(m)" in backend


def test_a_point_model_is_one_with_in_features():
    # Built-ins only: other tests register their own model plugins in the same process.
    point_models = {
        info.name
        for info in plugins.registry("model").values()
        if "(built-in)" in info.origin and "in_features" in {p.name for p in info.parameters}
    }
    assert point_models == {"pointnet", "pointnet2"}
    assert issubclass(plugins.get("model", "gmcn").cls, torch.nn.Module)


def test_tracing_prints_a_line_per_hook_call(fresh_plugins, monkeypatch, capsys):
    monkeypatch.setenv("GMBENCH_TRACE_PLUGINS", "1")
    implementations = plugins.get_plugin_manager().hook.gmbench_reduction.get_hookimpls()
    capsys.readouterr()
    plugins.available("reduction")
    calls = [line.strip() for line in capsys.readouterr().err.splitlines() if line.strip().startswith("gmbench_reduction")]
    assert calls == ["gmbench_reduction [hook]"] * len(implementations)
    plugins.available("reduction")  # answered from the registry: no new hook call
    assert "gmbench_reduction" not in capsys.readouterr().err


def test_without_tracing_hook_calls_are_silent(fresh_plugins, monkeypatch, capsys):
    monkeypatch.delenv("GMBENCH_TRACE_PLUGINS", raising=False)
    plugins.available("reduction")
    assert "gmbench_reduction" not in capsys.readouterr().err


def test_every_hook_and_protocol_is_documented_in_docs_plugins_md():
    text = DOCS.read_text()
    for kind, hook in hookspecs.HOOKS.items():
        row = re.search(rf"^\| `{kind}` +\| `{hook.__name__}` +\|", text, re.MULTILINE)
        assert row, f"docs/plugins.md has no table row for {kind}"
        assert hookspecs.PROTOCOLS[kind].__name__ in text, kind
    for convention in ("in_features", "<kind>_params", "regularization_loss(learning_rate=", "data_root", "seed"):
        assert convention in text, convention


def test_the_example_third_party_plugin_satisfies_its_protocol():
    # Loaded from its file under another name: the example must not look installed to
    # tests/test_third_party_plugin.py, which installs it for real.
    source = Path(__file__).resolve().parents[1] / "examples" / "gmbench-runnalls" / "src" / "gmbench_runnalls" / "plugin.py"
    spec = importlib.util.spec_from_file_location("runnalls_example_plugin", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert plugin_contracts.problems("reduction", module.RunnallsReduction) == []
