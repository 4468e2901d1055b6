"""Input fitting throughput and quality vs scikit-learn's ``GaussianMixture``.

Run:  python -m pytest benchmarks/bench_input_fitting.py -q -s

Setting: 128 Gaussians fitted to clouds of 2048 points (``shapes3d``, unit
sphere), a batch of 64 clouds, CPU, float32.  Each gmbench method fits the
whole batch in one call; the scikit-learn reference fits ``SKLEARN_CLOUDS`` of
the same clouds one by one (``GaussianMixture`` has no batch mode) at *equal
iterations* (``tol=0``, same ``max_iter``, same ``reg_covar``):

=============  =================================================  ==========================================
gmbench        configuration                                      scikit-learn reference
=============  =================================================  ==========================================
kmeans         k-means++ + <=20 Lloyd + hard M step + 1 EM step   ``init_params="kmeans"`` (KMeans, then an
                                                                  M step), ``max_iter=1``
kmeans_em      k-means++ + <=20 Lloyd + hard M + 20 EM steps      ``init_params="kmeans"``, ``max_iter=20``
random_em      random points + hard M + 20 EM steps               ``init_params="random_from_data"``, 20
eckart         5 per node x 3 levels = 125, 20 EM steps / level   125 Gaussians, ``init_params="kmeans"``, 20
=============  =================================================  ==========================================

Log-likelihood: mean over points of :math:`\\log p(x)` of the unnormalised fit
(``normalize=False``), evaluated in float64, on the ``SKLEARN_CLOUDS`` clouds
both fitted.  The summary prints clouds/s, the speed-up over scikit-learn and
the log-likelihood difference (gmbench - scikit-learn; >= 0 is equal or better).
Throughput is given for wall time (pytest-benchmark) and for process CPU time
(``time.process_time``; both sides run single-threaded with
``OMP_NUM_THREADS=1``), because on a shared machine the wall time mostly
measures the other tenants.
Target: speed-up >= 10 at equal or better log-likelihood.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from gmbench import plugins
from gmbench.input_fitting import em

CLOUDS = 64
SKLEARN_CLOUDS = 8
POINTS = 2048
GAUSSIANS = 128
EM_STEPS = 20
REG_COVAR = 1e-3
RESULTS: dict[str, dict] = {}

METHODS = {
    "kmeans": ({"em_steps": 1}, GAUSSIANS, dict(init_params="kmeans", max_iter=1)),
    "kmeans_em": ({"iterations": EM_STEPS, "tolerance": 0.0}, GAUSSIANS, dict(init_params="kmeans", max_iter=EM_STEPS)),
    "random_em": ({"iterations": EM_STEPS, "tolerance": 0.0}, GAUSSIANS,
                  dict(init_params="random_from_data", max_iter=EM_STEPS)),
    "eckart": ({"iterations": EM_STEPS, "tolerance": 0.0, "per_node": 5}, 125,
               dict(init_params="kmeans", max_iter=EM_STEPS)),
}


@pytest.fixture(scope="module")
def clouds() -> torch.Tensor:
    split = plugins.create("dataset", "shapes3d", n_points=POINTS, samples_per_class=7).load("train")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:CLOUDS]
    return split.points[order].contiguous()


def mean_log_likelihood(points: torch.Tensor, pi, mu, cov) -> np.ndarray:
    x = points.double()
    params = em.MixtureParameters(torch.as_tensor(pi).double(), torch.as_tensor(mu).double(),
                                  torch.as_tensor(cov).double())
    return em.mean_log_likelihood(x, em.normalize_point_weights(x, None), params).numpy()


def cpu_timed(function, times: list):
    def run(*args):
        started = time.process_time()
        result = function(*args)
        times.append(time.process_time() - started)
        return result

    return run


def fit_sklearn(points: torch.Tensor, n_components: int, options: dict):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    pis, mus, covs = [], [], []
    for cloud in points.double().numpy():
        model = GaussianMixture(n_components, covariance_type="full", reg_covar=REG_COVAR, tol=0.0, n_init=1,
                                random_state=0, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(cloud)
        pis.append(model.weights_)
        mus.append(model.means_)
        covs.append(model.covariances_)
    return np.stack(pis), np.stack(mus), np.stack(covs)


@pytest.mark.parametrize("method", list(METHODS))
def test_sklearn_reference(benchmark, clouds, method):
    _, n_components, options = METHODS[method]
    subset = clouds[:SKLEARN_CLOUDS]
    cpu: list[float] = []
    result = benchmark.pedantic(cpu_timed(fit_sklearn, cpu), args=(subset, n_components, options), rounds=1,
                                iterations=1)
    seconds = benchmark.stats.stats.mean
    ll = mean_log_likelihood(subset, *result)
    RESULTS.setdefault(method, {}).update(sklearn_clouds_per_s=SKLEARN_CLOUDS / seconds, sklearn_ll=float(ll.mean()),
                                          sklearn_cpu_clouds_per_s=SKLEARN_CLOUDS / min(cpu))
    benchmark.extra_info.update(clouds_per_s=SKLEARN_CLOUDS / seconds, cpu_clouds_per_s=SKLEARN_CLOUDS / min(cpu),
                                mean_log_likelihood=float(ll.mean()))


@pytest.mark.parametrize("method", list(METHODS))
def test_gmbench_batched(benchmark, clouds, method):
    params, n_components, _ = METHODS[method]
    fitter = plugins.create("input_fitting", method, reg_covar=REG_COVAR, normalize=False, **params)
    fitter.fit_parameters(clouds[:2], n_components)  # warm-up
    cpu: list[float] = []
    fitted = benchmark.pedantic(cpu_timed(fitter.fit_parameters, cpu), args=(clouds, n_components), rounds=2,
                                iterations=1)
    seconds = benchmark.stats.stats.mean
    ll = mean_log_likelihood(clouds, fitted.pi, fitted.mu, fitted.cov)
    RESULTS.setdefault(method, {}).update(
        clouds_per_s=CLOUDS / seconds, cpu_clouds_per_s=CLOUDS / min(cpu), ll_subset=float(ll[:SKLEARN_CLOUDS].mean()),
        ll_all=float(ll.mean()))
    benchmark.extra_info.update(clouds_per_s=CLOUDS / seconds, cpu_clouds_per_s=CLOUDS / min(cpu),
                                mean_log_likelihood=float(ll.mean()))


def teardown_module(module):
    if not RESULTS:
        return
    print(f"\n\ninput fitting: {CLOUDS} clouds x {POINTS} points, {GAUSSIANS} Gaussians, "
          f"torch threads {torch.get_num_threads()}; scikit-learn on {SKLEARN_CLOUDS} of them")
    print(f"{'method':<10} {'wall: ours/s':>12} {'sklearn/s':>10} {'speed-up':>9} {'cpu: ours/s':>12} "
          f"{'sklearn/s':>10} {'speed-up':>9} {'LL':>7} {'LL sklearn':>11} {'LL diff':>8}")
    for method, info in RESULTS.items():
        if "clouds_per_s" not in info or "sklearn_clouds_per_s" not in info:
            continue
        ours, theirs = info["clouds_per_s"], info["sklearn_clouds_per_s"]
        ours_cpu, theirs_cpu = info["cpu_clouds_per_s"], info["sklearn_cpu_clouds_per_s"]
        print(f"{method:<10} {ours:>12.2f} {theirs:>10.2f} {ours / theirs:>9.1f} {ours_cpu:>12.2f} {theirs_cpu:>10.2f} "
              f"{ours_cpu / theirs_cpu:>9.1f} {info['ll_subset']:>7.3f} {info['sklearn_ll']:>11.3f} "
              f"{info['ll_subset'] - info['sklearn_ll']:>+8.3f}")
