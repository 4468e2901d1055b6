"""Figures of fitted input mixtures (paper Figures 5 and 6).

* :func:`plot_fitted_digits`: 2D mixtures as heat maps of their density;
* :func:`plot_fitted_cloud`: a 3D point cloud with each fitted Gaussian drawn
  as its 1-sigma ellipsoid, coloured by weight;
* :func:`input_fitting_figure`: the paper's comparison grid, one row per
  input-fitting method, one column per sample;
* :func:`save_split_figure`: what ``gmbench fit ... --figure PATH`` draws.

Mixtures are taken in data units (fit with ``normalize=False``) so that they
overlay the points; any ``[S, 1, N, K]`` works for the heat maps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmbench import mixture as gm
from gmbench import plugins
from gmbench.io import atomic_path


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and not matplotlib.is_interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_image(m: Tensor, extent: tuple[float, float, float, float], resolution: int = 64) -> Tensor:
    """``m [1, N, 7]`` (or ``[N, 7]``) evaluated on a ``resolution`` x ``resolution`` grid -> ``[res, res]``.

    ``extent`` is ``(x_min, x_max, y_min, y_max)``; row ``i`` of the image is ``y`` increasing downwards
    (image convention, as :mod:`gmbench.data.images` places pixel centres).
    """
    m = m.reshape(1, 1, *m.shape[-2:]).double()
    xs = torch.linspace(extent[0], extent[1], resolution, dtype=torch.float64)
    ys = torch.linspace(extent[2], extent[3], resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)
    return gm.evaluate(m, grid).reshape(resolution, resolution).float()


def plot_fitted_digits(mixtures: Tensor, titles: list[str] | None = None, columns: int = 8,
                       extent: tuple[float, float, float, float] | None = None, resolution: int = 64, axes=None):
    """Heat maps of 2D mixtures ``[S, 1, N, 7]``; returns the figure.

    ``extent`` defaults to the positions' bounding box (over all samples) plus 10 %.
    """
    plt = _pyplot()
    s = mixtures.shape[0]
    if extent is None:
        pos = gm.positions(mixtures).reshape(-1, 2)
        low, high = pos.min(0).values, pos.max(0).values
        margin = 0.1 * (high - low).max().item() + 1e-6
        extent = (low[0].item() - margin, high[0].item() + margin, low[1].item() - margin, high[1].item() + margin)
    if axes is None:
        rows = math.ceil(s / columns)
        figure, axes = plt.subplots(rows, min(columns, s), figsize=(1.6 * min(columns, s), 1.6 * rows), squeeze=False)
        axes = axes.reshape(-1)
    else:
        figure = axes[0].figure
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= s:
            continue
        image = density_image(mixtures[i], extent, resolution)
        ax.imshow(image.numpy(), cmap="inferno", extent=(extent[0], extent[1], extent[3], extent[2]))
        if titles:
            ax.set_title(titles[i], fontsize=7)
    return figure


def ellipsoid_surface(mean: Tensor, cov: Tensor, resolution: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Grid ``(x, y, z)`` of the 1-sigma ellipsoid of ``N(mean, cov)`` in 3D."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    u = torch.linspace(0, 2 * math.pi, resolution * 2, dtype=torch.float64)
    v = torch.linspace(0, math.pi, resolution, dtype=torch.float64)
    sphere = torch.stack([torch.outer(torch.cos(u), torch.sin(v)), torch.outer(torch.sin(u), torch.sin(v)),
                          torch.outer(torch.ones_like(u), torch.cos(v))], -1)  # [U, V, 3]
    points = sphere @ (eigenvectors * eigenvalues.clamp_min(0).sqrt()).T + mean.double()
    return points[..., 0], points[..., 1], points[..., 2]


def plot_fitted_cloud(points: Tensor, mixture: Tensor, ax=None, title: str | None = None, show_points: bool = True,
                      max_gaussians: int = 256):
    """A 3D cloud ``points [P, 3]`` with the Gaussians of ``mixture [1, N, 13]`` (data units) as ellipsoids.

    Gaussians are coloured by weight (zero-weight padding is skipped); returns the axes.
    """
    plt = _pyplot()
    if ax is None:
        figure = plt.figure(figsize=(4, 4))
        ax = figure.add_subplot(projection="3d")
    m = mixture.reshape(-1, mixture.shape[-1])
    weights = gm.weights(m)
    order = torch.argsort(weights, descending=True)[:max_gaussians]
    colours = plt.get_cmap("viridis")
    top = weights.max().clamp_min(1e-12)
    if show_points:
        p = points.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=0.3, c="0.5", alpha=0.3, depthshade=False)
    for k in order.tolist():
        if weights[k] <= 0:
            continue
        x, y, z = ellipsoid_surface(gm.positions(m)[k], gm.covariances(m)[k])
        ax.plot_surface(x.numpy(), y.numpy(), z.numpy(), color=colours(float(weights[k] / top)), alpha=0.6,
                        linewidth=0, shade=True)
    lim = points.abs().max().item() if points.numel() else 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_zlim(-lim, lim)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def input_fitting_figure(points: Tensor, weights: Tensor | None, methods: dict[str, dict], n_components: int,
                         path=None):
    """Paper Figures 5/6: one row per method (``{name: params}``), one column per sample ``points [S, P, D]``.

    Every method is run with ``normalize=False`` so mixtures overlay the points.  Returns the figure
    (saved to ``path`` when given).
    """
    plt = _pyplot()
    s, _, d = points.shape
    figure = plt.figure(figsize=(2.2 * s, 2.2 * len(methods)))
    for row, (name, params) in enumerate(methods.items()):
        fitter = plugins.create("input_fitting", name, **{**params, "normalize": False})
        m = fitter.fit(points, n_components, weights=weights)
        for col in range(s):
            index = row * s + col + 1
            title = f"{name}" if col == 0 else None
            if d == 3:
                ax = figure.add_subplot(len(methods), s, index, projection="3d")
                plot_fitted_cloud(points[col], m[col], ax=ax, title=title, show_points=False)
            else:
                ax = figure.add_subplot(len(methods), s, index)
                low, high = points[col].min(0).values, points[col].max(0).values
                extent = (low[0].item() - 0.5, high[0].item() + 0.5, low[1].item() - 0.5, high[1].item() + 0.5)
                plot_fitted_digits(m[col : col + 1], axes=[ax], extent=extent)
                if title:
                    ax.set_title(title, fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure


def save_split_figure(split, method: str, n_components: int, params: dict, path, samples: int = 8) -> None:
    """``gmbench fit --figure``: the first ``samples`` samples of ``split`` fitted with one method."""
    count = min(samples, len(split))
    params = {k: v for k, v in params.items() if k != "device"}
    weights = None if split.weights is None else split.weights[:count]
    figure = input_fitting_figure(split.points[:count], weights, {method: params}, n_components)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format=str(path).rsplit(".", 1)[-1] if "." in str(path) else "png")
    _pyplot().close(figure)
