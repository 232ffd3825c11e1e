"""Streaming access to one PMC ``.tar.gz`` for :mod:`medvlm.data.download`.

The archive is read once, front to back, straight off the HTTP response (or a local file): gzip is
decoded here rather than by :mod:`tarfile` so that a truncated download is detected (tarfile's
stream mode silently treats a cut-off gzip as the end of the archive) and so that the number of
unpacked bytes can be capped (decompression bombs). Only the wanted members are written, each to a
temp name in the images folder, decoded once with PIL to prove it is an image, hashed, and renamed
onto its final name; nothing derived from a member's name is ever used as an output path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import httpx

from medvlm.data.download.tar_guard import MAX_TAR_HEADER_BYTES, TarHeaderError, TarHeaderGuard
from medvlm.data.images import open_image

GZIP_MAGIC = b"\x1f\x8b"
_OUT_CHUNK = 1 << 18  # largest piece of unpacked data produced per decompress call (bounds memory)
_COPY_CHUNK = 1 << 16


class FetchError(Exception):
    """One failed attempt at fetching or reading an archive.

    ``reason`` is the short key counted in the summary (``http_404``, ``network``, ``truncated_archive``
    ...); ``retryable`` says whether another attempt may succeed; ``retry_after`` is a server hint in s.
    """

    def __init__(self, reason: str, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised inside a worker when the run is being stopped (Ctrl-C)."""


@dataclass(frozen=True)
class Limits:
    """Caps applied while reading one archive."""

    max_member_bytes: int
    """Largest wanted member that is written (bytes, from the tar header)."""
    max_archive_bytes: int
    """Largest archive, counted both as downloaded and as unpacked bytes."""
    max_members: int
    """Most tar entries read from one archive (each costs memory in :mod:`tarfile`)."""
    max_header_bytes: int = MAX_TAR_HEADER_BYTES
    """Largest pax extended header / GNU long name / sparse header run (``tarfile`` reads them whole)."""


class ArchiveReader:
    """A ``read(n)`` file object over raw archive chunks that un-gzips, counts, caps and optionally tees.

    ``tarfile.open(fileobj=reader, mode="r|")`` reads the plain tar from it. Raises :class:`FetchError`
    when the gzip stream ends early (``truncated_archive``), is corrupt (``bad_archive``), exceeds
    the caps (``archive_too_large``) or holds a tar header over ``max_header_bytes`` or a sparse member
    (``tar_header_too_large``, seen by :class:`~medvlm.data.download.tar_guard.TarHeaderGuard` before tarfile reads it).
    """

    def __init__(
        self, chunks: Iterator[bytes], limits: Limits, tee: BinaryIO | None = None, stop: threading.Event | None = None
    ):
        self._chunks = chunks
        self._limits = limits
        self._tee = tee
        self._stop = stop
        self._carry = b""  # raw bytes read but not yet handed to a decompressor
        self._buf = memoryview(b"")  # unpacked bytes not yet returned by read()
        self._gz = None  # the zlib decompressor of the current gzip member
        self._mode: str | None = None  # "gzip" or "plain", decided from the first two bytes
        self._done = False
        self._guard = TarHeaderGuard(limits.max_header_bytes)  # sees each header before tarfile reads it
        self.raw_bytes = 0
        self.unpacked_bytes = 0

    def _next_raw(self) -> bytes:
        if self._carry:
            data, self._carry = self._carry, b""
            return data
        if self._stop is not None and self._stop.is_set():
            raise Cancelled()
        for chunk in self._chunks:
            if not chunk:
                continue
            self.raw_bytes += len(chunk)
            if self.raw_bytes > self._limits.max_archive_bytes:
                raise FetchError(
                    "archive_too_large", f"download exceeds {self._limits.max_archive_bytes} bytes", retryable=False
                )
            if self._tee is not None:
                self._tee.write(chunk)
            return chunk
        return b""

    def _decide_mode(self) -> None:
        head = b""
        while len(head) < 2:
            more = self._next_raw()
            if not more:
                break
            head += more
        self._mode = "gzip" if head[:2] == GZIP_MAGIC else "plain"
        if self._mode == "gzip":
            self._gz = zlib.decompressobj(wbits=31)
        self._carry = head

    def _produce(self) -> bytes:
        """The next piece of unpacked tar data, or ``b""`` at the clean end of the archive."""
        if self._mode is None:
            self._decide_mode()
        if self._mode == "plain":
            return self._next_raw()
        gz = self._gz
        while True:
            if gz.eof:
                # End of one gzip member: a concatenated member may follow; other trailing bytes are ignored.
                rest = gz.unused_data or self._next_raw()
                if rest[:2] != GZIP_MAGIC:
                    return b""
                gz = self._gz = zlib.decompressobj(wbits=31)
                self._carry = rest
                continue
            data = gz.unconsumed_tail or self._next_raw()
            if not data:
                raise FetchError("truncated_archive", "gzip stream ends early (truncated download)", retryable=True)
            try:
                out = gz.decompress(data, _OUT_CHUNK)
            except zlib.error as e:
                raise FetchError("bad_archive", f"corrupt gzip data ({e})", retryable=True) from e
            if out:
                return out

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` unpacked bytes (all remaining if ``n < 0``); ``b""`` at the end."""
        if n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        while not self._buf and not self._done:
            piece = self._produce()
            if not piece:
                self._done = True
                break
            self.unpacked_bytes += len(piece)
            if self.unpacked_bytes > self._limits.max_archive_bytes:
                raise FetchError(
                    "archive_too_large",
                    f"archive unpacks to more than {self._limits.max_archive_bytes} bytes",
                    retryable=False,
                )
            try:
                self._guard.feed(piece)
            except TarHeaderError as e:
                raise FetchError("tar_header_too_large", f"refused tar archive: {e}", retryable=False) from None
            self._buf = memoryview(piece)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def drain(self) -> None:
        """Read to the end (so a tee gets the whole archive and a truncated tail is noticed)."""
        while self.read(1 << 20):
            pass


def http_status_error(status: int, url: str, retry_after: str | None) -> FetchError:
    """Classify an HTTP status: 404/410 and other 4xx are final; 408, 429 and 5xx are retried."""
    retryable = status in (408, 429) or status >= 500
    hint = None
    if retry_after is not None and retry_after.strip().isdigit():
        hint = float(retry_after.strip())
    return FetchError(f"http_{status}", f"HTTP {status} for {url}", retryable=retryable, retry_after=hint)


@contextlib.contextmanager
def open_archive(
    client: httpx.Client, url: str, limits: Limits, tee: BinaryIO | None = None, stop: threading.Event | None = None
) -> Iterator[ArchiveReader]:
    """Open ``url`` (``http(s)://`` or ``file://``) as an :class:`ArchiveReader`; transport errors become FetchError."""
    if url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        if not path.is_file():
            raise FetchError("not_found", f"{path}: no such archive", retryable=False)
        with path.open("rb") as f:
            yield ArchiveReader(iter(lambda: f.read(_COPY_CHUNK), b""), limits, tee, stop)
        return
    try:
        with client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise http_status_error(resp.status_code, url, resp.headers.get("retry-after"))
            yield ArchiveReader(resp.iter_bytes(_COPY_CHUNK), limits, tee, stop)
    except httpx.TimeoutException as e:
        raise FetchError("timeout", f"timed out fetching {url} ({type(e).__name__})", retryable=True) from e
    except httpx.TransportError as e:
        raise FetchError("network", f"network error fetching {url} ({type(e).__name__}: {e})", retryable=True) from e
    except httpx.InvalidURL as e:
        raise FetchError("bad_url", f"invalid URL {url!r} ({e})", retryable=False) from e


def member_key(name: str) -> str:
    """Normalise a tar member name for matching (``./PMC1/a.jpg`` -> ``PMC1/a.jpg``)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def member_problem(ti: tarfile.TarInfo, limits: Limits) -> tuple[str, str] | None:
    """``(reason, message)`` if a wanted member must not be written: links, devices, dirs, sparse, too big."""
    if not ti.isreg() or ti.issparse():
        kind = (
            "symlink"
            if ti.issym()
            else "hard link"
            if ti.islnk()
            else "directory"
            if ti.isdir()
            else "sparse file"
            if ti.issparse()
            else "device or special file"
        )
        return "unsafe_member", f"member {ti.name!r} is a {kind}, not a regular file"
    if ti.size > limits.max_member_bytes:
        return "too_large", f"member {ti.name!r} is {ti.size} bytes (cap {limits.max_member_bytes})"
    return None


def check_image(path: Path) -> str | None:
    """Decode the file fully with PIL; ``None`` if it is an image of a format medvlm reads, else the complaint.

    Only :data:`medvlm.data.images.IMAGE_FORMATS` are opened and the pixel count is checked from the header
    before decoding (an EPS member named ``.jpg`` never reaches Ghostscript).
    """
    try:
        with open_image(path, path.name) as im:
            im.load()
    # PIL's format plugins raise many exception types on malformed input (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError ...); any of them means "not a usable image".
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the renames inside it durable (a power cut cannot undo them)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class WrittenFile:
    """A member copied to its final name."""

    path: Path
    bytes: int
    sha256: str


def write_member(src: BinaryIO, dest: Path, expected_size: int) -> WrittenFile | tuple[str, str]:
    """Copy ``src`` to a temp name beside ``dest``, check it decodes as an image, rename onto ``dest``.

    Returns the :class:`WrittenFile`, or ``(reason, message)`` when the data is not an image. The
    temp file (``.{name}.*.part``) never survives: it is renamed or removed.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: src.read(_COPY_CHUNK), b""):
                digest.update(block)
                out.write(block)
                n += len(block)
                if n > expected_size:
                    break
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the manifest's fsynced "done" line names them
        if n != expected_size:
            raise FetchError("truncated_archive", f"member {dest.name}: {n} of {expected_size} bytes", retryable=True)
        problem = check_image(tmp)
        if problem is not None:
            return "not_image", f"not a decodable image ({problem.replace(str(tmp), dest.name)})"
        os.replace(tmp, dest)
        fsync_dir(dest.parent)  # ... and so is the rename
        return WrittenFile(dest, n, digest.hexdigest())
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_written(first: WrittenFile, dest: Path) -> WrittenFile:
    """Give a second pair the same member: copy an already written file atomically onto ``dest``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(first.path, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return WrittenFile(dest, first.bytes, first.sha256)
