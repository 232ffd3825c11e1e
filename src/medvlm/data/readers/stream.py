"""Streaming and random access over JSON arrays and JSON-lines files, without new dependencies.

LLaVA-Med's alignment file is a 341 MiB JSON array of ~467k records; ``json.load`` on it needs several
times its size in RAM. :func:`iter_json_array` instead decodes one record at a time with
``json.JSONDecoder.raw_decode`` over a sliding text buffer filled in chunks, so memory stays at about
one chunk plus one record. It also reports each record's byte offset and length, which
:func:`index_json_array` collects so a training dataset can read record ``i`` lazily
(:class:`RecordFile`).

Container detection (:func:`container_kind`) looks at content, never at the file name: ``[`` starts a
JSON array; a first line that parses as a JSON object means JSON lines; any other ``{`` start is one
JSON object (the fig-captions object of lists; a one-line file counts as one only when its lists hold
figure records, so a one-record JSONL stays JSONL).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from medvlm.errors import MedvlmError

CHUNK_CHARS = 1 << 20
"""Characters read per refill of the sliding buffer (1 Mi; the buffer also holds the current record)."""
_WS = " \t\n\r"
_NEAR_END = 16  # a decode error this close to the buffer end may just mean "record continues in the next chunk"
_BOM = b"\xef\xbb\xbf"


class RawRecord(NamedTuple):
    """One decoded record with where it came from."""

    index: int
    """0-based record index in the file."""
    line: int
    """1-based line on which the record starts."""
    offset: int
    """Byte offset of the record's first byte."""
    length: int
    """Byte length of the record's JSON text."""
    value: Any
    """The decoded JSON value."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MedvlmError(f"{path}: file not found")


def _bom_len(path: Path) -> int:
    with path.open("rb") as f:
        return len(_BOM) if f.read(3) == _BOM else 0


class _Buffer:
    """A sliding text window over a UTF-8 file that tracks the byte offset and line of its start."""

    def __init__(self, path: Path, chunk_chars: int):
        self.path = path
        self.chunk = chunk_chars
        skip = _bom_len(path)
        self.f = path.open("r", encoding="utf-8", newline="")  # newline="": no \r\n translation, offsets stay exact
        if skip:
            self.f.read(1)
        self.buf = ""
        self.pos = 0
        # A cursor that only moves forward, so offsets/lines cost O(record) each, not O(buffer).
        self.mark_i = 0
        self.mark_byte = skip
        self.mark_line = 1
        self.eof = False

    def close(self) -> None:
        self.f.close()

    def fill(self) -> bool:
        """Append one chunk; False at end of file."""
        if self.eof:
            return False
        try:
            data = self.f.read(self.chunk)
        except UnicodeDecodeError as e:
            raise MedvlmError(
                f"{self.path}: not UTF-8 text after byte {self.byte_at(len(self.buf))} ({e.reason})"
            ) from e
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def skip_ws(self) -> str:
        """Advance past whitespace; return the next character ('' at end of file)."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def _advance(self, i: int) -> None:
        if i < self.mark_i:
            raise ValueError("buffer cursor moves forward only")
        self.mark_byte += len(self.buf[self.mark_i : i].encode("utf-8"))
        self.mark_line += self.buf.count("\n", self.mark_i, i)
        self.mark_i = i

    def drop_consumed(self) -> None:
        """Forget text before ``pos`` (amortised: only once it exceeds one chunk)."""
        if self.pos > self.chunk:
            self._advance(self.pos)
            self.buf = self.buf[self.pos :]
            self.pos = self.mark_i = 0

    def byte_at(self, i: int) -> int:
        self._advance(i)
        return self.mark_byte

    def line_at(self, i: int) -> int:
        self._advance(i)
        return self.mark_line

    def where(self, i: int) -> str:
        return f"line {self.line_at(i)}, byte {self.byte_at(i)}"


def iter_json_array(path: str | os.PathLike, chunk_chars: int = CHUNK_CHARS) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON array one at a time.

    Memory is bounded by about ``chunk_chars`` plus the largest record. A syntax error raises a
    :class:`MedvlmError` naming the file, record index, line and byte offset (a JSON array cannot be
    resynchronised after a syntax error, so this is fatal even when callers skip bad records).
    """
    path = Path(path)
    _check_file(path)
    decoder = json.JSONDecoder()
    b = _Buffer(path, chunk_chars)
    try:
        c = b.skip_ws()
        if c != "[":
            raise MedvlmError(f"{path}: expected a JSON array starting with '[', found {c or 'end of file'!r}")
        b.pos += 1
        index = 0
        while True:
            c = b.skip_ws()
            if c == "]" and index == 0:
                b.pos += 1
                break
            if c == "":
                raise MedvlmError(f"{path}: record {index}: file ends inside the JSON array (truncated file?)")
            start = b.pos
            while True:
                try:
                    value, end = decoder.raw_decode(b.buf, start)
                except json.JSONDecodeError as e:
                    incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(b.buf) - _NEAR_END
                    if incomplete and b.fill():
                        continue
                    raise MedvlmError(f"{path}: record {index}: invalid JSON at {b.where(e.pos)}: {e.msg}") from e
                if end >= len(b.buf) and not b.eof and not isinstance(value, (dict, list, str)):
                    b.fill()  # a bare number/literal may continue in the next chunk
                    continue
                break
            line, offset = b.line_at(start), b.byte_at(start)
            length = b.byte_at(end) - offset
            yield RawRecord(index=index, line=line, offset=offset, length=length, value=value)
            index += 1
            b.pos = end
            c = b.skip_ws()
            if c == ",":
                b.pos += 1
            elif c == "]":
                b.pos += 1
                break
            else:
                found = repr(c) if c else "end of file"
                raise MedvlmError(
                    f"{path}: after record {index - 1}: expected ',' or ']' at {b.where(b.pos)}, found {found}"
                )
            b.drop_consumed()
        c = b.skip_ws()
        if c:
            raise MedvlmError(f"{path}: unexpected text after the JSON array at {b.where(b.pos)}")
    finally:
        b.close()


def iter_jsonl_records(
    path: str | os.PathLike, *, skip_bad: bool = False, bad: list[str] | None = None
) -> Iterator[RawRecord]:
    """Stream a JSON-lines file with each line's byte offset (blank lines skipped; index counts records).

    A malformed line raises a :class:`MedvlmError` naming file and line, unless ``skip_bad`` is set,
    in which case its message is appended to ``bad`` and reading continues.
    """
    path = Path(path)
    _check_file(path)
    decode = json.JSONDecoder().decode
    index = 0
    with path.open("rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, n = offset, len(raw)
            offset += n
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[3:], start + 3
            if not raw.strip():
                continue
            try:
                value = decode(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                what = (
                    f"invalid JSON: {e.msg} (column {e.colno})"
                    if isinstance(e, json.JSONDecodeError)
                    else "not UTF-8 text"
                )
                msg = f"{path}:{lineno}: {what}"
                if not skip_bad:
                    raise MedvlmError(msg) from e
                if bad is not None:
                    bad.append(msg)
                continue
            yield RawRecord(index, lineno, start, len(raw.rstrip(b"\r\n")), value)
            index += 1


def _is_figure_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) and ("fig_caption" in x or "pair_id" in x) for x in v)


def container_kind(path: str | os.PathLike) -> str:
    """``"array"`` (JSON array), ``"jsonl"`` (JSON lines) or ``"object"`` (one JSON object), from content."""
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        head = f.read(4096).lstrip(_BOM).lstrip()
        if not head:
            raise MedvlmError(f"{path}: empty file")
        if head[:1] == b"[":
            return "array"
        if head[:1] != b"{":
            raise MedvlmError(f"{path}: not JSON / JSON lines (starts with {head[:20]!r})")
        f.seek(0)
        # A JSONL file has a complete object on one of its first lines (the first may be torn).
        for _ in range(5):
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(value, dict):
                rest = f.read(4096).strip()
                if not rest and value and all(_is_figure_list(v) for v in value.values()):
                    return "object"  # a one-line fig-captions object, not a one-record JSONL
                return "jsonl"
    return "object"


def iter_raw_records(
    path: str | os.PathLike, *, skip_bad: bool = False, bad: list[str] | None = None
) -> Iterator[RawRecord]:
    """Stream the records of a JSON array or a JSON-lines file (a single JSON object is an error here)."""
    kind = container_kind(path)
    if kind == "array":
        return iter_json_array(path)
    if kind == "jsonl":
        return iter_jsonl_records(path, skip_bad=skip_bad, bad=bad)
    raise MedvlmError(f"{path}: a single JSON object, not a list of records (JSON array or JSON lines)")


def index_json_array(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Byte ``(offset, length)`` of every record of a JSON array, for lazy random access."""
    return [(r.offset, r.length) for r in iter_json_array(path)]


def index_jsonl(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Byte ``(offset, length)`` of every non-blank line of a JSON-lines file (malformed lines raise)."""
    return [(r.offset, r.length) for r in iter_jsonl_records(path)]


def index_records(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Byte ``(offset, length)`` of every record of a JSON array or JSON-lines file."""
    return [(r.offset, r.length) for r in iter_raw_records(path)]


def read_record_at(path: str | os.PathLike, offset: int, length: int) -> Any:
    """Decode the record stored at ``offset`` / ``length`` (from an index) of ``path``."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedvlmError(
            f"{path}: no JSON record at byte {offset} (length {length}); the file changed since it was indexed?"
        ) from e


class RecordFile:
    """Random access to the raw records of a JSON array / JSON-lines file: ``len(rf)``, ``rf[i] -> dict``.

    Holds only two integer arrays (16 bytes per record); the file is reopened on each access, so the
    object is cheap to pickle into DataLoader workers and safe after ``fork``.
    """

    def __init__(self, path: str | os.PathLike, index: list[tuple[int, int]] | None = None):
        self.path = Path(path)
        pairs = index_records(self.path) if index is None else index
        self._offsets = array("q", (o for o, _ in pairs))
        self._lengths = array("q", (n for _, n in pairs))

    def __len__(self) -> int:
        return len(self._offsets)

    def span(self, i: int) -> tuple[int, int]:
        """Byte ``(offset, length)`` of record ``i``."""
        return self._offsets[i], self._lengths[i]

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range (0..{len(self) - 1})")
        return read_record_at(self.path, self._offsets[i], self._lengths[i])
