"""The ``footprint`` task (Tables 5-6): a layout's theoretical memory footprint, no training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gmbench import io
from gmbench.footprint import footprint
from gmbench.run import folder


def run(config: dict, cell_dir: Path, options, on_epoch) -> dict:
    """Tables 5-6: the theoretical memory footprint of a layout (no training)."""
    result = footprint(config["layout"], batch=config["batch"], kernel_gaussians=config["kernel_gaussians"], integrated=config["integrated"])
    rows = [dataclasses.asdict(row) | {"M_2D": row.mebibytes(2), "M_3D": row.mebibytes(3)} for row in result.rows]
    io.write_json(cell_dir / folder.FOOTPRINT_FILE, rows)
    return {
        "layout": config["layout"],
        "total_gaussians": result.total_G,
        "kernel_gaussians_total": result.total_K,
        "data_gaussians_total": result.total_D,
        "memory_mb": result.total_mebibytes(config["dims"]),
        "params": result.parameters(config["dims"]),
    }
