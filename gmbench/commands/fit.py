"""``gmbench fit DATASET --method NAME --gaussians N``: pre-fit input mixtures into the cache."""

from __future__ import annotations

import time

from gmbench.errors import GmbenchError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit input mixtures for a data set and store them in the cache",
        description=(
            "Load DATASET, fit N Gaussians per sample with an input-fitting plugin and store the mixtures "
            "in the fitted-mixture cache that `gmbench run` reads (a cached fit is reused, not repeated). "
            "Prints one line per split: samples, seconds, samples/s, cache file."
        ),
    )
    parser.add_argument("dataset", help="dataset plugin: digits, shapes3d, modelnet10, modelnet40, mnist, fashion_mnist")
    parser.add_argument("--method", default="kmeans", help="input_fitting plugin (default kmeans)")
    parser.add_argument("--gaussians", "-n", type=int, required=True, help="Gaussians per sample")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both", help="default both")
    parser.add_argument("--data-root", help="folder with the data set files (default $GMBENCH_DATA)")
    parser.add_argument("--cache-dir", help="fitted-mixture cache (default $GMBENCH_CACHE or ~/.cache/gmbench)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="input-fitting parameter (YAML value), repeatable, e.g. --param reg_covar=0.1")
    parser.add_argument("--dataset-param", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset parameter (YAML value), repeatable, e.g. --dataset-param n_points=2048")
    parser.add_argument("--device", help="where to fit: cpu, cuda (default: cpu; not part of the cache key)")
    parser.add_argument("--figure", metavar="PATH",
                        help="also draw the first 8 samples of the first split with their fitted Gaussians (PNG/PDF)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_assignments(items: list[str], option: str) -> dict:
    """``KEY=VALUE`` items as a mapping; each value read as a suite would read it (plain YAML
    data, YAML 1.2 floats such as ``1e-3``; see :mod:`gmbench.suite.yaml_lines`)."""
    from gmbench.suite import load_value

    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GmbenchError(f"{option} '{item}' must look like KEY=VALUE")
        try:
            result[key.strip()] = load_value(value, f"{option} {key.strip()}")
        except GmbenchError as error:
            # The location is the option, not a line: "--param x:1: ..." -> "--param x: ..."
            raise GmbenchError(str(error).replace(f"{option} {key.strip()}:1:", f"{option} {key.strip()}:", 1)) from None
    return result


def check_assignments(kind: str, name: str, params: dict, option: str) -> None:
    """The plugin's parameter check (names, types, choices) with the option in front."""
    from gmbench import plugins

    try:
        plugins.check_parameters(kind, name, params)
    except GmbenchError as error:
        path = getattr(error, "path", None) or ()
        given = f" {path[0]}" if path and path[0] in params else ""
        raise GmbenchError(f"{option}{given}: {error}") from None


def run(args) -> int:
    from gmbench import plugins
    from gmbench.cache import cache_path, fit_cached

    from gmbench.suite import MAX_GAUSSIANS
    from gmbench.tasks import dataset_parameters

    if not 1 <= args.gaussians <= MAX_GAUSSIANS:
        raise GmbenchError(f"--gaussians must be between 1 and {MAX_GAUSSIANS:,} (see docs/suites.md, 'Ranges'), got {args.gaussians:,}")
    params = parse_assignments(args.param, "--param")
    if args.device:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise GmbenchError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        params["device"] = args.device
    dataset_params = dataset_parameters(parse_assignments(args.dataset_param, "--dataset-param"), args.data_root or None)
    # Fail on a bad name or parameter before loading any data.
    check_assignments("dataset", args.dataset, dataset_params, "--dataset-param")
    check_assignments("input_fitting", args.method, params, "--param")
    dataset = plugins.create("dataset", args.dataset, **dataset_params)
    plugins.create("input_fitting", args.method, **params)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    first = None
    for name in splits:
        split = dataset.load(name)
        first = first or split
        path = cache_path(split, args.method, args.gaussians, params, args.cache_dir)
        cached = path.exists()
        started = time.perf_counter()
        mixtures = fit_cached(split, args.method, args.gaussians, params, args.cache_dir, progress=not args.no_progress)
        seconds = time.perf_counter() - started
        origin = "cached" if cached else f"fitted {len(split) / max(seconds, 1e-9):.1f} samples/s"
        print(f"{args.dataset}/{name}: {len(split)} samples -> {tuple(mixtures.shape)} in {seconds:.2f} s "
              f"({origin}) {path}")
    if args.figure:
        from gmbench.report.input_figures import save_split_figure

        save_split_figure(first, args.method, args.gaussians, params, args.figure)
        print(f"figure: {args.figure}")
    return 0
