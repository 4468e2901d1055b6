"""Benchmark session helpers: a summary of ``bench_evaluate`` ratios after the run."""


def pytest_terminal_summary(terminalreporter):
    import sys

    module = sys.modules.get("bench_evaluate")
    results = getattr(module, "RESULTS", None)
    if not results:
        return
    terminalreporter.section("evaluate_at_centroids: torch backend vs naive dense (this run)")
    terminalreporter.write_line(
        "Gpair/s, speedup and fb/f (forward+backward over forward) from the fastest round; cpu s: process CPU time per call"
    )
    terminalreporter.write_line(
        f"{'case':<14} {'N':>5} {'mode':<17} {'min s':>8} {'mean s':>8} {'cpu s':>8} {'Gpair/s':>8} {'peak MiB':>9} {'speedup':>8} {'mem ratio':>9} {'fb/f':>5}"
    )
    for (implementation, n, mode), info in sorted(results.items()):
        nan = float("nan")
        mean, best = info.get("mean_s", nan), info.get("min_s", nan)
        rate = info.get("pairs_per_s_best", nan)
        terminalreporter.write_line(
            f"{implementation:<14} {n:>5} {mode:<17} "
            f"{best:>8.3f} {mean:>8.3f} {info['cpu_s_mean']:>8.3f} {rate / 1e9:>8.3f} {info['peak_mb']:>9.1f} "
            f"{info.get('speedup_vs_naive', nan):>8.2f} {info.get('memory_ratio_vs_naive', nan):>9.1f} {info.get('fwd_bwd_over_fwd', nan):>5.2f}"
        )
