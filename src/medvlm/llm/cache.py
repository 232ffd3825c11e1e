"""Persistent response cache: SQLite (atomic, safe across threads and processes), keyed by (model, full request).

A rerun or resume of any LLM step looks each request up here first, so a response is paid for
once. Only successful, well-formed replies are stored. Images sent as data URLs are part of the key
(through the hash) but are stored in the request column as their digest, to keep the file small.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError

_DATA_URL = re.compile(r"^data:([^;,]+)(;base64)?,")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(body: dict) -> str:
    """sha256 of the canonical request body (which includes ``model``)."""
    if not body.get("model"):
        raise MedvlmError("LLM request without a model name")
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _shrink(obj: Any) -> Any:
    """Replace data URLs by their digest (storage only; the key uses the full body)."""
    if isinstance(obj, str):
        m = _DATA_URL.match(obj)
        if m and len(obj) > 256:
            return f"data:{m.group(1)};sha256={hashlib.sha256(obj.encode()).hexdigest()}"
        return obj
    if isinstance(obj, list):
        return [_shrink(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _shrink(v) for k, v in obj.items()}
    return obj


class ResponseCache:
    """SQLite table ``responses(key, model, request, response, usage, created)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # One connection shared by the worker threads (serialised by the lock); WAL + busy timeout
            # let several processes share the file.
            self._conn = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "request TEXT NOT NULL, response TEXT NOT NULL, usage TEXT, created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            raise MedvlmError(f"{self.path}: cannot open the LLM response cache ({e})") from e

    def get(self, key: str) -> dict | None:
        """The cached response JSON for ``key``, or None."""
        with self._lock:
            row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, body: dict, response: dict) -> None:
        """Store a successful response (last writer wins; all writers store equivalent data)."""
        usage = response.get("usage")
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, model, request, response, usage, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key,
                    str(body.get("model")),
                    canonical_json(_shrink(body)),
                    json.dumps(response, ensure_ascii=False),
                    json.dumps(usage) if usage is not None else None,
                    time.time(),
                ),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
