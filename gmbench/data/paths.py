"""Where data sets live: the plugin's ``data_root`` (the runner's ``--data-root``), else ``$GMBENCH_DATA``.

Nothing is ever downloaded; a missing folder raises a :class:`DataError` that
says which layout is expected and where to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

from gmbench.errors import DataError

ENVIRONMENT_VARIABLE = "GMBENCH_DATA"


def data_root(data_root: str | os.PathLike | None, dataset: str, expected: str) -> Path:
    """The data root folder for ``dataset``; ``expected`` describes the layout for the error message."""
    value = data_root if data_root not in (None, "") else os.environ.get(ENVIRONMENT_VARIABLE)
    if not value:
        raise DataError(
            f"data set '{dataset}' needs local files and no data root is set; pass data_root "
            f"(suite) / --data-root (CLI) or set ${ENVIRONMENT_VARIABLE} to a folder containing {expected}"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(f"data root '{root}' for data set '{dataset}' is not a folder; it should contain {expected}")
    return root


def first_existing(candidates: list[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None
