"""Image files on the data path: only the formats medvlm reads are opened, pixels bounded first (issue 15, item 9).

An EPS file named ``.jpg`` must never reach Ghostscript: a fake ``gs`` on PATH records whether it ran.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from medvlm.data.images import IMAGE_FORMATS, MAX_IMAGE_PIXELS, load_image, open_image
from medvlm.errors import MedvlmError

SRC = Path(__file__).resolve().parents[2] / "src"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto 16 16 lineto stroke\n"

_PROBE = """
import json, sys
from pathlib import Path
from PIL import Image
eps, folder = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
from medvlm.data.images import load_image
from medvlm.data.validate import image_status
from medvlm.data.download.archive import check_image
from medvlm.errors import MedvlmError
try:
    load_image(eps)
    out["load_image"] = "decoded"
except MedvlmError as e:
    out["load_image"] = str(e)
out["validate"] = image_status(eps)
out["download"] = check_image(eps)
out["gs_after_medvlm"] = (folder / "gs_ran").exists()
try:  # the control: plain PIL, as the code was before, does run Ghostscript on this file
    with Image.open(eps) as im:
        im.load()
except Exception as e:
    out["plain_pil"] = type(e).__name__
out["gs_after_plain_pil"] = (folder / "gs_ran").exists()
print(json.dumps(out))
"""


def test_eps_named_jpg_is_refused_without_running_ghostscript(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gs = fake_bin / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {tmp_path / 'gs_ran'}\nexit 1\n")
    gs.chmod(0o755)
    eps = tmp_path / "figure.jpg"
    eps.write_bytes(EPS)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "PYTHONPATH": str(SRC)}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(eps), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    refused = f"{eps}: not a {', '.join(IMAGE_FORMATS)} image (other formats are refused)"
    assert out["load_image"] == refused
    assert out["validate"] == f"unreadable: {refused}"
    assert out["download"].endswith("not a PNG, JPEG, WEBP, GIF, BMP, TIFF image (other formats are refused)")
    assert out["gs_after_medvlm"] is False
    assert out["gs_after_plain_pil"] is True  # the file does reach Ghostscript when formats are not restricted


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT: decoding it would allocate the whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixels_are_bounded_before_decoding(tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(_png_header_only(12_000, 10_000))  # 120 M pixels: under PIL's own bomb error, over ours
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(MedvlmError) as e:
        load_image(big)
    assert str(e.value) == f"{big}: 12000x10000 pixels exceed the limit of {MAX_IMAGE_PIXELS} pixels"
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(small)
    assert load_image(small).size == (40, 30)
    with pytest.raises(MedvlmError, match="40x30 pixels exceed the limit of 1000 pixels"):
        load_image(small, max_pixels=1000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(MedvlmError, match="exceed the limit"):
        open_image(io.BytesIO(big.read_bytes()), "bytes", max_pixels=10)


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_accepted_format_loads(tmp_path, fmt):
    p = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (9, 7), (200, 100, 50)).save(p, format=fmt)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (9, 7)
