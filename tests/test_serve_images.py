"""Request image decoding: formats, DICOM bytes, limits before decoding, remote fetches only when allowed."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medvlm.data.dicom import load_dicom
from medvlm.serve.images import ImageInputError, ImageLimits, image_from_url
from medvlm.serve.server import free_port
from serve_helpers import data_url, image_bytes, png_bomb

LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000)


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_raster_formats_decode_to_rgb(fmt: str, mime: str) -> None:
    im = image_from_url(data_url(image_bytes(fmt, (30, 20)), mime), LIMITS)
    assert im.mode == "RGB" and im.size == (30, 20)


def test_dicom_bytes_decode_like_the_file_loader(tmp_path: Path) -> None:
    path = get_testdata_file("CT_small.dcm")
    im = image_from_url(data_url(Path(path).read_bytes(), "application/dicom"), LIMITS)
    assert im.tobytes() == load_dicom(path).tobytes()
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 4000, 4000  # header claims 16M pixels: refused before decoding
    big = tmp_path / "big.dcm"
    ds.save_as(big)
    with pytest.raises(ImageInputError, match="exceed the limit") as e:
        image_from_url(data_url(big.read_bytes(), "application/dicom"), LIMITS)
    assert e.value.status == 413


def test_limits_and_bad_data() -> None:
    with pytest.raises(ImageInputError, match="decompression bomb|exceed the limit") as e:
        image_from_url(data_url(png_bomb()), LIMITS)
    assert e.value.status == 413
    with pytest.raises(ImageInputError) as e:
        image_from_url(data_url(b"x" * 300_000), LIMITS)
    assert e.value.status == 413
    for bad, match in [
        ("data:image/png;base64,###", "invalid base64"),
        ("data:image/png,rawtext", "base64 encoded"),
        (data_url(b"GIF89a" + b"\0" * 50, "image/gif"), "not a JPEG, PNG, WebP or DICOM"),
        ("/etc/hosts", "local files are never read"),
        ("file:///etc/hosts", "never read"),
    ]:
        with pytest.raises(ImageInputError, match=match) as e:
            image_from_url(bad, LIMITS)
        assert e.value.status == 400


class _Images(http.server.BaseHTTPRequestHandler):
    payloads = {"/ok.png": image_bytes("PNG", (16, 16)), "/big.png": b"\x89PNG" + b"\0" * 300_000}

    def do_GET(self) -> None:  # noqa: N802
        body = self.payloads.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_remote_urls_only_when_allowed_and_capped() -> None:
    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Images)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(ImageInputError, match="remote image URLs are disabled"):
            image_from_url(url + "/ok.png", LIMITS)
        # loopback is not a public address: refused unless the operator lists the network
        public_only = ImageLimits(max_bytes=200_000, max_pixels=1_000_000, allow_remote=True, remote_timeout_s=5)
        with pytest.raises(ImageInputError, match="could not be fetched"):
            image_from_url(url + "/ok.png", public_only)
        allowed = ImageLimits(
            max_bytes=200_000,
            max_pixels=1_000_000,
            allow_remote=True,
            remote_timeout_s=5,
            remote_allow_networks=("127.0.0.1/32",),
        )
        assert image_from_url(url + "/ok.png", allowed).size == (16, 16)
        # too large and missing give the same uniform error (nothing about what the URL answered)
        messages = set()
        for path in ("/big.png", "/missing.png"):
            with pytest.raises(ImageInputError, match="could not be fetched") as e:
                image_from_url(url + path, allowed)
            assert e.value.status == 400
            messages.add(str(e.value))
        assert len(messages) == 1
    finally:
        srv.shutdown()
        srv.server_close()
