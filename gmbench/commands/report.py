"""``gmbench report RUN_DIR``: the paper's tables and figures for a run folder."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables and figures of a run",
        description=(
            "Write report.md, tables (Markdown, CSV, LaTeX; mean ± std over seeds, with the paper's "
            "numbers beside them) and figures (PNG and PDF) for RUN_DIR, the --out folder of 'gmbench run'."
        ),
    )
    parser.add_argument("run_dir", help="run folder written by 'gmbench run'")
    parser.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    parser.add_argument("--compare", metavar="OTHER_RUN_DIR", help="put another run's numbers beside this one's, with deltas (cells matched by id)")
    parser.add_argument("--template", metavar="FILE", help="Markdown template with $header, $tables, $figures, $compare, $failed, $cells (see reports/)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from gmbench.report import write_report

    path = write_report(args.run_dir, args.out, compare=args.compare, template=args.template)
    print(f"report: {path}")
    from gmbench.loggers import log_report

    for name in log_report(args.run_dir, path):  # the loggers of the run (loggers.json), if any
        print(f"report logged to {name}")
    return 0
