"""Grey-value images as weighted 2D point sets (the record type of :mod:`gmbench.data.records`).

Coordinates are pixel centres in pixel units: pixel (row ``i``, column ``j``)
is the point ``(x, y) = (j + 0.5, i + 0.5)`` (x right, y down, as the image is
displayed).  Two representations:

* ``n_points=None``: every non-zero pixel is a point weighted by its intensity
  in ``[0, 1]``; sets are padded to the largest count with weight 0.
* ``n_points=K``: ``K`` jittered samples per image, drawn with probability
  proportional to intensity and moved uniformly within their pixel (the GMCN
  authors fitted MNIST to 4000 such samples); no weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pixel_point_sets(images: Tensor) -> tuple[Tensor, Tensor]:
    """``images [S, H, W]`` in ``[0, 1]`` -> ``points [S, P, 2]``, ``weights [S, P]`` (non-zero pixels first)."""
    s, h, w = images.shape
    flat = images.reshape(s, h * w).float()
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([cols.reshape(-1) + 0.5, rows.reshape(-1) + 0.5], -1).float()  # [H*W, 2]
    count = int((flat > 0).sum(-1).max().clamp_min(1))
    # Stable sort puts non-zero pixels first in raster order, then keeps the first `count`.
    order = torch.argsort((flat <= 0).to(torch.int8), dim=-1, stable=True)[:, :count]
    return centres[order], torch.gather(flat, 1, order)


def jittered_pixel_samples(images: Tensor, n_points: int, generator: torch.Generator) -> Tensor:
    """``images [S, H, W]`` -> ``[S, n_points, 2]`` samples drawn proportional to intensity."""
    s, h, w = images.shape
    flat = images.reshape(s, h * w).float()
    index = torch.multinomial(flat, n_points, replacement=True, generator=generator)
    centre = torch.stack([index % w, index // w], -1).float()
    return centre + torch.rand(s, n_points, 2, generator=generator)
