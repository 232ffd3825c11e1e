"""The downloader's tasks and its resumable manifest (:mod:`medvlm.data.download`).

The manifest ``DIR/manifest.jsonl`` is append-only, one fsynced JSON line per outcome; on resume the
last line per ``pair_id`` wins and a torn last line (a run killed mid-write) is ignored. A pair counts
as done only if its file is still there with the recorded size (and hash, when asked to verify).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medvlm.utils.io import append_jsonl, iter_jsonl


@dataclass(frozen=True, slots=True)
class PairTask:
    """One figure to fetch: which archive, which member, which output name."""

    pair_id: str
    """The pair id; the output file is ``images/{pair_id}{ext}``."""
    url: str
    """The archive URL as listed in the input (before ``--url-map``)."""
    member: str
    """The member path inside the archive (``PMC123/fig1.jpg``)."""
    line: int
    """1-based line of the input file, for messages."""

    @property
    def filename(self) -> str:
        """Output file name: pair id plus the member's original extension."""
        return self.pair_id + PurePosixPath(self.member).suffix


def pair_id_problem(task: PairTask) -> str | None:
    """Why the task's ``pair_id`` (plus extension) cannot name a file in the images folder, or ``None``."""
    pid = task.pair_id
    # Temp names are ".{name}.XXXX.part": a leading dot is reserved, and 200 bytes leave room under NAME_MAX.
    if pid.startswith(".") or any(c in pid for c in "/\\\0") or len(task.filename.encode()) > 200:
        return f"pair_id {pid!r} (file {task.filename!r}) is not a safe file name"
    return None


def member_path_problem(member: str) -> str | None:
    """Why an ``image_file_path`` is unsafe (absolute, ``..``, backslash, NUL), or ``None``."""
    parts = PurePosixPath(member).parts
    if member.startswith("/") or "\\" in member or "\0" in member or ".." in parts or not parts:
        return f"image_file_path {member!r} is absolute or leaves the archive folder"
    return None


@dataclass(slots=True)
class ManifestEntry:
    """The last manifest line seen for one pair."""

    status: str
    file: str | None
    bytes: int | None
    sha256: str | None


def read_manifest(path: Path) -> dict[str, ManifestEntry]:
    """Last entry per pair id; tolerates a torn last line and repairs it so appends start on a new line."""
    if not path.exists():
        return {}
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                # A run was killed mid-line: end that line so the next append is not glued onto it.
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
    state: dict[str, ManifestEntry] = {}
    bad: list[str] = []
    for _, row in iter_jsonl(path, skip_bad=True, bad=bad):
        if isinstance(row, dict) and isinstance(row.get("pair_id"), str):
            state[row["pair_id"]] = ManifestEntry(
                row.get("status", ""), row.get("file"), row.get("bytes"), row.get("sha256")
            )
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_done(entry: ManifestEntry | None, task: PairTask, images_dir: Path, verify: bool) -> bool:
    """True if the manifest says done and the file is there with the recorded size (and hash if ``verify``)."""
    if entry is None or entry.status != "done" or entry.file != f"images/{task.filename}":
        return False
    path = images_dir / task.filename
    try:
        if path.stat().st_size != entry.bytes:
            return False
    except FileNotFoundError:
        return False
    return not verify or _sha256(path) == entry.sha256


class ManifestWriter:
    """Thread-safe appender of outcome lines; also keeps the run's counters and drives the progress bar."""

    def __init__(self, path: Path, on_record: Callable[[str], None] | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._on_record = on_record
        self.done = 0
        self.bytes_written = 0
        self.failed: dict[str, int] = {}

    def done_row(self, task: PairTask, url: str, nbytes: int, sha256: str) -> None:
        """Record a written figure."""
        row = {
            "pair_id": task.pair_id,
            "status": "done",
            "url": url,
            "member": task.member,
            "file": f"images/{task.filename}",
            "bytes": nbytes,
            "sha256": sha256,
            "reason": None,
            "error": None,
            "time": round(time.time(), 3),
        }
        with self._lock:
            append_jsonl(self.path, row)
            self.done += 1
            self.bytes_written += nbytes
            if self._on_record:
                self._on_record("done")

    def failed_row(self, task: PairTask, url: str, reason: str, error: str) -> None:
        """Record a figure that could not be fetched, with a short reason key and the full message."""
        row = {
            "pair_id": task.pair_id,
            "status": "failed",
            "url": url,
            "member": task.member,
            "file": None,
            "bytes": None,
            "sha256": None,
            "reason": reason,
            "error": error,
            "time": round(time.time(), 3),
        }
        with self._lock:
            append_jsonl(self.path, row)
            self.failed[reason] = self.failed.get(reason, 0) + 1
            if self._on_record:
                self._on_record(reason)
