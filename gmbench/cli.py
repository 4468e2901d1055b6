"""The ``gmbench`` command line.

Each sub-command is a module in :mod:`gmbench.commands` with
``register(subparsers)`` that adds its parser and sets ``func`` (called with the
parsed arguments, returning an exit code).  User errors
(:class:`gmbench.GmbenchError`) print one line and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gmbench import __version__
from gmbench.errors import GmbenchError

COMMANDS = (
    "plugins",
    "footprint",
    "run",
    "report",
    "fit",
    "figure",
    "data",
    "suites",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmbench",
        description="Benchmark suite for Gaussian Mixture Convolution Networks.",
    )
    parser.add_argument("--version", action="version", version=f"gmbench {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"gmbench.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GmbenchError as error:
        if args.debug:
            raise
        print(f"gmbench {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `gmbench ... | head` closed the pipe: not an error worth a traceback.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"gmbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
