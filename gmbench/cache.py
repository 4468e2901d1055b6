"""The fitted-mixture cache: input fitting is expensive, so every suite cell reuses one fit.

One file per data set x split x input-fitting method x number of Gaussians x
method parameters x gmbench version, plus a fingerprint of the split's
contents (points, weights, labels), so that data-set parameters (``n_points``,
``seed``, a ``--smoke`` subset) never hit a stale file::

    <cache_dir>/<dataset>-<split>-<method>-n<N>-p<params hash>-d<data hash>-gmbench<version>.pt

Files are written atomically (temp file + rename, :mod:`gmbench.io`) and read
with ``torch.load(weights_only=True)``.  On load they are verified (metadata,
shape, dtype, NaN/inf); a file that fails is reported with a warning and
fitted again.  The cache folder is ``cache_dir``, else ``$GMBENCH_CACHE``,
else ``~/.cache/gmbench``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gmbench import __version__
from gmbench import mixture as gm
from gmbench import plugins
from gmbench.data.records import PointSetSplit
from gmbench.errors import GmbenchError
from gmbench.io import load_torch, save_torch

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "GMBENCH_CACHE"
# Parameters that choose where a fit runs, not what it computes.
UNKEYED_PARAMETERS = ("device",)
# One fitting call holds a few [chunk, P, N] float tensors; this bounds one of them.
CHUNK_ELEMENTS = 1 << 24


class CacheWarning(UserWarning):
    """A cache file was unreadable or failed verification and is being re-fitted."""


def default_cache_dir() -> Path:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "gmbench"


def split_fingerprint(split: PointSetSplit) -> str:
    """SHA-256 of the split's points, weights and labels (hex)."""
    digest = hashlib.sha256()
    for tensor in (split.points, split.weights, split.labels):
        if tensor is None:
            digest.update(b"none")
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _keyed_params(params: dict | None) -> dict:
    return {k: v for k, v in sorted((params or {}).items()) if k not in UNKEYED_PARAMETERS}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "unnamed"


def cache_path(split: PointSetSplit, method: str, n_components: int, params: dict | None = None,
               cache_dir: str | Path | None = None, fingerprint: str | None = None) -> Path:
    """The cache file of this fit (see the module docstring for the name)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    params_hash = hashlib.sha256(json.dumps(_keyed_params(params), sort_keys=True, default=str).encode()).hexdigest()
    fingerprint = fingerprint or split_fingerprint(split)
    name = (f"{_slug(split.dataset or 'dataset')}-{_slug(split.split or 'split')}-{_slug(method)}-n{n_components}"
            f"-p{params_hash[:10]}-d{fingerprint[:12]}-gmbench{__version__}.pt")
    return folder / name


def _metadata(split: PointSetSplit, method: str, n_components: int, params: dict | None, fingerprint: str) -> dict:
    return {
        "dataset": split.dataset, "split": split.split, "method": method, "n_components": int(n_components),
        "params": json.dumps(_keyed_params(params), sort_keys=True, default=str),
        "gmbench_version": __version__, "data_sha256": fingerprint,
    }


def verify(payload: Any, expected_meta: dict, expected_shape: tuple[int, ...]) -> Tensor:
    """Return the cached mixtures or raise :class:`GmbenchError` saying what is wrong."""
    if not isinstance(payload, dict) or "mixtures" not in payload or "meta" not in payload:
        raise GmbenchError("not a gmbench mixture cache file")
    meta = payload["meta"]
    for key, value in expected_meta.items():
        if meta.get(key) != value:
            raise GmbenchError(f"metadata '{key}' is {meta.get(key)!r}, expected {value!r}")
    mixtures = payload["mixtures"]
    if not isinstance(mixtures, Tensor):
        raise GmbenchError("'mixtures' is not a tensor")
    if tuple(mixtures.shape) != expected_shape:
        raise GmbenchError(f"shape {tuple(mixtures.shape)}, expected {expected_shape}")
    if mixtures.dtype != torch.float32:
        raise GmbenchError(f"dtype {mixtures.dtype}, expected torch.float32")
    if not bool(torch.isfinite(mixtures).all()):
        raise GmbenchError("contains NaN or inf")
    return mixtures


def fit_split(split: PointSetSplit, fitter, n_components: int, progress: bool = True,
              description: str = "fitting") -> Tensor:
    """Fit every sample of ``split`` in chunks (a progress bar on a terminal) -> ``[S, 1, N, K]`` float32 CPU."""
    from tqdm import tqdm

    s, p = split.points.shape[:2]
    chunk = max(1, CHUNK_ELEMENTS // max(1, p * n_components))
    parts = []
    disable = not progress or not sys.stderr.isatty()
    with tqdm(total=s, desc=description, unit="sample", disable=disable, leave=False) as bar:
        for start in range(0, s, chunk):
            stop = min(start + chunk, s)
            weights = None if split.weights is None else split.weights[start:stop]
            parts.append(fitter.fit(split.points[start:stop], n_components, weights=weights).float().cpu())
            bar.update(stop - start)
    return torch.cat(parts) if parts else torch.empty(0, 1, n_components, gm.n_features(split.dims))


def fit_cached(split: PointSetSplit, method: str, n_components: int, params: dict | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> Tensor:
    """Input mixtures ``[S, 1, N, 1+D+D*D]`` for ``split``, from the cache or fitted and cached.

    Fits with ``plugins.create("input_fitting", method, **params)``.  A cached
    file that cannot be read or fails verification is re-fitted with a
    :class:`CacheWarning`.
    """
    fitter = plugins.create("input_fitting", method, **(params or {}))
    fingerprint = split_fingerprint(split)
    path = cache_path(split, method, n_components, params, cache_dir, fingerprint)
    meta = _metadata(split, method, n_components, params, fingerprint)
    shape = (len(split), 1, int(n_components), gm.n_features(split.dims))
    if path.exists():
        try:
            mixtures = verify(load_torch(path), meta, shape)
            log.debug("input mixtures from cache %s", path)
            return mixtures
        except Exception as error:  # unreadable or wrong: never trust it, fit again
            warnings.warn(f"cache file {path} is unusable ({error}); fitting again", CacheWarning, stacklevel=2)
    description = f"{method} N={n_components} {split.dataset}/{split.split}"
    mixtures = fit_split(split, fitter, int(n_components), progress, description)
    verify({"mixtures": mixtures, "meta": meta}, meta, shape)
    save_torch(path, {"mixtures": mixtures, "meta": meta})
    log.debug("input mixtures cached in %s", path)
    return mixtures
