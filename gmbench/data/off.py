"""Object File Format (OFF) meshes as found in ModelNet, with its known defects.

Handled: ``#`` comments, blank lines, the header keyword glued to the counts
(``OFF8 6 0`` — many ModelNet files have ``OFF`` and the counts on one line
without a space), counts on the header line (``OFF 8 6 0``), polygons with more
than three corners (fan-triangulated), per-face colours after the indices,
extra per-vertex values after x y z.  Truncated or malformed files, and
vertices with NaN or infinite coordinates (or beyond float32's range), raise a
:class:`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gmbench.errors import DataError


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def parse_off(text: str, source: str = "<string>") -> tuple[Tensor, Tensor]:
    """``(vertices [V, 3] float32, faces [F, 3] int64)`` from OFF text; ``source`` names the file in errors."""
    lines = _lines(text)
    if not lines:
        raise DataError(f"{source}: empty OFF file; re-extract the data set archive")
    header = lines[0]
    if not header.upper().startswith("OFF"):
        raise DataError(f"{source}: not an OFF file (first line {header[:40]!r}); expected 'OFF' then counts")
    rest = header[3:].split()
    body = lines[1:]
    if not rest:
        if not body:
            raise DataError(f"{source}: truncated OFF file (no vertex/face counts)")
        rest, body = body[0].split(), body[1:]
    try:
        n_vertices, n_faces = int(rest[0]), int(rest[1])
    except (IndexError, ValueError):
        raise DataError(f"{source}: bad OFF counts line {' '.join(rest)!r}; expected 'n_vertices n_faces n_edges'") from None
    if n_vertices < 3 or n_faces < 1:
        raise DataError(f"{source}: OFF file has {n_vertices} vertices and {n_faces} faces; a mesh needs at least 3 and 1")
    if len(body) < n_vertices + n_faces:
        raise DataError(
            f"{source}: truncated OFF file: header promises {n_vertices} vertices and {n_faces} faces, "
            f"found {len(body)} data lines; re-extract the data set archive"
        )
    vertices = _parse_vertices(body[:n_vertices], source)
    _check_finite(vertices, body[:n_vertices], source)
    faces = _parse_faces(body[n_vertices : n_vertices + n_faces], n_vertices, source)
    return torch.from_numpy(vertices), torch.from_numpy(faces)


def _parse_vertices(lines: list[str], source: str) -> np.ndarray:
    try:
        tokens = " ".join(lines).split()
        if len(tokens) == 3 * len(lines):
            values = np.asarray(tokens, dtype=np.float64).reshape(-1, 3)
        else:
            values = np.asarray([line.split()[:3] for line in lines], dtype=np.float64)
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, reported by _check_finite
            return values.astype(np.float32)
    except ValueError:
        raise DataError(f"{source}: malformed vertex line in OFF file (expected 'x y z')") from None


def _check_finite(vertices: np.ndarray, lines: list[str], source: str) -> None:
    """NaN/inf coordinates (or ones beyond float32) would poison the area-weighted sampling."""
    finite = np.isfinite(vertices).all(-1)
    if not finite.all():
        index = int(np.argmin(finite))
        raise DataError(
            f"{source}: vertex {index} ({lines[index][:60]!r}) has a NaN or infinite coordinate; "
            "the file is corrupt: re-extract it from the data set archive or remove it"
        )


def _parse_faces(lines: list[str], n_vertices: int, source: str) -> np.ndarray:
    try:
        tokens = " ".join(lines).split()
        if len(tokens) == 4 * len(lines):  # fast path: plain triangles
            table = np.asarray(tokens, dtype=np.int64).reshape(-1, 4)
            if (table[:, 0] == 3).all():
                faces = table[:, 1:]
                _check_indices(faces, n_vertices, source)
                return faces
        triangles = []
        for line in lines:
            values = line.split()
            count = int(values[0])
            if count < 3 or len(values) < count + 1:
                raise DataError(f"{source}: malformed face line {line[:60]!r} in OFF file")
            corners = [int(v) for v in values[1 : count + 1]]
            triangles.extend((corners[0], corners[i], corners[i + 1]) for i in range(1, count - 1))
        faces = np.asarray(triangles, dtype=np.int64)
    except ValueError:
        raise DataError(f"{source}: malformed face line in OFF file (expected 'n i1 ... in')") from None
    _check_indices(faces, n_vertices, source)
    return faces


def _check_indices(faces: np.ndarray, n_vertices: int, source: str) -> None:
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise DataError(f"{source}: OFF face refers to vertex {int(faces.max())} but the file has {n_vertices} vertices")


def read_off(path) -> tuple[Tensor, Tensor]:
    """Parse the OFF file at ``path`` (see :func:`parse_off`)."""
    try:
        text = open(path, encoding="ascii", errors="replace").read()
    except OSError as error:
        raise DataError(f"cannot read OFF file {path}: {error.strerror}") from None
    return parse_off(text, str(path))
