"""Request images: ``data:`` URLs (base64 JPEG/PNG/WebP/DICOM), optional remote URLs, strict limits.

Every check that can reject an image runs before its pixels are decoded: the encoded size (from the
base64 length, before decoding it), the format (magic bytes; the declared media type is not trusted)
and the header's geometry (PIL's lazy ``Image.open``, pydicom's header without pixel data). From the
header :func:`probe_image_bytes` gives the pixel count *and* an estimate of the memory decoding and
preprocessing will take (:func:`decoded_bytes_estimate`: bytes per pixel of the stored mode, the RGB
copy, and the processor's float copy of the padded square), so a request's images can be refused as a
whole before any of them is decoded (:mod:`medvlm.serve.admission`). Local file paths and ``file:``
URLs are never read. Remote ``http(s)`` URLs are fetched only when the server allows it, through
:mod:`medvlm.serve.remote` (public addresses only, every redirect hop checked, one total deadline).

Failures raise :class:`ImageInputError` carrying the HTTP status the API answers with
(400 bad input, 413 too large).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageMode, UnidentifiedImageError

from medvlm.data.images import to_rgb
from medvlm.errors import MedvlmError

PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
"""Raster formats accepted from clients."""
PREPROCESS_BYTES_PER_PIXEL = 16
"""Measured peak of the image processor per pixel of the padded square (RGB uint8 + float32 copies)."""
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
    """Fetch ``http(s)://`` image URLs (off by default). Only public addresses are reached."""
    remote_timeout_s: float = 10.0
    """Total deadline for one remote image: every redirect hop, connect, headers and body together."""
    remote_max_redirects: int = 3
    """Most redirects followed for one remote image (each hop's address is checked)."""
    remote_allow_networks: tuple[str, ...] = ()
    """Non-public networks (CIDR, e.g. ``10.1.2.0/24``) remote fetches may reach anyway (an intranet image
    server). Empty: only globally routable addresses."""


@dataclass
class ImageProbe:
    """An image checked from its header, not decoded yet."""

    data: bytes
    """The encoded bytes."""
    kind: str
    """``pil`` (JPEG/PNG/WebP) or ``dicom``."""
    width: int
    height: int
    frames: int
    """Frames (DICOM multi-frame; 1 otherwise)."""
    decoded_bytes: int
    """Estimated peak memory of decoding and preprocessing this image."""
    dicom_budget: int = 0
    """DICOM only: the pixel/decoded-bytes budget the decoder applies again (``max_decoded_bytes``)."""
    max_pixels: int = 0
    """DICOM only: the pixel limit the decoder applies again."""


def _check_pixels(width: int, height: int, frames: int, limits: ImageLimits, what: str) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"{what}: the image has no pixels ({width}x{height})")
    if width * height * max(frames, 1) > limits.max_pixels:
        raise ImageInputError(
            f"{what}: {width}x{height}{f'x{frames} frames' if frames > 1 else ''} pixels exceed the limit of "
            f"{limits.max_pixels} pixels",
            status=413,
        )


def decoded_bytes_estimate(
    width: int, height: int, stored_bytes_per_pixel: float, frames: int = 1, working_bytes_per_pixel: int = 0
) -> int:
    """Peak memory of turning a ``width`` x ``height`` image into model input.

    The stored pixels (``stored_bytes_per_pixel`` x frames), any per-frame working copies (DICOM's float
    windowing), the 4-byte RGB image, and the processor's copies of the padded square.
    """
    pixels = width * height
    side = max(width, height)
    return int(
        pixels * frames * stored_bytes_per_pixel
        + pixels * (working_bytes_per_pixel + 4)
        + side * side * PREPROCESS_BYTES_PER_PIXEL
    )


def _pil_bytes_per_pixel(mode: str) -> int:
    """PIL's in-memory pixel size: single-band modes use their item size, multi-band 8-bit ones 4 bytes."""
    try:
        desc = ImageMode.getmode(mode)
    except KeyError:
        return 4
    if len(desc.bands) > 1:
        return 4 * max(1, int(desc.typestr[-1]) if desc.typestr[-1].isdigit() else 1)
    return max(1, int(desc.typestr[-1]) if desc.typestr[-1].isdigit() else 4)


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_budget(limits: ImageLimits) -> int:
    # 10 bytes per allowed pixel = a 16-bit greyscale image at the pixel cap plus its float64 working copy;
    # the per-request decoded-memory budget (Admission) is checked on top of this from the probe's estimate
    return 10 * limits.max_pixels


def _probe_dicom(data: bytes, limits: ImageLimits, what: str) -> ImageProbe:
    from medvlm.data.dicom import DicomTooLargeError, read_dicom_dataset

    # the bounded, de-identifying header reader (no temp file, Deflated data inflated with a cap)
    try:
        head = read_dicom_dataset(
            data, max_pixels=limits.max_pixels, max_decoded_bytes=_dicom_budget(limits), name=what
        )
    except DicomTooLargeError as e:
        raise ImageInputError(str(e), status=413) from None
    except MedvlmError as e:
        raise ImageInputError(str(e)) from None
    rows, cols = int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)
    frames = int(head.get("NumberOfFrames", 1) or 1)
    samples = int(head.get("SamplesPerPixel", 1) or 1)
    bits = int(head.get("BitsAllocated", 16) or 16)
    _check_pixels(cols, rows, frames, limits, what)
    if not 1 <= samples <= 4 or not 1 <= bits <= 64:
        raise ImageInputError(f"{what}: unsupported DICOM pixel layout ({samples} samples of {bits} bits)")
    # stored samples, then per frame: the modality/VOI windowing works in float64 (a few copies) -> uint8 RGB
    stored = samples * -(-bits // 8)
    estimate = decoded_bytes_estimate(cols, rows, stored, frames, working_bytes_per_pixel=3 * 8 * samples)
    return ImageProbe(
        data=data,
        kind="dicom",
        width=cols,
        height=rows,
        frames=frames,
        decoded_bytes=estimate,
        dicom_budget=_dicom_budget(limits),
        max_pixels=limits.max_pixels,
    )


def probe_image_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> ImageProbe:
    """Check bytes of a JPEG/PNG/WebP/DICOM image from its header (size, format, pixels); nothing decoded."""
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"{what}: {len(data)} bytes exceed the limit of {limits.max_bytes} bytes", status=413)
    if not data:
        raise ImageInputError(f"{what}: empty image data")
    if _is_dicom(data):
        return _probe_dicom(data, limits, what)
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:  # lazy: reads the header only
            width, height, mode = im.width, im.height, im.mode
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: too many pixels (decompression bomb refused)", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageInputError(f"{what}: not a JPEG, PNG, WebP or DICOM image") from None
    _check_pixels(width, height, 1, limits, what)
    estimate = decoded_bytes_estimate(width, height, _pil_bytes_per_pixel(mode))
    return ImageProbe(data=data, kind="pil", width=width, height=height, frames=1, decoded_bytes=estimate)


def _decode_dicom(probe: ImageProbe, what: str) -> Image.Image:
    from medvlm.data.dicom import DicomTooLargeError, decode_dicom_bytes

    # decoded in memory (no temp file), de-identified, pixels and decoded bytes checked from the header first
    try:
        return decode_dicom_bytes(
            probe.data, max_pixels=probe.max_pixels, max_decoded_bytes=probe.dicom_budget, name=what
        )
    except DicomTooLargeError as e:
        raise ImageInputError(str(e), status=413) from None
    except MedvlmError as e:
        raise ImageInputError(str(e)) from None


def decode_probe(probe: ImageProbe, what: str = "image") -> Image.Image:
    """Decode a probed image to RGB."""
    if probe.kind == "dicom":
        return _decode_dicom(probe, what)
    try:
        with Image.open(io.BytesIO(probe.data), formats=PIL_FORMATS) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: too many pixels (decompression bomb refused)", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError(f"{what}: the image data is corrupt ({type(e).__name__})") from None


def decode_image_bytes(data: bytes, limits: ImageLimits, what: str = "image") -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/DICOM image -> RGB PIL image, limits checked before decoding."""
    return decode_probe(probe_image_bytes(data, limits, what), what)


def decode_base64(payload: str, limits: ImageLimits, what: str = "image") -> bytes:
    """Strict base64 -> bytes; the decoded size is checked from the length before decoding."""
    compact = "".join(payload.split())
    if len(compact) // 4 * 3 > limits.max_bytes + 3:
        raise ImageInputError(
            f"{what}: about {len(compact) // 4 * 3} bytes exceed the limit of {limits.max_bytes} bytes", status=413
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{what}: invalid base64 data") from None


def image_bytes_from_url(url: str, limits: ImageLimits, what: str = "image") -> bytes:
    """The encoded bytes an OpenAI ``image_url.url`` names: a ``data:`` URL, or ``http(s)`` when allowed."""
    m = _DATA_URL.match(url)
    if m:
        if not m.group(3):
            raise ImageInputError(f"{what}: data URLs must be base64 encoded (';base64,')")
        return decode_base64(url[m.end() :], limits, what)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ImageInputError(
                f"{what}: remote image URLs are disabled on this server "
                "(send a base64 data: URL, or start it with --allow-remote-images)"
            )
        from medvlm.serve.remote import fetch_remote

        return fetch_remote(url, limits, what)
    raise ImageInputError(
        f"{what}: only data: URLs{' and http(s) URLs' if limits.allow_remote else ''} are "
        "accepted (local files are never read)"
    )


def image_from_url(url: str, limits: ImageLimits, what: str = "image") -> Image.Image:
    """An OpenAI ``image_url.url`` decoded to RGB (a ``data:`` URL, or ``http(s)`` when allowed)."""
    return decode_image_bytes(image_bytes_from_url(url, limits, what), limits, what)
