"""The plugin manager: built-in methods, entry points and suite modules alike.

gmbench is its own first plugin user: every built-in method lives in a module
listed in :data:`BUILTIN_PLUGINS` and registers through the hooks of
:mod:`gmbench.hookspecs`, exactly as a third-party package registered through
the ``gmbench`` entry-point group or a suite's ``plugins:`` list does.

Set ``GMBENCH_TRACE_PLUGINS=1`` to log every hook call.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any

import pluggy

from gmbench import hookspecs
from gmbench.errors import PluginError

hookimpl = pluggy.HookimplMarker("gmbench")

KINDS = ("backend", "transfer_fitting", "reduction", "input_fitting", "model", "dataset")

BUILTIN_PLUGINS = (
    "gmbench.backends.torch",
    "gmbench.backends.fused",
    "gmbench.fitting.dense",
    "gmbench.fitting.lstsq",
    "gmbench.fitting.weight_relu",
    "gmbench.reduction.mem",
    "gmbench.reduction.treehem",
    "gmbench.input_fitting.kmeans",
    "gmbench.input_fitting.em_fitting",
    "gmbench.input_fitting.eckart",
    "gmbench.data.digits",
    "gmbench.data.shapes3d",
    "gmbench.data.modelnet",
    "gmbench.data.mnist",
    "gmbench.baselines.pointnet",
    "gmbench.baselines.pointnet2",
    "gmbench.models.gmcn",
)

_pm: pluggy.PluginManager | None = None
_origins: dict[str, str] = {}  # plugin (module) name -> "dist version" / "module"


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("gmbench")
        pm.add_hookspecs(hookspecs)
        from gmbench import __version__

        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
            _origins[module_name] = f"gmbench {__version__} (built-in)"
        if not os.environ.get("GMBENCH_DISABLE_ENTRYPOINTS"):
            pm.load_setuptools_entrypoints("gmbench")
            for plugin, dist in pm.list_plugin_distinfo():
                _origins[pm.get_name(plugin)] = f"{dist.project_name} {dist.version}"
        if os.environ.get("GMBENCH_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
            pm.enable_tracing()
        _pm = pm
    return _pm


def reset() -> None:
    """Forget the process-wide manager and everything registered on it.

    The next use rebuilds it from the built-ins and the entry points found then.
    For tests that register throw-away plugins, and for a running interpreter
    after a plugin package was installed.
    """
    global _pm
    _pm = None
    _origins.clear()


def load_modules(module_names: list[str] | tuple[str, ...], source: str = "suite") -> None:
    """Import and register extra plugin modules (a suite's ``plugins:`` list)."""
    pm = get_plugin_manager()
    for module_name in module_names:
        if pm.has_plugin(module_name):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise PluginError(
                f"cannot import plugin module '{module_name}' listed in {source}: {error}; "
                "install it or fix the name"
            ) from None
        pm.register(module, name=module_name)
        _origins[module_name] = f"module {module_name} ({source})"


def _hook(kind: str):
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind '{kind}'; kinds are: {', '.join(KINDS)}")
    return getattr(get_plugin_manager().hook, f"gmbench_{kind}")


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    name: str
    default: Any  # inspect.Parameter.empty when required
    annotation: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        text = self.name
        if self.annotation:
            text += f": {self.annotation}"
        if not self.required:
            text += f" = {self.default!r}"
        return text


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    origin: str

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def parameters(self) -> list[ParameterInfo]:
        return plugin_parameters(self.cls)

    @property
    def accepts_any_parameter(self) -> bool:
        signature = inspect.signature(self.cls.__init__)
        return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


# Parameters that the framework passes itself (the API contract), not the suite.
FRAMEWORK_PARAMETERS = {"model": ("num_classes", "dims")}


def plugin_parameters(cls: type) -> list[ParameterInfo]:
    signature = inspect.signature(cls.__init__)
    result = []
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            annotation = ""
        elif not isinstance(annotation, str):
            annotation = getattr(annotation, "__name__", str(annotation))
        result.append(ParameterInfo(parameter.name, parameter.default, annotation))
    return result


def registry(kind: str) -> dict[str, PluginInfo]:
    """All plugins of one kind, by name."""
    hook = _hook(kind)
    pm = get_plugin_manager()
    found: dict[str, PluginInfo] = {}
    for impl in hook.get_hookimpls():
        result = impl.function()
        classes = result if isinstance(result, (list, tuple)) else [result]
        for cls in classes:
            if cls is None:
                continue
            name = getattr(cls, "name", None)
            if not isinstance(name, str):
                raise PluginError(f"plugin {impl.plugin_name} returned {cls!r} without a string 'name' attribute")
            origin = _origins.get(impl.plugin_name) or _origins.get(pm.get_name(impl.plugin), impl.plugin_name)
            # Later registrations (third-party) must not silently shadow built-ins.
            if name in found and found[name].cls is not cls:
                raise PluginError(
                    f"two {kind} plugins are named '{name}': {found[name].origin} and {origin}; "
                    "uninstall one or rename it"
                )
            found[name] = PluginInfo(kind, name, cls, origin)
    return dict(sorted(found.items()))


def available(kind: str) -> list[str]:
    return list(registry(kind))


def get(kind: str, name: str) -> PluginInfo:
    plugins = registry(kind)
    if name not in plugins:
        choices = ", ".join(plugins) or "(none registered)"
        raise PluginError(f"unknown {kind} plugin '{name}'; available: {choices}")
    return plugins[name]


def check_parameters(kind: str, name: str, params: dict[str, Any], framework: bool = False) -> PluginInfo:
    """Raise :class:`PluginError` if ``params`` do not fit the plugin's signature.

    With ``framework=False`` the framework-supplied parameters (a model's
    ``num_classes`` and ``dims``) are treated as given.
    """
    info = get(kind, name)
    accepted = {p.name: p for p in info.parameters}
    if not info.accepts_any_parameter:
        unknown = [key for key in params if key not in accepted]
        if unknown:
            listing = ", ".join(p.describe() for p in info.parameters) or "(no parameters)"
            raise PluginError(
                f"{kind} plugin '{name}' has no parameter '{unknown[0]}'; accepted: {listing}"
            )
    given = set(params) | (set() if framework else set(FRAMEWORK_PARAMETERS.get(kind, ())))
    missing = [p.name for p in info.parameters if p.required and p.name not in given]
    if missing:
        raise PluginError(f"{kind} plugin '{name}' needs parameter '{missing[0]}'")
    return info


def create(kind: str, name: str, **params: Any) -> Any:
    """Build an instance of plugin ``name`` of ``kind`` with ``params``.

    Unknown kinds, names and parameters raise :class:`PluginError` listing what
    is available; a ``TypeError``/``ValueError`` raised by the plugin for a bad
    parameter value becomes a :class:`PluginError` naming the plugin.
    """
    info = check_parameters(kind, name, params, framework=True)
    try:
        return info.cls(**params)
    except (TypeError, ValueError) as error:
        raise PluginError(f"{kind} plugin '{name}': {error}") from error


def describe_all() -> list[PluginInfo]:
    return [info for kind in KINDS for info in registry(kind).values()]
