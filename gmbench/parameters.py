"""Plugin parameters: read from a plugin class's ``__init__`` and checked by value.

A plugin's parameters are the keyword arguments of its ``__init__``.  Their
annotations are the contract that suites are validated against, and each one
carries a one-line description as ``typing.Annotated`` metadata::

    def __init__(
        self,
        T: Annotated[int, "Gaussians per tree node (a power of two >= 2)"] = 2,
        variant: Annotated[Literal["paper", "smoothed"], "which weight correction"] = "paper",
    ): ...

``gmbench plugins`` prints the description next to the parameter and a
:class:`PluginParameterError` quotes it.  Understood types: ``int`` (not
``bool``), ``float`` (an ``int`` is accepted), ``bool``, ``str``, ``None``,
unions (``X | None``), ``Literal[...]`` choices, ``tuple[X, Y]`` /
``tuple[X, ...]`` and ``list[X]`` (YAML gives lists for both), ``dict`` and
``Any``.  An annotation that cannot be resolved is shown but not checked.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import numbers
import re
import sys
import types
import typing
from typing import Annotated, Any

from gmbench.errors import PluginError

_NO_VALUE = object()


class PluginParameterError(PluginError):
    """A plugin parameter that is unknown, missing or of the wrong type or value.

    Structured for callers that add a location (the suite validator adds
    ``file:line``): ``kind`` and ``plugin`` name the plugin whose parameter is
    wrong, ``parameter`` the parameter, ``path`` the keys leading to it from
    the parameters mapping that was checked (``("reduction_params", "T")``
    when a model's nested reduction is wrong), ``problem`` is ``"unknown"``,
    ``"missing"`` or ``"value"``, ``expected`` the allowed type or values in
    words and ``description`` the parameter's one-line description.
    ``str(error)`` is the one-line message without a location;
    :meth:`located` prefixes one.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        plugin: str,
        parameter: str,
        problem: str,
        path: tuple[str, ...] = (),
        expected: str = "",
        description: str = "",
        value: Any = _NO_VALUE,
    ):
        super().__init__(message)
        self.message = message
        self.kind, self.plugin, self.parameter, self.problem = kind, plugin, parameter, problem
        self.path = path or (parameter,)
        self.expected, self.description, self.value = expected, description, value

    def located(self, location: str) -> PluginParameterError:
        """The same error with ``location`` (e.g. ``"suite.yaml:12"``) in front of its message."""
        return self._replace(message=f"{location}: {self.message}")

    def nested_under(self, key: str) -> PluginParameterError:
        """The same error, reached through the mapping ``key`` (a ``<kind>_params`` entry)."""
        return self._replace(path=(key, *self.path))

    def _replace(self, **changes: Any) -> PluginParameterError:
        fields = dict(
            message=self.message, kind=self.kind, plugin=self.plugin, parameter=self.parameter, problem=self.problem,
            path=self.path, expected=self.expected, description=self.description, value=self.value,
        )
        fields.update(changes)
        return PluginParameterError(fields.pop("message"), **fields)


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    """One keyword argument of a plugin's ``__init__``."""

    name: str
    default: Any  # inspect.Parameter.empty when required
    annotation: str  # the type as shown to users ("" when unannotated)
    description: str = ""  # one line, from the Annotated metadata
    type: Any = Any  # the resolved type (Annotated stripped); Any when unknown or unresolvable

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a ``Literal`` parameter (``None`` allowed too when optional)."""
        literal = [arg for arg in _union_members(self.type) if typing.get_origin(arg) is typing.Literal]
        if not literal:
            return None
        values = tuple(value for arg in literal for value in typing.get_args(arg))
        return values + ((None,) if type(None) in _union_members(self.type) else ())

    def describe(self) -> str:
        """``name: type = default``, as listed in errors and by ``gmbench plugins``."""
        text = self.name
        if self.annotation:
            text += f": {self.annotation}"
        if not self.required:
            text += f" = {self.default!r}"
        return text

    def expected(self) -> str:
        """What a value must be, in words (``"an integer"``, ``"one of 'paper', 'smoothed'"``)."""
        return expected_text(self.type)

    def accepts(self, value: Any) -> bool:
        return matches(value, self.type)


def plugin_parameters(cls: type) -> list[ParameterInfo]:
    """The keyword parameters of ``cls.__init__`` (``*args``/``**kwargs`` left out)."""
    return list(_parameters(cls))


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> tuple[ParameterInfo, ...]:
    signature = inspect.signature(cls.__init__)
    hints = _type_hints(cls.__init__)
    result = []
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        hint = hints.get(parameter.name, _NO_VALUE)
        if hint is _NO_VALUE:
            raw = parameter.annotation
            shown = "" if raw is inspect.Parameter.empty else raw if isinstance(raw, str) else type_text(raw)
            result.append(ParameterInfo(parameter.name, parameter.default, shown))
            continue
        base, description = _split_annotated(hint)
        result.append(ParameterInfo(parameter.name, parameter.default, type_text(base), description, base))
    return tuple(result)


def _type_hints(function) -> dict[str, Any]:
    """Resolved annotations with their ``Annotated`` metadata; per parameter where some cannot be resolved."""
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # noqa: BLE001 - a name only imported under TYPE_CHECKING, say
        pass
    module = sys.modules.get(getattr(function, "__module__", ""), None)
    namespace = dict(vars(module)) if module is not None else {}
    hints = {}
    for name, annotation in getattr(function, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:  # noqa: BLE001 - unresolvable: shown as written, not checked
            continue
    return hints


def _split_annotated(hint: Any) -> tuple[Any, str]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *metadata = typing.get_args(hint)
        description = next((item for item in metadata if isinstance(item, str)), "")
        return base, " ".join(description.split())
    return hint, ""


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


# --------------------------------------------------------------------------- checking values


def matches(value: Any, hint: Any) -> bool:
    """True when ``value`` (as YAML or Python code gives it) fits the type ``hint``."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return matches(value, typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, member) for member in typing.get_args(hint))
    if origin is typing.Literal:
        # 1 == True in Python; a YAML `true` is not the choice 1.
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        return _matches_sequence(value, typing.get_args(hint), fixed=True)
    if origin in (list, collections.abc.Sequence) or hint is list:
        args = typing.get_args(hint)
        return _matches_sequence(value, (args[0], ...) if args else (), fixed=False)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        if not isinstance(value, collections.abc.Mapping):
            return False
        args = typing.get_args(hint)
        return not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a typing construct not understood here: not checked


def _matches_sequence(value: Any, args: tuple, fixed: bool) -> bool:
    if not isinstance(value, (list, tuple)):
        return False
    if not args:
        return True
    if len(args) == 2 and args[1] is Ellipsis:
        return all(matches(item, args[0]) for item in value)
    if fixed and len(value) != len(args):
        return False
    return all(matches(item, arg) for item, arg in zip(value, args))


def expected_text(hint: Any) -> str:
    """The values ``hint`` allows, in words, for error messages."""
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return "any value"
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        literals = [value for member in members if typing.get_origin(member) is typing.Literal for value in typing.get_args(member)]
        others = [expected_text(member) for member in members if typing.get_origin(member) is not typing.Literal]
        parts = ([_choices_text(literals)] if literals else []) + others
        return " or ".join(parts)
    if origin is typing.Literal:
        return _choices_text(typing.get_args(hint))
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list"}
    if hint in words:
        return words[hint]
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and all(arg == args[0] for arg in args):
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list [{', '.join(type_text(arg) for arg in args)}]"
    if origin is list:
        args = typing.get_args(hint)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return type_text(hint)


def _choices_text(values) -> str:
    return "one of " + ", ".join(repr(value) for value in values)


def _plural(hint: Any) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return names.get(hint, f"{type_text(hint)} values")


def type_text(hint: Any) -> str:
    """A type as written in Python (``float | None``, ``'paper' | 'smoothed'``), without ``typing.``."""
    if hint is None or hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(member) for member in typing.get_args(hint))
    if origin is typing.Literal:
        return " | ".join(repr(value) for value in typing.get_args(hint))
    if origin is not None:
        args = typing.get_args(hint)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if arg is Ellipsis else type_text(arg) for arg in args)}]" if args else name
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def value_text(value: Any) -> str:
    """A value as the user wrote it, with a hint where YAML read something unexpected."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str):
        # Suites and --param/--set values read 1e-5 and 1.0e6 as numbers (YAML 1.2 floats), so a
        # string that looks like one was quoted in the YAML, or passed as a str from Python.
        if _E_NOTATION.fullmatch(value.strip()):
            return f"{text} (a string, not a number: it was quoted; write {value.strip()} without quotes)"
        return f"{text} (a string)"
    return text


_E_NOTATION = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# The parameters the framework passes itself (``gmbench.plugins.FRAMEWORK_PARAMETERS``), with
# one description for every plugin that takes them.
NumClasses = Annotated[int, "number of classes (set by the runner from the data set)"]
Dims = Annotated[int, "spatial dimension D, 2 or 3 (set by the runner from the data set)"]
DataRoot = Annotated[str | None, "folder with the data files (null: --data-root, else $GMBENCH_DATA)"]
Seed = Annotated[int, "seed of the random draws: the same seed gives the same samples"]
