"""GMCN layout strings such as ``1/128->8/64->16/32->32/16->64/8->10``.

A layout lists the mixtures between the convolution modules: ``F/N`` means
``F`` feature channels of ``N`` Gaussians each; the last entry is the number of
classes (the output channels of the last convolution module).  Module ``i``
turns entry ``i`` (``F_i/N_i``) into entry ``i + 1`` (``F_o/N_p``).  This is the
network of the paper's Figure 1 / Figure 4 and of Appendix A, Tables 5 and 6.

The last module has no ``/N`` in the string.  Two facts are kept for it:

* the paper's footprint tables take ``N_p = N_i / 2`` there too (pooling as in
  every other module), so :attr:`LayerSpec.out_gaussians` is ``N_i // 2``
  (at least 1);
* the GMCN's last block does not reduce (its output mixtures are integrated
  into class scores), which :attr:`LayerSpec.is_output` marks.
"""

from __future__ import annotations

import dataclasses
import re

from gmbench.errors import GmbenchError

_ARROW = "->"
_ENTRY = re.compile(r"^(\d+)/(\d+)$")
_CLASSES = re.compile(r"^\d+$")


class LayoutError(GmbenchError):
    """A malformed layout string."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One convolution module: ``F_i`` channels of ``N_i`` Gaussians in,
    ``F_o`` channels of ``N_p`` Gaussians out (after fitting/pooling)."""

    in_channels: int  # F_i
    in_gaussians: int  # N_i
    out_channels: int  # F_o
    out_gaussians: int  # N_p (last module: N_i // 2, as in the paper's tables)
    is_output: bool = False  # the last module: the GMCN integrates it instead of reducing


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parsed layout: the modules in order and the class count."""

    layers: list[LayerSpec]
    num_classes: int

    @property
    def input_gaussians(self) -> int:
        """N of the input mixtures (the first entry's ``/N``)."""
        return self.layers[0].in_gaussians

    @property
    def input_channels(self) -> int:
        """F of the input mixtures (1 for point clouds and images)."""
        return self.layers[0].in_channels

    def __str__(self) -> str:
        parts = [f"{layer.in_channels}/{layer.in_gaussians}" for layer in self.layers]
        return _ARROW.join([*parts, str(self.num_classes)])


def parse_layout(text: str) -> Layout:
    """Parse ``"F0/N0->F1/N1->...->classes"`` into a :class:`Layout`.

    Whitespace around entries is ignored.  Raises :class:`LayoutError` naming
    the offending part for anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise LayoutError(
            f"empty layout {text!r}; write it like '1/128->8/64->16/32->32/16->64/8->10'"
        )
    parts = [part.strip() for part in text.split(_ARROW)]
    if len(parts) < 2:
        raise LayoutError(
            f"layout '{text}' needs at least an input 'F/N' and a class count joined by '->', "
            "e.g. '1/128->8/64->10'"
        )
    entries: list[tuple[int, int]] = []
    for position, part in enumerate(parts[:-1], start=1):
        match = _ENTRY.match(part)
        if match is None:
            raise LayoutError(
                f"layout '{text}': entry {position} '{part}' must be 'channels/gaussians' "
                "with positive integers, e.g. '8/64'"
            )
        channels, gaussians = int(match.group(1)), int(match.group(2))
        if channels < 1 or gaussians < 1:
            raise LayoutError(
                f"layout '{text}': entry {position} '{part}' must have channels and gaussians >= 1"
            )
        entries.append((channels, gaussians))
    last = parts[-1]
    if _CLASSES.match(last) is None or int(last) < 1:
        raise LayoutError(
            f"layout '{text}': the last entry '{last}' must be the number of classes "
            "(a positive integer without '/N')"
        )
    num_classes = int(last)
    layers = [
        LayerSpec(f_i, n_i, f_o, n_p)
        for (f_i, n_i), (f_o, n_p) in zip(entries[:-1], entries[1:])
    ]
    f_i, n_i = entries[-1]
    layers.append(LayerSpec(f_i, n_i, num_classes, max(1, n_i // 2), is_output=True))
    return Layout(layers=layers, num_classes=num_classes)
