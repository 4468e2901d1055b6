"""``gmbench suites [NAME]``: the suites that ship with gmbench; ``resolve_suite`` maps a name to its file.

The repository's ``suites/*.yaml`` are package data, installed as
``gmbench/shipped_suites/`` (``pyproject.toml`` maps the package
``gmbench.shipped_suites`` to the top-level ``suites/`` folder).  In a source
checkout (an editable install) the files are read from ``suites/`` itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PACKAGE = "gmbench.shipped_suites"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "suites",
        help="list the suites that ship with gmbench",
        description="List the packaged suites with their descriptions; 'gmbench run NAME' runs one. With NAME, "
                    "print that suite's YAML (a starting point for your own: gmbench suites quickstart > my.yaml).",
    )
    parser.add_argument("name", nargs="?", help="print this packaged suite's YAML")
    parser.add_argument("--json", action="store_true", help="print JSON for machines (name, description, path)")
    parser.set_defaults(func=run)


def suites_folder() -> Path | None:
    """The folder of the packaged suites: the installed package data, else a source checkout's ``suites/``."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location).is_dir():
            return Path(location)
    import gmbench

    # An editable install made before the mapping existed does not know the package; the
    # checkout holds the same files.
    checkout = Path(gmbench.__file__).resolve().parent.parent
    if (checkout / "suites").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "suites"
    return None


def packaged_suites() -> dict[str, Path]:
    """``{name: file}`` of the packaged suites, the name being the file name without ``.yaml``."""
    folder = suites_folder()
    return {} if folder is None else {p.stem: p for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)}


def resolve_suite(argument: str) -> Path:
    """The suite file ``gmbench run ARGUMENT`` means: an existing file always wins, else a packaged suite's name."""
    from gmbench.errors import SuiteError

    path = Path(argument)
    if path.is_file():
        return path
    shipped = packaged_suites()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in shipped and (path.parent == Path(".") or path.parent.name == "suites"):
        return shipped[name]
    if path.is_dir():
        return path  # load_suite says that it is a directory
    raise SuiteError(f"suite '{argument}' is neither a file nor a packaged suite; pass a YAML file or one of: "
                     f"{', '.join(shipped) or '(none installed)'} (gmbench suites describes them)")


def describe(path: Path) -> str:
    """A suite's one-line ``description:``, else the first line of its top comment."""
    import yaml

    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("description"), str) and data["description"].strip():
        return " ".join(data["description"].split())
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def run(args) -> int:
    from gmbench.errors import GmbenchError

    shipped = packaged_suites()
    if args.name:
        if args.name not in shipped:
            raise GmbenchError(f"no packaged suite '{args.name}'; packaged: {', '.join(shipped) or '(none installed)'}")
        sys.stdout.write(shipped[args.name].read_text())
        return 0
    rows = [{"name": name, "description": describe(path), "path": str(path)} for name, path in shipped.items()]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not rows:
        print("no packaged suites found (this gmbench was installed without its suites)")
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['description']}")
    print(f"\nrun one with: gmbench run NAME [--smoke]   (files: {suites_folder()})")
    return 0
