r"""Least-squares ReLU fitting (paper Appendix B, Eq. 11-12).

Positions and covariances are kept; the weights ``y`` solve ``A y = t`` in the
least-squares sense, where ``A[j, i] = gamma_i(D_j)`` is Gaussian ``i`` with
weight 1 evaluated at sample position ``D_j`` and ``t_j = relu(gm(D_j))``.

Sample sets ``D`` (parameter ``samples``):

* ``"centres"``: ``D = B``, the Gaussians' own centres (``A`` is square and may
  be rank deficient, see the paper);
* ``"random"``: ``M = ceil(random_factor * N)`` positions drawn uniformly in the
  bounding box of the centres;
* ``"centres+random"``: both, ``N + M`` rows.

Solvers (parameter ``solver``): ``"lstsq"`` (``torch.linalg.lstsq``; its
backward, available in current PyTorch unlike in the paper's version, assumes
``A`` has full column rank: with ``D = B`` and nearly coincident Gaussians the
gradient is unreliable) and ``"pinv"`` (``torch.linalg.pinv``; the minimum-norm
solution, differentiable also for rank-deficient ``A`` away from rank changes,
slower).  Both pass ``gradcheck`` on small full-rank problems.  The
random positions are drawn from a generator seeded with ``seed``, so the fit is
a deterministic function of the mixture.

Cost: ``A`` is ``[G, M, N]`` per batch of mixtures: ``O(M N)`` memory and
``O(M N^2)`` time per mixture (the reason the paper uses the heuristic);
mixtures are processed in chunks of at most ``chunk_elements`` entries of ``A``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench.plugins import hookimpl

SAMPLE_SETS = ("centres", "random", "centres+random")
SOLVERS = ("lstsq", "pinv")


def unit_gaussian_matrix(m: Tensor, points: Tensor) -> Tensor:
    """``A[g, j, i] = g_i(points[g, j])`` with weight 1: ``[G, N, K], [G, M, D] -> [G, M, N]`` (Eq. 12)."""
    d = gm.n_dims(m)
    precision, logdet = gm.symmetric_inverse_and_logdet(gm.covariances(m))
    diff = points.unsqueeze(-2) - gm.positions(m).unsqueeze(-3)  # [G, M, N, D]
    exponent = -0.5 * torch.einsum("gmna,gnab,gmnb->gmn", diff, precision, diff)
    norm = torch.exp(gm.log_normaliser(logdet, d))
    return torch.exp(exponent) * norm.unsqueeze(-2)


def sample_positions(m: Tensor, samples: str, random_factor: float, generator: torch.Generator) -> Tensor:
    """Sample set ``D`` ``[G, M, D]`` for mixtures ``[G, N, K]``."""
    centres = gm.positions(m)
    if samples == "centres":
        return centres
    g, n, d = centres.shape
    count = max(1, math.ceil(random_factor * n))
    lower = centres.amin(1, keepdim=True)
    upper = centres.amax(1, keepdim=True)
    u = torch.rand(g, count, d, generator=generator, dtype=m.dtype).to(m.device)
    random = lower + u * (upper - lower)
    return random if samples == "random" else torch.cat([centres, random], 1)


def fit_relu_lstsq(
    m: Tensor,
    samples: str = "centres",
    random_factor: float = 1.0,
    solver: str = "lstsq",
    seed: int = 0,
    chunk_elements: int = 1 << 25,
) -> Tensor:
    """Least-squares ReLU fit (Eq. 11): ``[..., N, K] -> [..., N, K]`` with new weights."""
    if samples not in SAMPLE_SETS:
        raise ValueError(f"samples must be one of {', '.join(SAMPLE_SETS)}, got {samples!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    batch, n, k = m.shape[:-2], m.shape[-2], m.shape[-1]
    flat = m.reshape(-1, n, k)
    generator = torch.Generator().manual_seed(seed)
    points = sample_positions(flat, samples, random_factor, generator)
    rows = points.shape[1]
    chunk = max(1, chunk_elements // max(1, rows * n))
    weights = []
    for start in range(0, flat.shape[0], chunk):
        part, part_points = flat[start : start + chunk], points[start : start + chunk]
        a = unit_gaussian_matrix(part, part_points)
        t = (a @ gm.weights(part).unsqueeze(-1)).clamp_min(0)  # relu(gm(D_j))
        if solver == "lstsq":
            y = torch.linalg.lstsq(a, t).solution
        else:
            y = torch.linalg.pinv(a) @ t
        weights.append(y.squeeze(-1))
    return gm.with_weights(flat, torch.cat(weights, 0)).reshape(*batch, n, k)


class LeastSquaresReLUFitting:
    """Least-squares ReLU fitting of Appendix B: solve A y = relu(gm(D)) for the weights.

    ``samples`` "centres", "random" or "centres+random" (sample set D);
    ``random_factor`` random samples per Gaussian (M = ceil(random_factor * N));
    ``solver`` "lstsq" or "pinv"; ``seed`` for the random samples;
    ``chunk_elements`` bound on the entries of A held at once.
    """

    name = "lstsq"

    def __init__(
        self,
        samples: Annotated[Literal["centres", "random", "centres+random"], "the sample set D of Appendix B"] = "centres",
        random_factor: Annotated[float, "random samples per Gaussian: M = ceil(random_factor * N)"] = 1.0,
        solver: Annotated[Literal["lstsq", "pinv"], "how A y = relu(gm(D)) is solved"] = "lstsq",
        seed: Annotated[int, "seed of the random samples"] = 0,
        chunk_elements: Annotated[int, "bound on the entries of A held at once"] = 1 << 25,
    ):
        if samples not in SAMPLE_SETS:
            raise ValueError(f"samples must be one of {', '.join(SAMPLE_SETS)}, got {samples!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if random_factor <= 0:
            raise ValueError(f"random_factor must be positive, got {random_factor!r}")
        if chunk_elements < 1:
            raise ValueError("chunk_elements must be positive")
        self.samples, self.random_factor, self.solver = samples, float(random_factor), solver
        self.seed, self.chunk_elements = int(seed), int(chunk_elements)

    def __repr__(self) -> str:
        return f"LeastSquaresReLUFitting(samples={self.samples!r}, solver={self.solver!r})"

    def fit(self, m: Tensor) -> Tensor:
        return fit_relu_lstsq(m, self.samples, self.random_factor, self.solver, self.seed, self.chunk_elements)


@hookimpl
def gmbench_transfer_fitting():
    return LeastSquaresReLUFitting
