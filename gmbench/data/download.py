"""Resumable HTTP downloads verified by size and SHA-256 (standard library only).

A download goes to ``<file>.part`` and continues where an interrupted one
stopped (an HTTP ``Range`` request; a server that ignores it sends the whole
file and the part file starts over).  A connection that drops mid-file is
resumed up to :data:`ATTEMPTS` times; a server that cannot be reached at all is
not retried, so an offline machine fails at once.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gmbench import __version__
from gmbench.errors import DataError

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 60.0
ATTEMPTS = 4  # per URL; only attempts that received bytes lead to another one


class DownloadError(DataError):
    """A file could not be downloaded or did not match its recorded checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set as its publisher serves it.

    ``size`` and ``sha256`` are the published values (``None`` where nothing is
    published); ``checksum_source`` says where they were taken from.
    """

    name: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None
    checksum_source: str = ""

    def expected(self) -> str:
        """The expected size and checksum, for error messages."""
        if self.sha256 is None:
            return "no published sha256 (gmbench pins the first download's)"
        return f"expected sha256 {self.sha256}" + (f", {self.size} bytes" if self.size is not None else "")


class _Incomplete(Exception):
    """The server closed the connection before the announced end of the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, part: Path, size: int | None = None, progress: bool = True, label: str = "",
             attempts: int = ATTEMPTS, timeout: float = TIMEOUT_S) -> None:
    """Download ``url`` into ``part``, continuing from ``part``'s current length.

    Raises ``urllib.error.URLError`` / ``OSError`` (unreachable, HTTP error) or
    :class:`DownloadError` (still incomplete after ``attempts`` resumed tries);
    the caller turns them into one-line messages.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(max(1, attempts)):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:  # not a prefix of the file we want
            part.unlink()
            have = 0
        if size is not None and have == size:
            return
        try:
            _transfer(url, part, have, progress, label or part.name, timeout, size)
            return
        except _Incomplete as error:
            last_error = error
            continue  # bytes arrived before the drop: resume from there
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # range starts at or past the end: the part file is complete
                return
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            grown = (part.stat().st_size if part.exists() else 0) > have
            if not grown:
                raise
            last_error = error
            continue
    raise DownloadError(f"download of {url} stopped {attempts} times ({reason(last_error)}); "
                        f"{part.stat().st_size if part.exists() else 0} bytes are kept in {part}: run the command again to resume")


def _transfer(url: str, part: Path, have: int, progress: bool, label: str, timeout: float, size: int | None) -> int:
    """One request; returns the bytes written, raises :class:`_Incomplete` on an early close.

    With a known ``size`` at most one byte more is kept: enough for the size check to fail,
    without filling the disk from a server that sends something else."""
    headers = {"User-Agent": f"gmbench/{__version__} (python urllib)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = getattr(response, "status", None) or 200
        start = _range_start(response.headers.get("Content-Range")) if status == 206 else 0
        if start != have:  # the server ignored (or misread) the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        written = 0
        from tqdm import tqdm

        with open(part, "ab" if start else "wb") as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            disable=not progress, file=sys.stderr, leave=False,
        ) as bar:
            try:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    if size is not None and start + written + len(block) > size:
                        handle.write(block[: size + 1 - start - written])
                        return written + len(block)
                    handle.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as error:  # reset or timed out mid-file
                handle.flush()
                if written:
                    raise _Incomplete(f"{type(error).__name__}: {error}") from None
                raise
        # http.client returns b"" instead of raising when the peer closes before Content-Length.
        if total is not None and start + written < total:
            raise _Incomplete(f"connection closed after {start + written} of {total} bytes")
    return written


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def reason(error: BaseException | None) -> str:
    """A short human reason for a failed request (host not found, HTTP 404, timed out, ...)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        cause = error.reason
        if isinstance(cause, socket.gaierror):
            return f"host not found ({cause.strerror}): offline?"
        return str(getattr(cause, "strerror", None) or cause)
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(error) if error is not None else "unknown error"

