"""Suite YAML: safe, bounded, and with the line of every value.

A suite file is data from anyone, so it is read as plain data only:

* ``yaml.SafeLoader`` semantics, and every node's tag must be one of the plain
  data types (:data:`PLAIN_TAGS`).  A tag such as ``!!python/object/apply:...``
  is an error naming its line -- also on a list or mapping, which PyYAML's
  line-keeping compose step would otherwise pass through untouched.
* Aliases (``*name``) may not blow the document up: the size of the document
  with every alias expanded is counted on the composed node graph (each node
  once, so a "billion laughs" file costs milliseconds) before any Python object
  is built, and must stay within :data:`MAX_NODES`.  A recursive alias is an error.
* Floats are read as YAML 1.2 writes them: ``1.0e6`` and ``1e-5`` are numbers
  (YAML 1.1, which PyYAML follows, reads both as strings).

Mappings and lists come back as :class:`LDict` / :class:`LList`, which remember
the line of each entry, so every validation error can say ``file:line``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gmbench.errors import SuiteError

# The expanded document may hold at most this many nodes (scalars, lists, mappings).
# The largest shipped suite has under 200.
MAX_NODES = 100_000

_YAML = "tag:yaml.org,2002:"
PLAIN_TAGS = frozenset(_YAML + name for name in ("null", "bool", "int", "float", "str", "seq", "map", "merge", "timestamp"))

# YAML 1.2 (core schema) floats that YAML 1.1 reads as strings: 1e-5, 1.0e6, .5E3.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")


class SuiteLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats (``1.0e6``) as numbers."""


SuiteLoader.add_implicit_resolver(_YAML + "float", _YAML12_FLOAT, list("-+0123456789."))


class LDict(dict):
    """A dict that remembers the line of each key (``lines``) and its own ``line``."""

    line: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}


class LList(list):
    """A list that remembers the line of each item (``lines``) and its own ``line``."""

    line: int = 0

    def __init__(self, *args):
        super().__init__(*args)
        self.lines: list[int] = []


def read_suite_text(path: Path) -> str:
    """The text of the suite file at ``path``; a one-line :class:`SuiteError` for a missing
    file, a directory, an unreadable file or bytes that are not UTF-8."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise SuiteError(f"suite path '{path}' is a directory{hint}; pass the path of one YAML suite file")
    if not path.exists():
        raise SuiteError(f"suite file '{path}' does not exist; pass the path of a YAML suite such as suites/quickstart.yaml")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SuiteError(f"cannot read suite file '{path}': {error.strerror or error}; check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise SuiteError(
            f"{path}:{line}: the file is not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8"
        ) from None


def load_yaml_with_lines(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` whose mappings/lists are :class:`LDict`/:class:`LList`.

    Raises :class:`SuiteError` (``where:line: ...``) for invalid YAML, a tag that is
    not plain data, a recursive alias or a document larger than :data:`MAX_NODES`
    once its aliases are expanded.
    """
    loader = None
    try:
        loader = SuiteLoader(text)  # checks every character already
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return _build(node, loader, where)
    except yaml.YAMLError as error:
        raise SuiteError(f"{where}{_error_line(error, text)}: not valid YAML ({_problem(error)}); fix the syntax") from None
    except RecursionError:
        raise SuiteError(f"{where}: the YAML is nested too deeply to be a suite; flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_value(text: str, where: str) -> Any:
    """One YAML value as a suite would read it (a command-line ``KEY=VALUE``), as plain data."""
    return plain(load_yaml_with_lines(text, where))


def plain(value: Any) -> Any:
    """Deep copy into plain dicts/lists (for JSON, hashing and pickling)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def line_of(container: Any, key: Any, default: int) -> int:
    """Line of ``container[key]`` in the suite file (``default`` when unknown)."""
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key, getattr(container, "line", 0) or default)
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return getattr(container, "line", 0) or default


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Every tag plain data, no recursive alias, and at most MAX_NODES nodes with every
    alias expanded -- counted on the composed graph, where an alias is the same node
    object as its anchor, so each distinct node is visited once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SuiteError(f"{where}:{_line(node)}: an alias refers to a node that contains it (a recursive structure); a suite must be a tree")
        if node.tag not in PLAIN_TAGS:
            raise SuiteError(
                f"{where}:{_line(node)}: YAML tag '{_short_tag(node.tag)}' is not allowed: only plain data "
                "(mappings, lists, strings, numbers, true/false, null); remove the tag"
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise SuiteError(
                f"{where}:{_line(node)}: with its aliases (*name) expanded the document has more than {MAX_NODES:,} values; "
                "a suite needs far fewer: write the values out or use fewer aliases"
            )
        sizes[key] = total
        return total

    size(root)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


def _build(node: yaml.Node, loader: yaml.SafeLoader, where: str) -> Any:
    line = _line(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor), as safe_load does
        result = LDict()
        result.line = line
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = _line(key_node)
            if not isinstance(key, str):
                raise SuiteError(f"{where}:{key_line}: key {key!r} must be a string; quote it")
            if key in result:
                raise SuiteError(f"{where}:{key_line}: duplicate key '{key}'; remove one of them")
            result[key] = _build(value_node, loader, where)
            result.lines[key] = key_line
        return result
    if isinstance(node, yaml.SequenceNode):
        result = LList()
        result.line = line
        for item in node.value:
            result.append(_build(item, loader, where))
            result.lines.append(_line(item))
        return result
    return loader.construct_object(node, deep=True)


def _error_line(error: yaml.YAMLError, text: str) -> str:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(error, "position", None)  # ReaderError: a character YAML does not allow
    if isinstance(position, int):
        return f":{text.count(chr(10), 0, position) + 1}"
    return ""


def _problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    if problem:
        return problem
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character if isinstance(error.character, int) else ord(error.character)
        return f"character U+{character:04X} is not allowed in YAML"
    return str(error).splitlines()[0]
