"""Request images: ``data:`` URLs (base64 JPEG/PNG/WebP/DICOM), optional remote URLs, strict limits.

Every check that can reject an image runs before its pixels are decoded: the encoded size (from the
base64 length, before decoding it), the format (magic bytes; the declared media type is not trusted)
and the pixel count read from the header (PIL's lazy ``Image.open``, pydicom's header without pixel
data), so a decompression bomb is refused without being expanded. Local file paths and ``file:``
URLs are never read. Remote ``http(s)`` URLs are fetched only when the server allows it, streamed
with a byte cap and a time limit.

Failures raise :class:`ImageInputError` carrying the HTTP status the API answers with
(400 bad input, 413 too large).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from medvlm.data.images import to_rgb
from medvlm.errors import MedvlmError

PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
"""Raster formats accepted from clients."""
_DATA_URL = re.compile(r"^data:([\w.+/-]*)((?:;[\w.+-]+=[^;,]*)*)(;base64)?,", re.IGNORECASE)


class ImageInputError(MedvlmError):
    """A request image that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts per image."""

    max_bytes: int = 20 * 1024 * 1024
    """Largest encoded image (bytes after base64 decoding, or downloaded)."""
    max_pixels: int = 40_000_000
    """Largest width x height (x frames for DICOM), checked from the header before decoding."""
    allow_remote: bool = False
    """Fetch ``http(s)://`` image URLs (off by default: the server would reach any host it can)."""
    remote_timeout_s: float = 10.0
    """Total time allowed for one remote image download."""


def _check_pixels(width: int, height: int, frames: int, limits: ImageLimits, what: str) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"{what}: the image has no pixels ({width}x{height})")
    if width * height * max(frames, 1) > limits.max_pixels:
        raise ImageInputError(
            f"{what}: {width}x{height}{f'x{frames} frames' if frames > 1 else ''} pixels exceed the limit of "
            f"{limits.max_pixels} pixels", status=413)


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _decode_dicom(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    from medvlm.data.dicom import DicomTooLargeError, decode_dicom_bytes

    # decoded in memory (no temp file), de-identified, pixels and decoded bytes checked from the header first;
    # 10 bytes per allowed pixel = a 16-bit greyscale image at the pixel cap plus its float64 working copy
    try:
        return decode_dicom_bytes(data, max_pixels=limits.max_pixels, max_decoded_bytes=10 * limits.max_pixels,
                                  name=what)
    except DicomTooLargeError as e:
        raise ImageInputError(str(e), status=413) from None
    except MedvlmError as e:
        raise ImageInputError(str(e)) from None


def decode_image_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/DICOM image -> RGB PIL image, limits checked before decoding."""
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"{what}: {len(data)} bytes exceed the limit of {limits.max_bytes} bytes", status=413)
    if not data:
        raise ImageInputError(f"{what}: empty image data")
    if _is_dicom(data):
        return _decode_dicom(data, limits, what)
    try:
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: too many pixels (decompression bomb refused)", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageInputError(f"{what}: not a JPEG, PNG, WebP or DICOM image") from None
    try:
        _check_pixels(im.width, im.height, 1, limits, what)
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: too many pixels (decompression bomb refused)", status=413) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError(f"{what}: the image data is corrupt ({type(e).__name__})") from None
    finally:
        im.close()


def decode_base64(payload: str, limits: ImageLimits, what: str = "image") -> bytes:
    """Strict base64 -> bytes; the decoded size is checked from the length before decoding."""
    compact = "".join(payload.split())
    if len(compact) // 4 * 3 > limits.max_bytes + 3:
        raise ImageInputError(f"{what}: about {len(compact) // 4 * 3} bytes exceed the limit of {limits.max_bytes} bytes",
                              status=413)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{what}: invalid base64 data") from None


def fetch_remote(url: str, limits: ImageLimits, what: str = "image") -> bytes:
    """Download an ``http(s)`` image with a byte cap and a total time limit."""
    import httpx

    deadline = time.monotonic() + limits.remote_timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=True,
                          headers={"User-Agent": "medvlm-serve"}) as r:
            if r.status_code != 200:
                raise ImageInputError(f"{what}: fetching the URL gave HTTP {r.status_code}")
            declared = r.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageInputError(f"{what}: {declared} bytes exceed the limit of {limits.max_bytes} bytes", status=413)
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise ImageInputError(f"{what}: more than {limits.max_bytes} bytes (limit)", status=413)
                if time.monotonic() > deadline:
                    raise ImageInputError(f"{what}: download took longer than {limits.remote_timeout_s:g} s")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ImageInputError(f"{what}: could not fetch the URL ({type(e).__name__})") from None
    return b"".join(chunks)


def image_from_url(url: str, limits: ImageLimits, what: str = "image") -> Image.Image:
    """An OpenAI ``image_url.url``: a ``data:`` URL, or ``http(s)`` when allowed; never a local path."""
    m = _DATA_URL.match(url)
    if m:
        if not m.group(3):
            raise ImageInputError(f"{what}: data URLs must be base64 encoded (';base64,')")
        return decode_image_bytes(decode_base64(url[m.end():], limits, what), limits, what)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ImageInputError(f"{what}: remote image URLs are disabled on this server "
                                  "(send a base64 data: URL, or start it with --allow-remote-images)")
        return decode_image_bytes(fetch_remote(url, limits, what), limits, what)
    raise ImageInputError(f"{what}: only data: URLs{' and http(s) URLs' if limits.allow_remote else ''} are "
                          "accepted (local files are never read)")
