"""Plugin discovery and creation (`gmbench.plugins`): built-ins, suite modules, real entry points."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.errors import GmbenchError, PluginError

# A throw-away third-party plugin: a reduction keeping the heaviest Gaussians.
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """Throw-away gmbench plugin used by tests/test_plugins.py."""
    import torch

    from gmbench import mixture as gm
    from gmbench.plugins import hookimpl


    class KeepHeaviestReduction:
        """Keep the Gaussians with the largest |weight| (test plugin)."""

        name = "{name}"

        def __init__(self, scale: float = 1.0, keep_sign: bool = True):
            if scale <= 0:
                raise ValueError("scale must be positive")
            self.scale = scale

        def reduce(self, m, n_components):
            order = gm.weights(m).abs().argsort(dim=-1, descending=True)[..., :n_components]
            kept = torch.gather(m, -2, order[..., None].expand(*order.shape, m.shape[-1]))
            return gm.with_weights(kept, gm.weights(kept) * self.scale)


    @hookimpl
    def gmbench_reduction():
        return KeepHeaviestReduction
    '''
)


@pytest.fixture
def fresh_plugins():
    """A plugin manager rebuilt for this test and forgotten afterwards (it is process-wide)."""
    plugins.reset()
    yield plugins
    plugins.reset()


def write_plugin_module(directory, module, name):
    (directory / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=name))


def write_distribution(directory, dist, version, module):
    """A minimal installed distribution: ``*.dist-info`` with METADATA and an entry point in group gmbench."""
    info = directory / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[gmbench]\nkeep_heaviest = {module}\n")
    (info / "RECORD").write_text("")


def test_every_kind_has_a_hook_and_the_torch_backend_is_built_in():
    assert plugins.KINDS == ("backend", "transfer_fitting", "reduction", "input_fitting", "model", "dataset", "logger")
    for kind in plugins.KINDS:
        assert isinstance(plugins.registry(kind), dict)
    info = plugins.get("backend", "torch")
    assert info.origin.startswith("gmbench ") and info.origin.endswith("(built-in)")
    assert {"tile_elements", "compute_dtype"} <= {p.name for p in info.parameters}


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(PluginError) as info:
        plugins.create("optimizer", "adam")
    assert str(info.value) == (
        "unknown plugin kind 'optimizer'; kinds are: "
        "backend, transfer_fitting, reduction, input_fitting, model, dataset, logger"
    )


def test_unknown_name_lists_the_available_plugins():
    with pytest.raises(PluginError) as info:
        plugins.create("backend", "cuda-magic")
    message = str(info.value)
    assert message.startswith("unknown backend plugin 'cuda-magic'; available: ")
    assert "torch" in message.split("available: ")[1].split(", ")


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(PluginError) as info:
        plugins.create("backend", "torch", tile=5)
    accepted = ", ".join(p.describe() for p in plugins.get("backend", "torch").parameters)
    assert str(info.value) == f"backend plugin 'torch' has no parameter 'tile'; accepted: {accepted}"
    assert "tile_elements: int = " in accepted


def test_bad_parameter_value_names_the_plugin():
    with pytest.raises(PluginError, match="^backend plugin 'torch': tile_elements must be positive$"):
        plugins.create("backend", "torch", tile_elements=-1)


def test_plugin_errors_are_user_errors():
    assert issubclass(PluginError, GmbenchError)


def test_suite_module_list_registers_a_plugin(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin_module(tmp_path, "gmbench_test_suite_plugin", "keep_heaviest_suite")
    assert "keep_heaviest_suite" not in plugins.available("reduction")

    plugins.load_modules(["gmbench_test_suite_plugin"], source="suite tiny.yaml")
    plugins.load_modules(["gmbench_test_suite_plugin"], source="suite tiny.yaml")  # idempotent

    info = plugins.get("reduction", "keep_heaviest_suite")
    assert info.origin == "module gmbench_test_suite_plugin (suite tiny.yaml)"
    assert info.summary == "Keep the Gaussians with the largest |weight| (test plugin)."
    assert [p.describe() for p in info.parameters] == ["scale: float = 1.0", "keep_sign: bool = True"]

    reduction = plugins.create("reduction", "keep_heaviest_suite", scale=2.0)
    m = gm.pack(
        torch.tensor([[[0.5, -3.0, 1.0, 2.0]]]), torch.randn(1, 1, 4, 2), torch.eye(2).expand(1, 1, 4, 2, 2)
    )
    reduced = reduction.reduce(m, 2)
    assert torch.equal(gm.weights(reduced), torch.tensor([[[-6.0, 4.0]]]))
    with pytest.raises(PluginError, match="^reduction plugin 'keep_heaviest_suite': scale must be positive$"):
        plugins.create("reduction", "keep_heaviest_suite", scale=0.0)


def test_suite_module_that_cannot_be_imported_is_a_clear_error(fresh_plugins):
    with pytest.raises(PluginError) as info:
        plugins.load_modules(["no_such_gmbench_plugin_module"], source="suite s.yaml")
    assert str(info.value).startswith(
        "cannot import plugin module 'no_such_gmbench_plugin_module' listed in suite s.yaml: "
    )
    assert str(info.value).endswith("install it or fix the name")


def test_two_plugins_with_one_name_are_an_error(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin_module(tmp_path, "gmbench_test_clash_a", "clash")
    write_plugin_module(tmp_path, "gmbench_test_clash_b", "clash")
    plugins.load_modules(["gmbench_test_clash_a", "gmbench_test_clash_b"])
    with pytest.raises(PluginError, match="two reduction plugins are named 'clash'"):
        plugins.create("reduction", "clash")


def test_reset_forgets_suite_modules(fresh_plugins, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin_module(tmp_path, "gmbench_test_reset_plugin", "forgotten")
    plugins.load_modules(["gmbench_test_reset_plugin"])
    assert "forgotten" in plugins.available("reduction")
    plugins.reset()
    assert "forgotten" not in plugins.available("reduction")


def test_entry_point_is_discovered_in_process(fresh_plugins, tmp_path, monkeypatch):
    # importlib.metadata scans sys.path for *.dist-info, exactly as for an installed package.
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GMBENCH_DISABLE_ENTRYPOINTS", raising=False)
    write_plugin_module(tmp_path, "gmbench_test_ep_plugin", "keep_heaviest_ep")
    write_distribution(tmp_path, "gmbench-test-ep", "1.2.3", "gmbench_test_ep_plugin")
    info = plugins.get("reduction", "keep_heaviest_ep")
    assert info.origin == "gmbench-test-ep 1.2.3"
    assert plugins.create("reduction", "keep_heaviest_ep").scale == 1.0


def test_entry_point_shows_up_in_gmbench_plugins_json(tmp_path):
    # A fresh interpreter, as a user runs it; creation through the entry point is tested in-process above.
    write_plugin_module(tmp_path, "gmbench_test_cli_plugin", "keep_heaviest_cli")
    write_distribution(tmp_path, "gmbench-test-cli", "0.4.2", "gmbench_test_cli_plugin")
    env = {k: v for k, v in os.environ.items() if k != "GMBENCH_DISABLE_ENTRYPOINTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    listing = subprocess.run(
        [sys.executable, "-m", "gmbench", "plugins", "--json", "--kind", "reduction"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    entries = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    entry = entries["keep_heaviest_cli"]
    assert entry["kind"] == "reduction"
    assert entry["origin"] == "gmbench-test-cli 0.4.2"
    assert entry["class"] == "gmbench_test_cli_plugin.KeepHeaviestReduction"
    assert entry["parameters"] == [
        {"name": "scale", "required": False, "default": 1.0, "type": "float", "choices": None, "description": ""},
        {"name": "keep_sign", "required": False, "default": True, "type": "bool", "choices": None, "description": ""},
    ]


def test_gmbench_plugins_text_lists_kind_name_origin_and_parameters(fresh_plugins, tmp_path, monkeypatch, capsys):
    from gmbench import cli

    monkeypatch.syspath_prepend(str(tmp_path))
    write_plugin_module(tmp_path, "gmbench_test_text_plugin", "keep_heaviest_text")
    assert cli.main(["plugins", "--kind", "reduction", "--load", "gmbench_test_text_plugin"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "reduction:"
    index = next(i for i, line in enumerate(lines) if line.split()[:1] == ["keep_heaviest_text"])
    assert "Keep the Gaussians with the largest |weight|" in lines[index]
    assert lines[index + 1].strip() == "from module gmbench_test_text_plugin (--load)"
    assert [line.strip() for line in lines[index + 2:index + 5]] == ["parameters:", "scale: float = 1.0", "keep_sign: bool = True"]


def test_gmbench_plugins_prints_each_parameter_with_its_description(capsys):
    from gmbench import cli

    assert cli.main(["plugins", "--kind", "transfer_fitting"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    variant = next(line for line in lines if line.startswith("variant:"))
    description = next(p.description for p in plugins.get("transfer_fitting", "dense").parameters if p.name == "variant")
    assert variant.startswith("variant: 'paper' | 'smoothed' = 'paper'") and variant.endswith(description)


def test_gmbench_plugins_json_gives_choices_and_descriptions(capsys):
    from gmbench import cli

    assert cli.main(["plugins", "--json", "--kind", "transfer_fitting"]) == 0
    dense = next(entry for entry in json.loads(capsys.readouterr().out) if entry["name"] == "dense")
    variant = next(p for p in dense["parameters"] if p["name"] == "variant")
    assert variant["choices"] == ["paper", "smoothed"] and variant["type"] == "'paper' | 'smoothed'"
    assert variant["description"]


def _built_in_parameters():
    """``("kind name: parameter", parameter)`` for every parameter of every built-in plugin."""
    return [
        (f"{info.kind} {info.name}: {p.name}", p)
        for info in plugins.describe_all()
        if info.origin.endswith("(built-in)")
        for p in info.parameters
    ]


def test_every_built_in_plugin_parameter_has_a_one_line_description():
    undocumented = [label for label, p in _built_in_parameters() if not p.description or "\n" in p.description]
    assert undocumented == []


def test_every_built_in_plugin_parameter_is_annotated_with_a_checkable_type():
    from typing import Any

    unchecked = [label for label, p in _built_in_parameters() if p.type is Any]
    assert unchecked == []


def test_every_built_in_default_fits_its_own_annotation():
    wrong = [
        f"{info.kind} {info.name}: {p.describe()}"
        for info in plugins.describe_all()
        for p in info.parameters
        if not p.required and not p.accepts(p.default)
    ]
    assert wrong == []
