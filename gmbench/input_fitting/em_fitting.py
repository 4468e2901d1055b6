"""The EM input-fitting plugins ``kmeans_em`` and ``random_em`` (paper Section 5.3, Table 4)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from gmbench.input_fitting.base import FitDevice, FitDtype, FitSeed, InputFitting, Normalize, RegCovar
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

    def __init__(
        self,
        iterations: Annotated[int, "at most this many EM steps"] = 100,
        tolerance: Annotated[float, "a sample stops when its mean log-likelihood changes less (0: always all steps)"] = 1e-3,
        init: Annotated[Literal["fps", "kmeans++"], "centre seeding of the k-means initialisation"] = "kmeans++",
        kmeans_iterations: Annotated[int, "Lloyd iterations of the initialisation"] = 20,
        reg_covar: RegCovar = "auto",
        normalize: Normalize = True,
        seed: FitSeed = 0,
        dtype: FitDtype = "float32",
        device: FitDevice = None,
    ):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        _check_em(iterations, tolerance)
        if init not in SEEDINGS:
            raise ValueError(f"init must be one of {', '.join(SEEDINGS)}, got {init!r}")
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)
        self.init = init
        self.kmeans_iterations = int(kmeans_iterations)

    def min_memory_elements(self, n_points, n_components, dims):
        # The final log-likelihood's E step holds the full [P, N] responsibilities.
        return super().min_memory_elements(n_points, n_components, dims) + n_points * n_components

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

    def __init__(
        self,
        iterations: Annotated[int, "at most this many EM steps"] = 100,
        tolerance: Annotated[float, "a sample stops when its mean log-likelihood changes less (0: always all steps)"] = 1e-3,
        init: Annotated[Literal["points", "responsibilities"], "points: N weighted random points as means; responsibilities: scikit-learn's random"] = "points",
        reg_covar: RegCovar = "auto",
        normalize: Normalize = True,
        seed: FitSeed = 0,
        dtype: FitDtype = "float32",
        device: FitDevice = None,
    ):
        super().__init__(reg_covar=reg_covar, normalize=normalize, seed=seed, dtype=dtype, device=device)
        _check_em(iterations, tolerance)
        if init not in ("points", "responsibilities"):
            raise ValueError(f"init must be 'points' or 'responsibilities', got {init!r}")
        self.iterations = int(iterations)
        self.tolerance = float(tolerance)
        self.init = init

    def min_memory_elements(self, n_points, n_components, dims):
        # [P, N] responsibilities (twice for the random ones of init="responsibilities").
        full = (2 if self.init == "responsibilities" else 1) * n_points * n_components
        return super().min_memory_elements(n_points, n_components, dims) + full

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
