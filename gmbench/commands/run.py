"""``gmbench run SUITE``: validate a suite, run its cells (resumably), write results."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("gmbench.run")

RUNS_DIR = "runs"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a suite of experiments",
        description=(
            "Validate SUITE (nothing runs if it has an error), expand its matrix into cells and run "
            "the cells that are not finished yet. Results go to --out (default runs/<suite name>, "
            "runs/<suite name>-smoke with --smoke); running the same command again resumes there. "
            "Exit code 0: all cells ok; 1: some cell failed; 2: a user error (bad suite, bad option)."
        ),
    )
    parser.add_argument("suite", help="suite YAML file (e.g. my-suite.yaml) or the name of a packaged suite (e.g. quickstart; see gmbench suites)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
        help="give every cell this value (repeatable): PATH is a cell field or a dotted path into one, VALUE is read as YAML "
        "like the suite, e.g. --set training.epochs=5 --set training.lr=1e-3; applied after the matrix (it replaces an axis "
        "on PATH), checked like the file, recorded in the run folder (see docs/suites.md)",
    )
    parser.add_argument("--out", help="run folder (default: runs/<suite name>[-smoke])")
    parser.add_argument("--data-root", help="folder with the data sets (default: the cells' dataset_params.data_root, else $GMBENCH_DATA)")
    parser.add_argument("--cache-dir", help="fitted-mixture cache (default: $GMBENCH_CACHE or ~/.cache/gmbench)")
    parser.add_argument("--backend", help="compute backend plugin (default: the suite's backend, else torch)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--smoke", action="store_true", help="shrink every cell (48 train / 24 test samples, 1 epoch, N <= 16) to check the suite end to end")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel worker processes (default 1: in this process)")
    parser.add_argument("--executor", default="local", choices=("local", "ray"), help="how cells are executed: local (this machine, default) or ray (a Ray cluster; see docs/cluster.md)")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="train each cell data-parallel on N processes (one GPU each with --device cuda; gloo on CPU) (default 1)")
    cluster = parser.add_argument_group("Ray executor (--executor ray)")
    cluster.add_argument("--address", help="Ray cluster address (auto, HOST:6379, ray://HOST:10001); default: start a local Ray instance")
    cluster.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs Ray reserves per cell process (default 1)")
    cluster.add_argument("--gpus-per-cell", type=float, default=None, help="GPUs Ray reserves per cell process (default 1 with --device cuda, else 0)")
    cluster.add_argument("--memory-per-cell", type=float, default=None, metavar="GIB", help="host memory Ray reserves per cell, GiB (default: none)")
    cluster.add_argument("--max-retries", type=int, default=3, help="re-runs of a cell whose worker died; it resumes from its checkpoint (default 3)")
    parser.add_argument("--isolate", action="store_true", help="run each cell in a fresh worker process even with --jobs 1 (per-cell peak memory on CPU)")
    parser.add_argument("--update", action="store_true", help="accept a changed suite (or other --set values) in an existing --out: run new cells, drop removed ones from the results")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    tracking = parser.add_argument_group("experiment tracking (docs/tracking.md)")
    tracking.add_argument("--logger", action="append", default=[], metavar="NAME", help="also log the run to this logger plugin: tensorboard, mlflow (repeatable; added to the suite's loggers:)")
    tracking.add_argument("--mlflow-uri", metavar="URI", help="the mlflow logger's tracking store: sqlite:///FILE.db, file:DIR, http://HOST:5000 (default: $MLFLOW_TRACKING_URI, else sqlite in the run folder)")
    parser.set_defaults(func=run)


def _executor_options(args) -> dict:
    """Keyword arguments of the chosen executor; cluster flags without --executor ray are an error."""
    from gmbench.errors import GmbenchError

    if args.nproc_per_node < 1:
        raise GmbenchError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.executor == "ray":
        return dict(
            address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
            memory_gb_per_cell=args.memory_per_cell, max_retries=args.max_retries,
        )
    given = [flag for flag, value, default in (
        ("--address", args.address, None), ("--cpus-per-cell", args.cpus_per_cell, 1.0),
        ("--gpus-per-cell", args.gpus_per_cell, None), ("--memory-per-cell", args.memory_per_cell, None),
        ("--max-retries", args.max_retries, 3),
    ) if value != default]
    if given:
        raise GmbenchError(f"{', '.join(given)} only apply to --executor ray; add --executor ray or drop them")
    if args.nproc_per_node > 1 and args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.nproc_per_node:
            raise GmbenchError(
                f"--nproc-per-node {args.nproc_per_node} needs that many GPUs, this machine has {torch.cuda.device_count()}; "
                "lower it or use --executor ray on a cluster"
            )
    return {"isolate": True} if args.isolate else {}


def default_run_dir(suite_name: str, smoke: bool) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", suite_name).strip("-") or "suite"
    return Path(RUNS_DIR) / (f"{safe}-smoke" if smoke else safe)


def run(args) -> int:
    from gmbench.run import results
    from gmbench.errors import GmbenchError
    from gmbench.run.cell import RunOptions
    from gmbench.run.executors import create_executor
    from gmbench.run.suite_runner import run_suite
    from gmbench.suite import load_suite

    if args.jobs < 1:
        raise GmbenchError(f"--jobs must be >= 1, got {args.jobs}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise GmbenchError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    elif args.device != "cpu":
        raise GmbenchError(f"--device must be cpu, cuda or cuda:N, got '{args.device}'")
    from gmbench.commands.suites import resolve_suite

    # An existing file wins over a packaged name.
    suite = load_suite(resolve_suite(args.suite), smoke=args.smoke, overrides=args.overrides)
    from gmbench import backends

    # Fails early, with the reason, if the cells' backend cannot run here; switches nothing.
    backends.check(args.backend or suite.backend or "torch", **(suite.backend_params or {}))
    out = Path(args.out) if args.out else default_run_dir(suite.name, args.smoke)
    from gmbench.loggers import choose

    loggers = choose(suite.loggers, args.logger, args.mlflow_uri)  # a missing package: one line, before any cell
    given = "".join(f" --set {override}" for override in suite.overrides)
    print(f"suite {suite.name}{given}: {len(suite.cells)} cells -> {out}")
    if args.dry_run:
        for cell in suite.cells:
            print(f"  {cell.id}  {cell.title}")
        return 0
    options = RunOptions(
        device=args.device, backend=args.backend, data_root=args.data_root,
        cache_dir=args.cache_dir, progress=not args.no_progress and args.jobs == 1 and not args.isolate,
        nproc_per_node=args.nproc_per_node, loggers=loggers,
    )
    executor = create_executor(args.executor, jobs=args.jobs, **_executor_options(args))
    summary = run_suite(suite, out, options, executor=executor, update=args.update, progress=not args.no_progress)
    frame = results.load_results(out)
    print()
    print(summary_table(frame))
    print(
        f"\n{summary.total} cells: {summary.skipped} already done, {summary.ran} run, "
        f"{len(summary.failed)} failed; {summary.wall_time_s:.0f} s"
    )
    print(f"results: {out / results.RESULTS_CSV}")
    if not args.no_report:
        from gmbench.report import write_report

        try:
            path = write_report(out, out / "report")
            print(f"report:  {path}")
            from gmbench.loggers import log_report

            log_report(out, path, loggers)
        except Exception as error:  # noqa: BLE001 - the results are safe; the report can be redone
            log.warning("writing the report failed (%s: %s); run 'gmbench report %s' to retry", type(error).__name__, error, out)
    return 1 if summary.failed else 0


def summary_table(frame) -> str:
    """A plain-text table of the cells: label, dataset, N, seed, status and the headline metric."""
    columns = [c for c in ("cell_id", "label", "dataset", "n_gaussians", "seed", "status") if c in frame.columns]
    lines = []
    table = frame[columns].copy()
    headline = []
    for _, row in frame.iterrows():
        if row.get("status") != "ok":
            headline.append(str(row.get("error") or "")[:60])
        elif _present(row.get("test_accuracy")):
            headline.append(f"acc {100 * row['test_accuracy']:.1f}%  {row.get('train_time_s') or 0:.0f}s")
        elif _present(row.get("time_ms")):
            headline.append(f"{row['time_ms']:.2f} ms  rmse {row.get('rmse'):.4g}")
        elif _present(row.get("memory_mb")):
            headline.append(f"{row['memory_mb']:.2f} MiB")
        else:
            headline.append("")
    table["result"] = headline
    table = table.apply(lambda column: column.map(lambda v: str(v) if _present(v) else ""))
    widths = {c: max(len(c), *(len(v) for v in table[c])) for c in table.columns}
    lines.append("  ".join(c.ljust(widths[c]) for c in table.columns))
    for _, row in table.iterrows():
        lines.append("  ".join(row[c].ljust(widths[c]) for c in table.columns))
    return "\n".join(lines)


def _present(value) -> bool:
    """Not None, NaN or pandas' NA (nullable integer columns hold NA, whose truth value raises)."""
    import pandas as pd

    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array: present
        return True
