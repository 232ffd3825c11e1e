"""Read named image files out of a zip archive (SLAKE's ``imgs.zip`` on the Hugging Face hub), bounded.

The archive is hostile until checked: only members asked for by name are read; a name must be a
relative path without ``..``; each member is bounded in uncompressed bytes and in compression ratio
(a zip bomb is refused before it is inflated), and the bytes read are checked against the size the
directory claims. Nothing is extracted to disk here; callers write the bytes they get.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath

from medvlm.errors import MedvlmError

MAX_MEMBER_BYTES = 64 * 1024 * 1024
"""Largest image member read (SLAKE's largest image is a few MB)."""
MAX_RATIO = 200
"""Largest uncompressed / compressed size ratio accepted (images barely compress)."""


class ZipImages:
    """Random access to the image members of one zip file, by their name relative to an image root.

    ``prefix`` is the folder inside the archive the names are relative to (``imgs`` for SLAKE: the
    archive holds ``imgs/xmlab0/source.jpg`` while the questions name ``xmlab0/source.jpg``), at any
    depth (``Slake1.0/imgs/...``); names are also found as written, since re-zipped copies drop it.
    """

    def __init__(self, path: str | os.PathLike, prefix: str = ""):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as e:
            raise MedvlmError(f"{self.path}: not a readable zip archive ({e})") from e
        self._members: dict[str, zipfile.ZipInfo] = {}
        pre = prefix.strip("/")
        for info in self._zip.infolist():
            name = info.filename.replace("\\", "/")
            if info.is_dir() or name.startswith("__MACOSX/"):  # macOS resource forks are not images
                continue
            self._members.setdefault(name, info)
            parts = name.split("/")
            if pre and pre in parts[:-1]:  # "imgs/x/source.jpg" or "Slake1.0/imgs/x/source.jpg" -> "x/source.jpg"
                cut = len(parts) - 1 - parts[::-1].index(pre)
                self._members.setdefault("/".join(parts[cut + 1 :]), info)

    def close(self) -> None:
        """Close the archive."""
        self._zip.close()

    def __enter__(self) -> ZipImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str, where: str) -> bytes:
        """The bytes of member ``name`` (relative to the prefix); MedvlmError naming ``where`` otherwise."""
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise MedvlmError(f"{where}: image name {name!r} must be a relative path inside the image folder")
        info = self._members.get(str(rel))
        if info is None:
            raise MedvlmError(f"{where}: image {name!r} not found in {self.path}")
        if info.file_size > MAX_MEMBER_BYTES:
            raise MedvlmError(
                f"{where}: {self.path}:{info.filename} is {info.file_size} bytes uncompressed "
                f"(limit {MAX_MEMBER_BYTES})"
            )
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO:
            raise MedvlmError(
                f"{where}: {self.path}:{info.filename} compresses {info.file_size / info.compress_size:.0f}:1 "
                f"(limit {MAX_RATIO}:1); refusing a likely zip bomb"
            )
        try:
            with self._zip.open(info) as f:
                data = f.read(MAX_MEMBER_BYTES + 1)
        except (OSError, zipfile.BadZipFile, RuntimeError, EOFError) as e:  # RuntimeError: encrypted member
            raise MedvlmError(f"{where}: cannot read {self.path}:{info.filename} ({e})") from e
        if len(data) != info.file_size:
            raise MedvlmError(
                f"{where}: {self.path}:{info.filename} holds {len(data)} bytes, its directory says "
                f"{info.file_size}; the archive is damaged"
            )
        return data
