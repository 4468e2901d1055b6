r"""ReLU on the weights, "activation in parameter space" (paper Appendix G): plugin ``weight_relu``.

Beyond the paper's methods: Appendix G argues that applying the transfer
function to the weight vector,

.. math:: a''_i = \varphi(a_i) = \max(a_i, 0),

cannot replace the ReLU fitting, because it treats each Gaussian like a Dirac
impulse: a positive Gaussian overlapped by a negative one keeps its whole
weight, although the ReLU of the sum is smaller (or zero) where the negative
one dominates, and the negative Gaussian's contribution is simply dropped.
The plugin exists so that the claim is measured, not argued: the
``transfer-fitting`` suite times it and measures its RMSE against
``relu(mixture)`` beside the dense heuristic, and ``suites/weight-relu.yaml``
trains the GMCN with it on the embedded digits (accuracy and per-layer fitting
RMSE).  Positions and covariances are kept; the cost is ``O(N)``.

Shapes: ``fit(m [..., N, 1+D+D*D]) -> [..., N, 1+D+D*D]``.
"""

from __future__ import annotations

from torch import Tensor

from gmbench import mixture as gm
from gmbench.plugins import hookimpl


class WeightReLUFitting:
    """ReLU applied to the weights only (Appendix G's "activation in parameter space"); no parameters."""

    name = "weight_relu"

    def __repr__(self) -> str:
        return "WeightReLUFitting()"

    def fit(self, m: Tensor) -> Tensor:
        return gm.with_weights(m, gm.weights(m).clamp_min(0))


@hookimpl
def gmbench_transfer_fitting():
    return WeightReLUFitting
