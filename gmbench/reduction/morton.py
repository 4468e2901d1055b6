"""Morton (Z-order) codes of Gaussian centroids, the sort key of TreeHEM's tree.

As in the LBVH construction of Lauterbach et al. (2009), each centroid is
quantised to ``bits`` bits per axis inside its mixture's bounding box and the
bits of the axes are interleaved, so sorting by the code puts nearby Gaussians
next to each other.
"""

from __future__ import annotations

import torch
from torch import Tensor


def morton_codes(positions: Tensor, valid: Tensor | None = None, bits: int = 10) -> Tensor:
    """``[..., N, D]`` positions -> ``[..., N]`` int64 Morton codes.

    The bounding box is taken over the ``valid`` positions only (``[..., N]``
    bool, default all); invalid positions are clamped into it.  ``bits * D``
    must fit in 62 bits.
    """
    d = positions.shape[-1]
    if bits < 1 or bits * d > 62:
        raise ValueError(f"morton bits per axis must be in 1..{62 // d} for {d}D, got {bits}")
    x = positions.detach()
    if valid is None:
        valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    big = torch.finfo(x.dtype).max
    mask = valid.unsqueeze(-1)
    lower = torch.where(mask, x, torch.full_like(x, big)).amin(-2, keepdim=True)
    upper = torch.where(mask, x, torch.full_like(x, -big)).amax(-2, keepdim=True)
    empty = ~valid.any(-1, keepdim=True).unsqueeze(-1)
    lower = torch.where(empty, torch.zeros_like(lower), lower)
    upper = torch.where(empty, torch.ones_like(upper), upper)
    extent = (upper - lower).clamp_min(torch.finfo(x.dtype).tiny)
    levels = (1 << bits) - 1
    q = ((x - lower) / extent * levels).round().clamp(0, levels).to(torch.int64)
    table = _spread_table(d, q.device)
    code = torch.zeros(q.shape[:-1], dtype=torch.int64, device=q.device)
    for axis in range(d):
        # Axis 0 takes the most significant bit of each group of d bits.
        for chunk in range(0, bits, _CHUNK_BITS):
            # Only the low `bits` bits count (float rounding can push q one past `levels`).
            spread = table[(q[..., axis] >> chunk) & ((1 << min(_CHUNK_BITS, bits - chunk)) - 1)]
            code |= spread << (chunk * d + d - 1 - axis)
    return code


_CHUNK_BITS = 10
_TABLES: dict[tuple[int, str], Tensor] = {}


def _spread_table(d: int, device: torch.device) -> Tensor:
    """``[1024]`` int64: bit ``b`` of the index moved to bit ``b * d`` (a lookup instead of a loop over bits)."""
    key = (d, str(device))
    if key not in _TABLES:
        values = torch.arange(1 << _CHUNK_BITS, dtype=torch.int64)
        table = torch.zeros_like(values)
        for bit in range(_CHUNK_BITS):
            table |= ((values >> bit) & 1) << (bit * d)
        _TABLES[key] = table.to(device)
    return _TABLES[key]
