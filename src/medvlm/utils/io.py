"""Atomic writes and line-numbered JSON/JSONL reading.

Everything medvlm writes goes through a temp file (or temp dir) in the destination's folder and an
``os.replace``, so an interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed onto ``dest``, on error removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the mode a plain open() would have
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``dest``; on success it replaces ``dest`` (old one removed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``dest`` atomically (UTF-8)."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``dest`` atomically."""
    write_text_atomic(dest, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(dest: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as JSON lines to ``dest`` atomically."""
    write_text_atomic(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_named_files(folder: str | os.PathLike, files: dict[str, str | dict] | None) -> None:
    """Write ``{file name: text or JSON object}`` into ``folder`` (atomically each; plain file names only)."""
    for name, content in (files or {}).items():
        if Path(name).name != name:
            raise MedvlmError(f"extra file name {name!r} must be a plain file name")
        if isinstance(content, dict):
            write_json_atomic(Path(folder) / name, content)
        else:
            write_text_atomic(Path(folder) / name, content)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise MedvlmError(f"{path}: file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MedvlmError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise MedvlmError(f"{path}: not UTF-8 text ({e})") from e


def iter_jsonl(
    path: str | os.PathLike, skip_bad: bool = False, bad: list[str] | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based line numbers).

    A malformed line raises a :class:`MedvlmError` naming file and line, unless ``skip_bad`` is set,
    in which case the problem is appended to ``bad`` and reading continues.
    """
    path = Path(path)
    if not path.is_file():
        raise MedvlmError(f"{path}: file not found")
    with path.open("r", encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
                if not skip_bad:
                    raise MedvlmError(msg) from e
                if bad is not None:
                    bad.append(msg)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and flush+fsync it, so a killed process loses at most the line being written.

    Readers of such append-only logs must tolerate a torn last line (see :func:`iter_jsonl` with
    ``skip_bad=True``).
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
