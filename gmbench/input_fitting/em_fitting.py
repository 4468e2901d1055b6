"""The EM input-fitting plugins ``kmeans_em`` and ``random_em`` (paper Section 5.3, Table 4)."""

from __future__ import annotations

import torch

from gmbench.input_fitting.base import InputFitting
from gmbench.input_fitting.em import m_step, run_em
from gmbench.input_fitting.kmeans import SEEDINGS, hard_m_step, lloyd, random_points, seed_centres
from gmbench.plugins import hookimpl


def _check_em(iterations: int, tolerance: float) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")


class KMeansEMFitting(InputFitting):
    """k-means initialisation followed by EM to convergence (Table 4 "k-means+EM").

    Initialisation as scikit-learn's ``init_params="kmeans"``: ``init`` seeding,
    ``kmeans_iterations`` Lloyd iterations, one hard-assignment M step.  Then up
    to ``iterations`` EM steps; a sample stops when its mean log-likelihood
    (standardised coordinates) changes by less than ``tolerance``
    (``tolerance=0``: always ``iterations`` steps).
    """

    name = "kmeans_em"

    def __init__(self, iterations: int = 100, tolerance: float = 1e-3, init: str = "kmeans++",
                 kmeans_iterations: int = 20, reg_covar: float | str = "auto", normalize: bool = True,
                 seed: int = 0, dtype: str = "float32", device: str | None = None):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        _check_em(iterations, tolerance)
        if init not in SEEDINGS:
            raise ValueError(f"init must be one of {', '.join(SEEDINGS)}, got {init!r}")
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)
        self.init = init
        self.kmeans_iterations = int(kmeans_iterations)

    def fit_standardized(self, x, w, n_components, reg_covar, generator):
        centres = lloyd(x, w, seed_centres(x, w, n_components, self.init, generator), self.kmeans_iterations)
        params = hard_m_step(x, w, centres, reg_covar)
        params, _, _ = run_em(x, w, params, reg_covar, self.iterations, self.tolerance)
        return params


class RandomEMFitting(InputFitting):
    """Random initialisation followed by EM to convergence (Table 4 "rand+EM").

    ``init="points"``: the means are ``N`` distinct points drawn with
    probability proportional to the point weights, the first M step uses hard
    nearest-mean assignments.  ``init="responsibilities"``: scikit-learn's
    ``init_params="random"`` (uniformly random responsibilities, normalised per
    point, then an M step), which starts every mean near the centroid and
    needs many more iterations.  Then EM as in ``kmeans_em``.
    """

    name = "random_em"

    def __init__(self, iterations: int = 100, tolerance: float = 1e-3, init: str = "points",
                 reg_covar: float | str = "auto", normalize: bool = True, seed: int = 0,
                 dtype: str = "float32", device: str | None = None):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        _check_em(iterations, tolerance)
        if init not in ("points", "responsibilities"):
            raise ValueError(f"init must be 'points' or 'responsibilities', got {init!r}")
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)
        self.init = init

    def fit_standardized(self, x, w, n_components, reg_covar, generator):
        if self.init == "points":
            params = hard_m_step(x, w, random_points(x, w, n_components, generator), reg_covar)
        else:
            shape = (*x.shape[:2], n_components)
            r = torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)
            params = m_step(x, w, r / r.sum(-1, keepdim=True), reg_covar)
        params, _, _ = run_em(x, w, params, reg_covar, self.iterations, self.tolerance)
        return params


@hookimpl
def gmbench_input_fitting():
    return [KMeansEMFitting, RandomEMFitting]
