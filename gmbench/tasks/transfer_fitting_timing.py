"""The ``transfer_fitting_timing`` task (Table 7): time and error of one transfer-fitting method."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gmbench import mixture, plugins
from gmbench.training import peak_memory_mb, reset_peak_memory


def random_test_mixtures(n_mixtures: int, n_gaussians: int, dims: int, seed: int) -> torch.Tensor:
    """Mixtures ``[n_mixtures, 1, n_gaussians, 1+D+D*D]`` like a convolution's output:
    weights ~ U(-1, 1), centres ~ U(-3, 3)^D, covariances ``A A^T + 0.05 I`` with
    ``A ~ N(0, 0.5^2)`` (so half the mass is negative and the ReLU matters)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n_mixtures, 1, n_gaussians)
    weights = torch.rand(shape, generator=generator) * 2 - 1
    positions = torch.rand((*shape, dims), generator=generator) * 6 - 3
    factor = torch.randn((*shape, dims, dims), generator=generator) * 0.5
    covariances = factor @ factor.transpose(-1, -2) + 0.05 * torch.eye(dims)
    return mixture.pack(weights, positions, covariances)


# RMSE of the transfer fitting: on the first RMSE_MIXTURES mixtures only (it is
# O(mixtures x samples x N) and the timing, not the error, is Table 7's subject).
RMSE_MIXTURES = 32


def run(config: dict, cell_dir: Path, options, on_epoch) -> dict:
    """Table 7: time (and error) of one transfer-fitting method on random mixtures."""
    device = torch.device(options.device)
    m = random_test_mixtures(config["n_mixtures"], config["n_gaussians"], config["dims"], config["seed"]).to(device)
    method = plugins.create("transfer_fitting", config["transfer_fitting"], **config["transfer_fitting_params"])
    reset_peak_memory(device)
    with torch.no_grad():
        method.fit(m[:2])  # warm-up (lazy initialisation, kernel compilation)
        times = []
        for _ in range(config["repeats"]):
            _synchronize(device)
            started = time.perf_counter()
            fitted = method.fit(m)
            _synchronize(device)
            times.append(time.perf_counter() - started)
        subset, fitted_subset = m[:RMSE_MIXTURES], fitted[:RMSE_MIXTURES]
        generator = torch.Generator().manual_seed(config["seed"])
        # Sample positions uniformly in the box around all centres (plus 3 standard deviations).
        low, high = -3.0 - 3 * 1.0, 3.0 + 3 * 1.0
        points = (torch.rand((config["rmse_samples"], config["dims"]), generator=generator) * (high - low) + low).to(device)
        target = torch.relu(mixture.evaluate(subset, points))
        error = mixture.evaluate(fitted_subset, points) - target
        rmse = float(error.pow(2).mean().sqrt())
    times.sort()
    return {
        "time_ms": 1000 * times[len(times) // 2],
        "time_ms_min": 1000 * times[0],
        "rmse": rmse,
        "peak_memory_mb": peak_memory_mb(device),
        "n_gaussians": config["n_gaussians"],
        "transfer_fitting": config["transfer_fitting"] + (
            "(" + ",".join(f"{k}={v}" for k, v in sorted(config["transfer_fitting_params"].items())) + ")"
            if config["transfer_fitting_params"] else ""
        ),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
