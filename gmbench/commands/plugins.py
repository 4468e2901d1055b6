"""``gmbench plugins``: every registered plugin with its parameters and origin."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list registered plugins",
        description=(
            "List every registered plugin: kind, name, origin package and version, and its parameters "
            "(name: type = default, then a one-line description)."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument("--kind", help="only this plugin kind")
    parser.add_argument(
        "--load", action="append", default=[], metavar="MODULE",
        help="import an extra plugin module first (as a suite's plugins: list does)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from gmbench import plugins

    plugins.load_modules(args.load, source="--load")
    kinds = [args.kind] if args.kind else list(plugins.KINDS)
    rows = [info for kind in kinds for info in plugins.registry(kind).values()]
    if args.json:
        payload = [
            {
                "kind": info.kind,
                "name": info.name,
                "summary": info.summary,
                "origin": info.origin,
                "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
                "parameters": [
                    {
                        "name": p.name,
                        "required": p.required,
                        "default": None if p.required else _jsonable(p.default),
                        "type": p.annotation,
                        "choices": None if p.choices is None else [_jsonable(c) for c in p.choices],
                        "description": p.description,
                    }
                    for p in info.parameters
                ],
            }
            for info in rows
        ]
        json.dump(payload, sys.stdout, indent=2)
        print()
        return 0
    for kind in kinds:
        infos = [info for info in rows if info.kind == kind]
        if not infos:
            continue
        print(f"{kind}:")
        for info in infos:
            print(f"  {info.name:<16} {info.summary}")
            print(f"  {'':<16} from {info.origin}")
            parameters = info.parameters
            if not parameters:
                continue
            print(f"  {'':<16} parameters:")
            width = min(40, max(len(p.describe()) for p in parameters))
            for p in parameters:
                text = p.describe()
                line = f"{text:<{width}}  {p.description}" if p.description else text
                print(f"  {'':<16}   {line.rstrip()}")
    return 0


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)
