"""The plugin manager: built-in methods, entry points and suite modules alike.

gmbench is its own first plugin user: every built-in method lives in a module
listed in :data:`BUILTIN_PLUGINS` and registers through the hooks of
:mod:`gmbench.hookspecs`, exactly as a third-party package registered through
the ``gmbench`` entry-point group or a suite's ``plugins:`` list does.

Set ``GMBENCH_TRACE_PLUGINS=1`` to log every hook call (hooks are called through
pluggy's hook caller, once per plugin until the set of registered plugins
changes), ``GMBENCH_DISABLE_ENTRYPOINTS=1`` to ignore installed third-party
plugins.  :func:`check_parameters` checks a plugin's parameters by value
(:mod:`gmbench.parameters`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any

import pluggy

from gmbench import __version__, hookspecs
from gmbench.errors import PluginError
from gmbench.parameters import ParameterInfo, PluginParameterError, plugin_parameters, value_text

hookimpl = pluggy.HookimplMarker("gmbench")

KINDS = hookspecs.KINDS

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
    "gmbench.data.mnist5k",
    "gmbench.data.mnist5k_3d",
    "gmbench.baselines.pointnet",
    "gmbench.baselines.pointnet2",
    "gmbench.models.gmcn",
    "gmbench.loggers.tensorboard_logger",
    "gmbench.loggers.mlflow_logger",
)

_pm: pluggy.PluginManager | None = None
_origins: dict[str, str] = {}  # plugin (module) name -> "dist version" / "module"


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("gmbench")
        pm.add_hookspecs(hookspecs)
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
    _hook_results.clear()


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
        if self.cls.__init__ is object.__init__:  # shown as (*args, **kwargs), takes nothing
            return False
        signature = inspect.signature(self.cls.__init__)
        return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())

    def nested_kinds(self) -> list[str]:
        """Plugin kinds this plugin takes as a choice: a parameter named ``<kind>`` (the plugin
        name) together with ``<kind>_params`` (its parameters), as ``gmcn`` takes a reduction."""
        names = {p.name for p in self.parameters}
        return [kind for kind in KINDS if kind in names and f"{kind}_params" in names]


# Parameters the framework passes itself (the API contract), not the suite: a model is
# built with the data set's class count and dimension; a data set may be given the
# --data-root folder and a seed.
FRAMEWORK_PARAMETERS = {"model": ("num_classes", "dims"), "dataset": ("data_root", "seed")}

# kind -> (fingerprint of the registered plugins, [(plugin name, class), ...]); a hook is
# called again only after a plugin was registered or unregistered.
_hook_results: dict[str, tuple[frozenset, list[tuple[str, Any]]]] = {}


def _classes(kind: str) -> list[tuple[str, Any]]:
    """Every ``(plugin name, returned class)`` for one kind, each plugin's hook called through
    pluggy's hook caller (so ``GMBENCH_TRACE_PLUGINS`` shows the call)."""
    hook = _hook(kind)
    pm = get_plugin_manager()
    fingerprint = frozenset(id(plugin) for plugin in pm.get_plugins())
    cached = _hook_results.get(kind)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    implementations = hook.get_hookimpls()
    found = []
    for impl in implementations:
        others = [other.plugin for other in implementations if other is not impl]
        results = pm.subset_hook_caller(hook.name, remove_plugins=others)()
        for result in results:
            for cls in result if isinstance(result, (list, tuple)) else [result]:
                if cls is not None:
                    found.append((impl.plugin_name, cls))
    _hook_results[kind] = (fingerprint, found)
    return found


def registry(kind: str) -> dict[str, PluginInfo]:
    """All plugins of one kind, by name."""
    pm = get_plugin_manager()
    found: dict[str, PluginInfo] = {}
    for plugin_name, cls in _classes(kind):
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise PluginError(f"plugin {plugin_name} returned {cls!r} without a string 'name' attribute")
        origin = _origins.get(plugin_name) or _origins.get(pm.get_name(pm.get_plugin(plugin_name)), plugin_name)
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
    """Check ``params`` against the plugin's ``__init__``: names, required ones, and values.

    Every value is checked against its parameter's annotation (see
    :mod:`gmbench.parameters`), and a nested plugin choice (``<kind>`` +
    ``<kind>_params``, e.g. a model's ``reduction`` and ``reduction_params``)
    is checked the same way, recursively.  With ``framework=False`` the
    parameters the framework supplies (:data:`FRAMEWORK_PARAMETERS`) count as
    given.  Raises :class:`~gmbench.parameters.PluginParameterError` (its
    ``path`` says which key of ``params`` is wrong) or :class:`PluginError`
    for an unknown plugin; returns the plugin's :class:`PluginInfo`.
    """
    info = get(kind, name)
    accepted = {p.name: p for p in info.parameters}

    def fail(parameter: str, problem: str, message: str, **details: Any) -> PluginParameterError:
        about = accepted.get(parameter)
        return PluginParameterError(
            message, kind=kind, plugin=name, parameter=parameter, problem=problem,
            expected=about.expected() if about else "", description=about.description if about else "", **details,
        )

    if not info.accepts_any_parameter:
        unknown = [key for key in params if key not in accepted]
        if unknown:
            listing = ", ".join(p.describe() for p in info.parameters) or "(no parameters)"
            raise fail(unknown[0], "unknown", f"{kind} plugin '{name}' has no parameter '{unknown[0]}'; accepted: {listing}")
    given = set(params) | (set() if framework else set(FRAMEWORK_PARAMETERS.get(kind, ())))
    missing = [p for p in info.parameters if p.required and p.name not in given]
    if missing:
        about = f" ({missing[0].description})" if missing[0].description else ""
        raise fail(missing[0].name, "missing", f"{kind} plugin '{name}' needs parameter '{missing[0].name}'{about}: {missing[0].expected()}")
    for key, value in params.items():
        parameter = accepted.get(key)
        if parameter is not None and not parameter.accepts(value):
            about = f"; {key}: {parameter.description}" if parameter.description else ""
            raise fail(key, "value", f"{kind} plugin '{name}': {key} must be {parameter.expected()}, got {value_text(value)}{about}", value=value)
    for nested_kind in info.nested_kinds():
        nested_name = params.get(nested_kind, accepted[nested_kind].default)
        if not isinstance(nested_name, str):
            continue  # no choice made (a required parameter left to the framework, or None)
        choices = available(nested_kind)
        if nested_name not in choices:
            raise fail(
                nested_kind, "value",
                f"{kind} plugin '{name}': {nested_kind} must be one of the {nested_kind} plugins "
                f"{', '.join(choices) or '(none registered)'}, got {nested_name!r}",
                value=nested_name,
            )
        nested_params = params.get(f"{nested_kind}_params") or {}
        try:
            check_parameters(nested_kind, nested_name, nested_params, framework=framework)
        except PluginParameterError as error:
            raise error.nested_under(f"{nested_kind}_params") from None
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
