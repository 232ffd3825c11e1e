"""Shared helpers of the serve tests: one tiny checkpoint per session, image bytes, data URLs."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

from PIL import Image

_CHECKPOINT: dict[str, Path] = {}


def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny mlp2x_gelu checkpoint saved once per test session."""
    if "path" not in _CHECKPOINT:
        from medvlm.model.build import build_preset, save_checkpoint

        model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=7)
        _CHECKPOINT["path"] = save_checkpoint(model, processor, tmp_path_factory.mktemp("serve") / "tiny-med")
    return _CHECKPOINT["path"]


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 40), color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    data = bytearray(image_bytes("PNG", (1, 1)))
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", then width, height (big endian), 5 more bytes, CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)
