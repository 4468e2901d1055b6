"""The environment record of a run: what ran where (versions, commit, devices)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from gmbench import __version__, io, plugins
PACKAGES = ("torch", "torch-geometric", "pyg-lib", "torch-cluster", "triton", "numpy", "scipy", "scikit-learn", "pandas", "pyarrow", "pluggy", "matplotlib", "ray")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record(device: str = "cpu", backend: str | None = None, data_root: str | None = None) -> dict:
    """Versions of gmbench and its dependencies, git commit, Python, OS, CPU/GPU, threads.

    ``data_root``: the run's ``--data-root`` (kept out of the cells' configurations, so
    cell ids do not depend on where the data lives; ``gmbench report`` reads it here).
    """
    import torch

    record = {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gmbench": __version__,
        "git": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "backend": backend or "torch",
        "data_root": None if data_root is None else str(Path(data_root).resolve()),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "packages": {name: _version(name) for name in PACKAGES},
        "plugins": {f"{info.kind}:{info.name}": info.origin for info in plugins.describe_all()},
        "env": {key: os.environ[key] for key in ("OMP_NUM_THREADS", "GMBENCH_DATA", "GMBENCH_CACHE", "CUDA_VISIBLE_DEVICES") if key in os.environ},
    }
    try:  # which FPS / radius search the PointNet++ baseline uses (pyg-lib, torch-cluster or ours)
        from gmbench.baselines.sampling import sampling_backend

        record["pointnet2_sampling"] = sampling_backend()
    except ImportError:
        pass
    return record


def write_environment(
    path: str | os.PathLike, device: str = "cpu", backend: str | None = None, data_root: str | None = None
) -> dict:
    record = environment_record(device=device, backend=backend, data_root=data_root)
    io.write_json(path, record)
    return record
