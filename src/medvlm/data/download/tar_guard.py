"""Bound the tar headers :mod:`tarfile` reads whole, before it reads them (for :mod:`medvlm.data.download`).

``tarfile`` reads a pax extended header (``x``/``g``/``X``), a GNU long name or link (``L``/``K``), the
extension blocks of an old GNU sparse member (``S``) and a GNU sparse 1.0 map (pax ``GNU.sparse.*``) into
memory whole, however large the header says it is: a 389 KB archive whose pax header claims 400 MB made
it hold 2.3 GB. :class:`TarHeaderGuard` watches the plain tar stream as it is handed to ``tarfile`` and
walks its headers the way ``tarfile`` does (same offsets: data follows regular and unknown-type members
only, a pax ``size`` moves the next header, a V7 name ending in ``/`` is a directory), so it sees every
header first and refuses one over ``max_header_bytes`` before ``tarfile`` asks for its content.
Sparse members are refused outright (the downloader never writes them anyway).
"""

from __future__ import annotations

import re

MAX_TAR_HEADER_BYTES: int = 1024**2
"""Largest pax extended header, GNU long name/link or sparse extension run accepted in an archive."""

_BLOCK = 512
_PAX_TYPES = (b"x", b"g", b"X")
_LONG_TYPES = (b"L", b"K")
_SPARSE = b"S"
_DATA_TYPES = (b"0", b"\0", b"7", b"S")  # tarfile's REGULAR_TYPES: their data follows the header
_KNOWN_TYPES = (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"S", b"x", b"g", b"X")
_HIGH_BYTES = bytes(range(128, 256))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class TarHeaderError(Exception):
    """An archive header over the cap (or a construct that is refused); the message says which."""


def _padded(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


def _number(field: bytes) -> int | None:
    """A tar numeric field as ``tarfile.nti`` reads it (octal, or GNU base-256); None if invalid."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    rest = block[:148] + block[156:]
    unsigned = 256 + sum(rest)
    signed = unsigned - 256 * (len(rest) - len(rest.translate(None, _HIGH_BYTES)))  # bytes >= 128 as negative
    return stored in (unsigned, signed)


class TarHeaderGuard:
    """Feed it every byte of the plain tar stream, in order, before ``tarfile`` reads it; raises TarHeaderError."""

    def __init__(self, max_header_bytes: int = MAX_TAR_HEADER_BYTES):
        self.max_header_bytes = max_header_bytes
        self._pos = 0  # stream position of the next byte fed
        self._at = 0  # where the piece being collected (or skipped to) starts
        self._want = _BLOCK  # bytes of that piece to collect
        self._kind = "header"  # header | pax | sparse
        self._buf = bytearray()
        self._pax_size: int | None = None  # a pax "size" for the next member
        self._pax_type = b""
        self._sparse_run = 0
        self._done = False  # the end-of-archive block, or a header tarfile rejects: nothing more is read

    def feed(self, data: bytes | memoryview) -> None:
        """Inspect the next bytes of the stream."""
        i, n = 0, len(data)
        while i < n and not self._done:
            pos = self._pos + i
            if pos < self._at:  # data of a member: not ours to look at
                i += min(n - i, self._at - pos)
                continue
            take = min(self._want - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._want:
                piece = bytes(self._buf)
                self._buf.clear()
                self._handle(piece)
        self._pos += n

    def _next_header(self, at: int) -> None:
        self._at, self._want, self._kind = at, _BLOCK, "header"

    def _handle(self, piece: bytes) -> None:
        start = self._at
        if self._kind == "pax":
            self._read_pax(piece)
            self._next_header(start + _padded(len(piece)))
            return
        if self._kind == "sparse":
            self._sparse_run += _BLOCK
            if self._sparse_run > self.max_header_bytes:
                raise TarHeaderError(f"sparse member headers longer than {self.max_header_bytes} bytes")
            if piece[504]:
                self._next_sparse(start + _BLOCK)
            else:
                self._member_data(start + _BLOCK, self._sparse_size)
            return
        self._header(piece, start)

    def _next_sparse(self, at: int) -> None:
        self._at, self._want, self._kind = at, _BLOCK, "sparse"

    def _header(self, block: bytes, start: int) -> None:
        if block.count(0) == _BLOCK or not _checksum_ok(block):
            self._done = True  # tarfile ends the archive here (end marker) or refuses the header
            return
        size = _number(block[124:136])
        if size is None:
            self._done = True
            return
        if size < 0:
            raise TarHeaderError(f"tar header at byte {start} has a negative size")
        typ = block[156:157]
        if typ in _PAX_TYPES or typ in _LONG_TYPES:
            if size > self.max_header_bytes:
                what = "pax extended header" if typ in _PAX_TYPES else "GNU long name/link header"
                raise TarHeaderError(f"{what} of {size} bytes at byte {start} (cap {self.max_header_bytes})")
            if typ in _LONG_TYPES or size == 0:
                self._next_header(start + _BLOCK + _padded(size))
            else:
                self._at, self._want, self._kind, self._pax_type = start + _BLOCK, size, "pax", typ
            return
        if typ == _SPARSE:
            # tarfile reads the extension blocks one by one into a list: refused beyond the cap
            self._sparse_size = size if self._pax_size is None else self._pax_size
            self._pax_size, self._sparse_run = None, 0
            if block[482]:
                self._next_sparse(start + _BLOCK)
            else:
                self._member_data(start + _BLOCK, self._sparse_size)
            return
        data = size if self._pax_size is None else self._pax_size
        self._pax_size = None
        if typ == b"\0" and block[:100].split(b"\0", 1)[0].endswith(b"/"):
            typ = b"5"  # a V7 directory: tarfile reads no data for it
        self._member_data(start + _BLOCK, data if typ in _DATA_TYPES or typ not in _KNOWN_TYPES else 0)

    def _member_data(self, at: int, size: int) -> None:
        self._next_header(at + _padded(size))

    def _read_pax(self, buf: bytes) -> None:
        pos = 0
        while pos < len(buf):
            m = _PAX_RECORD.match(buf, pos)
            if m is None:
                return  # tarfile stops at malformed records too
            length = int(m.group(1))
            if length < 1 or pos + length > len(buf):
                return
            keyword, value = m.group(2), buf[m.end() : pos + length - 1]
            if keyword.startswith(b"GNU.sparse."):
                raise TarHeaderError("sparse member (GNU sparse pax headers are refused)")
            if keyword == b"size" and self._pax_type in (b"x", b"X") and self._pax_size is None:
                try:
                    self._pax_size = int(value.decode("utf-8", "surrogateescape"))
                except ValueError:
                    self._pax_size = 0  # as tarfile: an unreadable number counts as 0
                if self._pax_size < 0:
                    raise TarHeaderError("pax header with a negative size")
            pos += length
