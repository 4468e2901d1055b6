"""Check a plugin class against its kind's contract (:data:`gmbench.hookspecs.PROTOCOLS`).

``typing.Protocol`` documents what an instance must offer; :func:`problems`
checks it statically, without building the plugin: every protocol method is
there and can be called the way gmbench calls it (required arguments
positionally, optional ones by keyword), optional methods that are present
too, ``__init__`` takes the parameters the framework passes
(:data:`gmbench.plugins.FRAMEWORK_PARAMETERS`) and every default fits its own
annotation.  ``gmbench plugins`` does not run it; ``tests/test_plugin_contracts.py``
runs it for every built-in, and a third-party test can call it the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

from gmbench import hookspecs, plugins

# Methods a plugin may have, and the arguments gmbench passes when it does.
OPTIONAL_METHODS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "backend": {"evaluate_weight_sets_at_centroids": (("m", "weight_sets"), ())},
    "model": {"regularization_loss": ((), ())},
    "dataset": {"check": ((), ())},
}


def problems(kind: str, cls: type) -> list[str]:
    """What ``cls`` lacks to be a plugin of ``kind`` (empty when it satisfies the contract)."""
    protocol = hookspecs.PROTOCOLS[kind]
    found = []
    if not isinstance(getattr(cls, "name", None), str):
        found.append("class attribute 'name' must be a string")
    if kind == "model":
        import torch

        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            found.append("a model must be a torch.nn.Module subclass")
    for member in _protocol_methods(protocol):
        required, optional = _arguments(getattr(protocol, member))
        found += _call_problems(cls, member, required, optional, needed=True)
    for member, (required, optional) in OPTIONAL_METHODS.get(kind, {}).items():
        found += _call_problems(cls, member, required, optional, needed=False)
    # object.__init__ shows (*args, **kwargs) but takes no arguments.
    init = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in init.values())
    for name in plugins.FRAMEWORK_PARAMETERS.get(kind, ()):
        if name not in init and not takes_any:
            found.append(f"__init__ must accept '{name}' (the framework passes it)")
    for parameter in plugins.plugin_parameters(cls):
        if not parameter.required and not parameter.accepts(parameter.default):
            found.append(f"default of {parameter.describe()} does not fit its annotation")
    return found


def _protocol_methods(protocol: type) -> list[str]:
    members = []
    for klass in protocol.__mro__:
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, classmethod)):
                members.append(name)
    return members


def _arguments(method: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of the required and the optional arguments of a protocol method (without self/cls)."""
    parameters = list(inspect.signature(method).parameters.values())
    if parameters and parameters[0].name == "self":  # a classmethod comes bound, without cls
        parameters = parameters[1:]
    required = tuple(p.name for p in parameters if p.default is inspect.Parameter.empty)
    optional = tuple(p.name for p in parameters if p.default is not inspect.Parameter.empty)
    return required, optional


def _call_problems(cls: type, member: str, required: tuple, optional: tuple, needed: bool) -> list[str]:
    attribute = inspect.getattr_static(cls, member, None)
    if attribute is None:
        return [f"missing method {member}({', '.join(required + optional)})"] if needed else []
    bound = getattr(cls, member)
    if not callable(bound):
        return [f"{member} must be a method"]
    signature = inspect.signature(bound)
    # An instance method looked up on the class still takes self.
    prefix = [] if isinstance(attribute, (classmethod, staticmethod)) else ["self"]
    try:
        signature.bind(*prefix, *required, **{name: None for name in optional})
    except TypeError as error:
        call = ", ".join(list(required) + [f"{name}=..." for name in optional])
        return [f"{member} cannot be called as {member}({call}): {error}"]
    return []
