"""The paper's Figure 2 for a 2D mixture: input, ReLU target, coarse a', dense fit a'', reduction.

Five heat maps with one shared colour scale: (a) the input mixture, (b) its
ReLU (the target), (c) the coarse approximation a' (Eq. 6), (d) the dense fit
a'' (Eq. 7) and (e) the reduction of the dense fit.
"""

from __future__ import annotations

import math

import torch

from gmbench import io, plugins
from gmbench import mixture as gm


def random_layer_output(n: int, seed: int) -> torch.Tensor:
    """A 2D mixture like a convolution output: signed weights, overlapping anisotropic Gaussians ``[1, 1, n, 7]``."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(1, 1, n, generator=g, dtype=torch.float64) + 0.3
    positions = torch.randn(1, 1, n, 2, generator=g, dtype=torch.float64) * 1.6
    factor = torch.randn(1, 1, n, 2, 2, generator=g, dtype=torch.float64) * 0.35 + 0.55 * torch.eye(2, dtype=torch.float64)
    return gm.pack(weights, positions, gm.covariance_from_factor(factor, 0.02))


def fitting_example_panels(m: torch.Tensor, transfer_fitting: str, reduction: str, n_out: int, resolution: int):
    """``(titles, images [5, R, R], extent)`` of the five panels for a ``[1, 1, N, 7]`` mixture."""
    fitting = plugins.create("transfer_fitting", transfer_fitting)
    reducer = plugins.create("reduction", reduction)
    dense = fitting.fit(m)
    coarse = fitting.coarse(m) if hasattr(fitting, "coarse") else None
    reduced = reducer.reduce(dense, n_out)
    centres = gm.positions(m)[0, 0]
    margin = 3 * math.sqrt(float(gm.mean_covariance_trace(m).max()))
    lower, upper = centres.min(0).values - margin, centres.max(0).values + margin
    xs = torch.linspace(float(lower[0]), float(upper[0]), resolution, dtype=m.dtype)
    ys = torch.linspace(float(lower[1]), float(upper[1]), resolution, dtype=m.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)

    def image(mixture):
        return gm.evaluate(mixture, grid).reshape(resolution, resolution)

    source = image(m)
    panels = [
        ("(a) input", source),
        ("(b) ReLU target", source.clamp_min(0)),
        ("(c) coarse a' (Eq. 6)", image(coarse) if coarse is not None else torch.full_like(source, float("nan"))),
        (f"(d) dense fit a'' ({transfer_fitting})", image(dense)),
        (f"(e) {reduction}, {n_out} Gaussians", image(reduced)),
    ]
    extent = (float(lower[0]), float(upper[0]), float(lower[1]), float(upper[1]))
    return [t for t, _ in panels], torch.stack([p for _, p in panels]), extent


def draw_fitting_example(path, m, transfer_fitting="dense", reduction="treehem", n_out=12, resolution=200) -> None:
    """Write the five-panel figure to ``path`` (PNG, atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles, images, extent = fitting_example_panels(m, transfer_fitting, reduction, n_out, resolution)
    finite = images[torch.isfinite(images)]
    limit = float(finite.abs().max()) if finite.numel() else 1.0
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8), constrained_layout=True)
    for ax, title, img in zip(axes, titles, images):
        shown = ax.imshow(img.numpy(), origin="lower", extent=extent, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="mixture value (shared scale)")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
