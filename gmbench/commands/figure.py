"""``gmbench figure fitting-example``: the paper's Figure 2 for a random 2D mixture (see
:mod:`gmbench.report.fitting_figure`)."""

from __future__ import annotations

import argparse

FIGURES = ("fitting-example",)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "figure",
        help="draw an explanatory figure",
        description="Draw an explanatory figure. fitting-example: paper Figure 2 (input, ReLU target, "
        "coarse a', dense fit a'', reduction) for a random 2D mixture, as a PNG.",
    )
    parser.add_argument("figure", choices=FIGURES, help="which figure")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mixture (default 0)")
    parser.add_argument("--n-gaussians", type=int, default=48, help="Gaussians in the input mixture (default 48)")
    parser.add_argument("--n-out", type=int, default=12, help="Gaussians after the reduction (default 12)")
    parser.add_argument("--transfer-fitting", default="dense", help="transfer_fitting plugin (default dense)")
    parser.add_argument("--reduction", default="treehem", help="reduction plugin (default treehem)")
    parser.add_argument("--resolution", type=int, default=200, help="pixels per side of each heat map (default 200)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gmbench.errors import GmbenchError

    if args.n_gaussians < 2 or args.n_out < 1 or args.resolution < 8:
        raise GmbenchError("--n-gaussians must be >= 2, --n-out >= 1 and --resolution >= 8; pick larger values")
    from gmbench.report.fitting_figure import draw_fitting_example, random_layer_output

    m = random_layer_output(args.n_gaussians, args.seed)
    draw_fitting_example(args.out, m, args.transfer_fitting, args.reduction, args.n_out, args.resolution)
    print(f"wrote {args.out}")
    return 0
