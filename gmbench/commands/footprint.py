"""``gmbench footprint``: the theoretical memory footprint of a layout (paper Appendix A, Eq. 10)."""

from __future__ import annotations

import json
import sys

from gmbench.errors import GmbenchError

ROW_KEYS = ("B", "F_i", "F_o", "N_i", "N_o", "N_p", "N_k", "K", "D", "G")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "footprint",
        help="theoretical minimal memory footprint of a GMCN layout (paper Appendix A)",
        description=(
            "Theoretical minimal memory footprint of a GMCN (paper Appendix A, Eq. 10: "
            "K = F_i F_o N_k, D = B (F_o N_o + F_o N_p), G = 2 (K + D)); memory in MiB of "
            "float32 with 6 floats per 2D and 10 per 3D Gaussian. The default parameters "
            "with the paper's layout reproduce Table 6; with --integrated, Table 5."
        ),
    )
    parser.add_argument("layout", metavar="LAYOUT", help="layout such as '1/128->8/64->16/32->32/16->64/8->10'")
    parser.add_argument("--batch", type=int, default=32, metavar="B", help="batch size B (default 32)")
    parser.add_argument(
        "--kernel-gaussians", type=int, default=5, metavar="K", help="Gaussians per kernel N_k (default 5)"
    )
    parser.add_argument(
        "--dims", type=int, default=3, metavar="D",
        help="spatial dimension for the total line (default 3); columns M_2D and M_3D are always shown, "
        "other dimensions add an M_<D>D column",
    )
    parser.add_argument(
        "--integrated", action="store_true",
        help="integrated convolution-fitting: N_o = 2 N_p (Table 5); default N_o = F_i N_i N_k (Table 6)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON: {'rows': [...], 'total': {...}, ...}")
    parser.set_defaults(func=run)


def _memory_columns(dims: int) -> list[int]:
    from gmbench.footprint import PAPER_DIMS

    return list(PAPER_DIMS) + ([dims] if dims not in PAPER_DIMS else [])


def run(args) -> int:
    from gmbench.footprint import footprint

    if args.dims < 1:
        raise GmbenchError(f"--dims must be >= 1, got {args.dims}")
    result = footprint(args.layout, args.batch, args.kernel_gaussians, args.integrated)
    columns = _memory_columns(args.dims)
    if args.json:
        rows = []
        for index, row in enumerate(result.rows, start=1):
            entry = {"layer": index, **{key: getattr(row, key) for key in ROW_KEYS}}
            entry.update({f"M_{d}D": row.mebibytes(d) for d in columns})
            rows.append(entry)
        total = {"K": result.total_K, "D": result.total_D, "G": result.total_G}
        total.update({f"M_{d}D": result.total_mebibytes(d) for d in columns})
        total["parameters"] = result.parameters(args.dims)
        payload = {
            "layout": str(result.layout),
            "integrated": result.integrated,
            "dims": args.dims,
            "memory_unit": "MiB (float32)",
            "rows": rows,
            "total": total,
        }
        json.dump(payload, sys.stdout, indent=2)
        print()
        return 0

    header = [*ROW_KEYS, *(f"M_{d}D" for d in columns)]
    table = [
        [f"{getattr(row, key):,}" for key in ROW_KEYS] + [f"{row.mebibytes(d):.2f}" for d in columns]
        for row in result.rows
    ]
    total_row = ["total"] + [""] * 6 + [f"{result.total_K:,}", f"{result.total_D:,}", f"{result.total_G:,}"]
    total_row += [f"{result.total_mebibytes(d):.2f}" for d in columns]
    widths = [max(len(line[i]) for line in [header, *table, total_row]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    mode = "integrated convolution-fitting, N_o = 2 N_p" if result.integrated else "N_o = F_i N_i N_k"
    print(f"layout {result.layout} ({mode}); memory in MiB of float32")
    print(line(header))
    for cells in table:
        print(line(cells))
    print(line(total_row))
    print(
        f"total: {result.total_G:,} Gaussians = {result.total_mebibytes(args.dims):.2f} MiB in {args.dims}D; "
        f"{result.parameters(args.dims):,} kernel parameters"
    )
    return 0
