"""Per-layer fitting diagnostics of a GMCN (paper Appendix F, Tables 10-11).

For every block that reduces (all but the output block, which the paper's
tables omit too), the network is run on a batch and the three sampled RMSE
figures plus the exact L2 reduction error are computed by
:func:`gmbench.metrics.fitting_errors`:

* ``all``: reduced fit vs ``relu(convolution output)``;
* ``relu``: dense (transfer) fit vs ``relu(convolution output)``;
* ``reduction``: reduced fit vs dense fit;
* ``reduction_l2``: exact ``||reduced - dense||_2``, mean over mixtures.

The result is a tidy :class:`pandas.DataFrame` with columns
``layer`` (``"1->8"``, the block's input and output channels, as in the
paper's "Convolution Layer 1 -> 8"), ``method`` (transfer fitting +
reduction and its parameters), ``metric`` and ``value``.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from gmbench import metrics
from gmbench.models.gmcn import GMCN

METRICS = ("all", "relu", "reduction", "reduction_l2")


def method_label(model: GMCN) -> str:
    """``"dense+treehem(T=2)"``: the fitting pipeline of ``model``, parameters included."""
    params = ", ".join(f"{key}={value}" for key, value in sorted(model.reduction_params.items()))
    return f"{model.transfer_fitting}+{model.reduction}" + (f"({params})" if params else "")


@torch.no_grad()
def fitting_diagnostics(model: GMCN, m: Tensor, n_samples: int = 100_000, seed: int = 0) -> pd.DataFrame:
    """Fitting errors of every reducing block of ``model`` on the batch ``m [B, 1, N, K]``.

    The model runs in evaluation mode (pooling with its running averages) and
    is returned to its previous mode.  ``n_samples`` positions per mixture are
    drawn (seeded by ``seed`` plus the block index) from the Gaussians of the
    block's convolution output.  Rows: one per (reducing block, metric).
    """
    was_training = model.training
    model.eval()
    try:
        trace = model.trace(m)
    finally:
        model.train(was_training)
    method = method_label(model)
    rows = []
    for index, block in enumerate(trace):
        if block.spec.is_output:
            continue
        errors = metrics.fitting_errors(block.convolved, block.dense, block.reduced, n_samples=n_samples, seed=seed + index)
        layer = f"{block.spec.in_channels}->{block.spec.out_channels}"
        rows.extend({"layer": layer, "method": method, "metric": name, "value": float(errors[name])} for name in METRICS)
    return pd.DataFrame(rows, columns=["layer", "method", "metric", "value"])
