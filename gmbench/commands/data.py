"""``gmbench data fetch NAME`` / ``gmbench data list``: download data sets into the layout the loaders read."""

from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="download data sets (ModelNet10/40, MNIST, Fashion-MNIST)",
        description="Download data sets from their publishers, verified by size and SHA-256, into the layout "
                    "gmbench's loaders read (see docs/data.md, 'Downloading').",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    from gmbench.data.fetch import MIRROR_VARIABLE, SOURCES

    fetch = actions.add_parser(
        "fetch",
        help="download, verify and unpack a data set",
        description="Download NAME (resuming an interrupted download), verify its size and SHA-256, unpack it "
                    "atomically under the data root and print where it is. Running it again does nothing "
                    "when the data are complete.",
    )
    fetch.add_argument("name", choices=tuple(SOURCES), help="data set")
    fetch.add_argument("--root", help="data root (default: $GMBENCH_DATA); the folder gmbench run's --data-root takes")
    fetch.add_argument("--mirror", metavar="URL",
                       help=f"download from URL/<name>/<file> instead of the publisher (default: ${MIRROR_VARIABLE})")
    fetch.add_argument("--force", action="store_true", help="download again and replace data already there")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.set_defaults(func=run_fetch)
    listing = actions.add_parser("list", help="list the data sets gmbench can download",
                                 description="List the downloadable data sets, their files, sources and checksums.")
    listing.add_argument("--root", help="also say which are present under this data root (default: $GMBENCH_DATA)")
    listing.set_defaults(func=run_list)


def _root(value: str | None, required: bool) -> str | None:
    from gmbench.data.paths import ENVIRONMENT_VARIABLE
    from gmbench.errors import GmbenchError

    root = value or os.environ.get(ENVIRONMENT_VARIABLE) or None
    if root is None and required:
        raise GmbenchError(f"no data root: pass --root DIR or set ${ENVIRONMENT_VARIABLE}")
    return root


def run_fetch(args) -> int:
    from gmbench import plugins
    from gmbench.data.fetch import fetch
    from gmbench.data.paths import ENVIRONMENT_VARIABLE

    root = _root(args.root, required=True)
    result = fetch(args.name, root, mirror=args.mirror, progress=not args.no_progress and sys.stderr.isatty(),
                   force=args.force)
    for note in result.notes:
        print(f"note: {note}")
    # The real loader checks the result, so "fetched" means "gmbench run can read it".
    plugins.create("dataset", args.name, data_root=str(root)).check()
    what = "already present" if result.status == "present" else "fetched"
    print(f"{args.name}: {what} in {result.location}")
    absolute = os.path.abspath(os.path.expanduser(root))
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if not configured or os.path.abspath(os.path.expanduser(configured)) != absolute:
        print(f"use it with: gmbench run SUITE --data-root {absolute}   (or export {ENVIRONMENT_VARIABLE}={absolute})")
    return 0


def run_list(args) -> int:
    from pathlib import Path

    from gmbench.data.fetch import SOURCES

    root = _root(args.root, required=False)
    for source in SOURCES.values():
        state = ""
        if root is not None:
            state = "  [present]" if (Path(root).expanduser() / source.folder).exists() else "  [not downloaded]"
        print(f"{source.name}: -> <root>/{source.folder}/  ({source.homepage}){state}")
        for remote in source.files:
            size = f"{remote.size} bytes" if remote.size is not None else "size not published"
            checksum = f"sha256 {remote.sha256}" if remote.sha256 else "no published checksum (pinned on first download)"
            print(f"  {remote.name}  {size}  {checksum}")
            print(f"    from {remote.urls[0]}" + (f" (+{len(remote.urls) - 1} mirrors)" if len(remote.urls) > 1 else "")
                  + f"; checksum: {remote.checksum_source}")
    return 0
