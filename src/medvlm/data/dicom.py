"""DICOM -> 8-bit RGB PIL image, the way a radiologist's viewer would show it (needs ``medvlm[dicom]``).

Pipeline for greyscale images: modality LUT (rescale slope/intercept,
``pydicom.pixels.apply_modality_lut``) -> VOI from the header (VOI LUT Sequence or Window
Center/Width, ``apply_voi_lut``), or, when the header has none, a percentile window (0.5-99.5) of the
pixel values -> 8 bits -> MONOCHROME1 inverted (so bright is dense, as for MONOCHROME2). Colour
images: RGB/YBR as decoded by pydicom (YBR is converted to RGB), palette colour through its LUT.
Multi-frame files give one frame: the middle one by default (``frame="first"`` or an index also work);
only that frame is decoded.

Hostile input: everything is read from memory (never copied to a temp file). Before any pixel is
decoded, the header is read with bounded cost (at most ``MAX_HEADER_BYTES`` and ``MAX_HEADER_ELEMENTS``
top-level elements before the pixel data) and ``rows x columns x frames`` is checked against
``max_pixels`` and ``rows x columns x samples x bytes-per-sample x frames`` (plus the float working
copy of one frame) against ``max_decoded_bytes``. A Deflated-transfer-syntax file is inflated as a
stream: only as far as the header first, then at most the pixel data the header declares, so a
deflate bomb costs a few kilobytes of work, never its inflated size.

Privacy: right after the header is read, every attribute PS3.15's basic confidentiality profile
removes is deleted from the dataset (:mod:`medvlm.data.dicom_deid`), so nothing downstream (pixel
decoders, their error messages, our messages) can see patient-identifying values.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medvlm.errors import MedvlmError

PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
"""Percentiles used as the window when the header gives none."""
FRAME_CHOICES: tuple[str, ...] = ("middle", "first")
MAX_HEADER_BYTES: int = 16 * 1024**2
"""Most bytes of header (file meta and data elements before the pixel data) read from one file."""
MAX_HEADER_ELEMENTS: int = 100_000
"""Most top-level elements read before the pixel data (a stream of tiny elements costs time, not bytes)."""
DEFAULT_MAX_PIXELS: int = 100_000_000
"""Default cap on rows x columns x frames (``data`` readers, ``validate``, training, ``medvlm chat``)."""
DEFAULT_MAX_DECODED_BYTES: int = 1024**3
"""Default cap on the decoded pixel array (all frames) plus the float working copy of one frame."""
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, FloatPixelData, DoubleFloatPixelData
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"


class DicomTooLargeError(MedvlmError):
    """A DICOM file whose header declares more pixels or decoded bytes than allowed (refused before decoding)."""


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (the processing functions live here)
    except ImportError as e:
        raise MedvlmError("reading DICOM (.dcm) images needs pydicom: pip install 'medvlm[dicom]'") from e
    return pydicom


def _frame_index(frames: int, frame: str | int, name: str) -> int | None:
    """Index of the frame to decode (None for a single-frame file)."""
    if frames <= 1:
        return None
    if frame == "middle":
        return frames // 2
    if frame == "first":
        return 0
    if isinstance(frame, int) and not isinstance(frame, bool) and -frames <= frame < frames:
        return frame % frames
    raise MedvlmError(f"{name}: frame {frame!r}: choose 'middle', 'first' or an index in 0..{frames - 1}")


def _itemsize(bits_allocated: int) -> int:
    """Bytes per decoded sample: numpy's next power of two (1-bit data is unpacked to one byte)."""
    return 1 << max(0, (bits_allocated - 1).bit_length() - 3)


def decoded_size(rows: int, columns: int, samples: int, bits_allocated: int, frames: int) -> int:
    """Bytes the decode of a file with this header needs: every frame's samples, plus one frame in float64."""
    return rows * columns * samples * (_itemsize(bits_allocated) * frames + 8)


class _Body:
    """The dataset bytes after the file meta: a slice of the file, or inflated on demand (Deflated syntax).

    ``take(n)`` returns the first ``n`` bytes (fewer at the end); ``more`` says whether bytes remain
    beyond what was taken. Inflation is streamed with ``max_length``, so a bomb costs only what is asked.
    """

    def __init__(self, raw: memoryview, deflated: bool, name: str):
        self._raw, self._name = raw, name
        self._zd = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._out = bytearray()
        self._tail: bytes | memoryview = raw

    def take(self, n: int) -> bytes:
        if self._zd is None:
            return bytes(self._raw[:n])
        while len(self._out) < n and not self._zd.eof:
            try:
                # with an empty tail this still returns output zlib holds back when max_length cut it short
                chunk = self._zd.decompress(self._tail, min(n - len(self._out), 1 << 20))
            except zlib.error as e:
                raise MedvlmError(f"{self._name}: corrupt Deflated DICOM data ({e})") from None
            self._tail = self._zd.unconsumed_tail
            if not chunk and not self._tail:
                break  # the input ends before the deflate stream does
            self._out += chunk
        return bytes(self._out[:n])

    def more(self, n: int) -> bool:
        if self._zd is None:
            return len(self._raw) > n
        self.take(n + 1)
        return len(self._out) > n


class _HeaderWatch:
    """``stop_when`` callback for pydicom's ``read_dataset``: stops at the pixel data, bounds the header."""

    def __init__(self, fp: io.BytesIO, name: str, stop_group: int | None = None):
        self.fp, self.name, self.stop_group = fp, name, stop_group
        self.count = 0
        self.pixel: tuple[int, int, int] | None = None  # (tag, value length, offset of the element)

    def __call__(self, tag: Any, vr: str | None, length: int) -> bool:
        if self.stop_group is not None:
            return tag.group != self.stop_group
        if int(tag) in _PIXEL_TAGS:
            rewind = 12 if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else 8
            self.pixel = (int(tag), length, self.fp.tell() - rewind)
            return True
        self.count += 1
        if self.count > MAX_HEADER_ELEMENTS:
            raise DicomTooLargeError(f"{self.name}: DICOM header has more than {MAX_HEADER_ELEMENTS} elements")
        if length != _UNDEFINED and self.fp.tell() + length > MAX_HEADER_BYTES:
            raise DicomTooLargeError(f"{self.name}: DICOM header is larger than {MAX_HEADER_BYTES} bytes")
        return False


def _int(ds: Any, keyword: str, default: int | None, name: str) -> int:
    value = ds.get(keyword, default)
    try:
        n = int(value if value not in (None, "") else default)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MedvlmError(f"{name}: DICOM {keyword} {value!r} is not a number") from None
    if n < 1:
        raise MedvlmError(f"{name}: DICOM {keyword} is {n}, must be at least 1")
    return n


def read_dicom_dataset(
    data: bytes | memoryview, *, max_pixels: int, max_decoded_bytes: int, name: str = "DICOM image"
) -> Any:
    """Parse DICOM bytes into a de-identified pydicom Dataset whose pixel data fits the budgets.

    Reads the file meta and the header (bounded by ``MAX_HEADER_BYTES`` / ``MAX_HEADER_ELEMENTS``),
    inflating a Deflated dataset only as far as needed, deletes what PS3.15's basic profile removes,
    checks ``rows x columns x frames <= max_pixels`` and :func:`decoded_size` ``<= max_decoded_bytes``
    (:class:`DicomTooLargeError` otherwise), and only then reads the pixel data element. Elements after
    the pixel data are never parsed. Nothing is decoded yet and nothing is written anywhere.
    """
    _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import UID

    from medvlm.data.dicom_deid import deidentify

    view = memoryview(data)
    try:
        fp = io.BytesIO(view[: 132 + MAX_HEADER_BYTES])
        read_preamble(fp, False)
        meta_watch = _HeaderWatch(fp, name, stop_group=2)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=meta_watch)
        start = fp.tell()
        if "TransferSyntaxUID" not in meta:
            raise MedvlmError(f"{name}: not a readable DICOM file (no transfer syntax in the file meta information)")
        ts = UID(str(meta.TransferSyntaxUID))
        if not ts.is_transfer_syntax:
            raise MedvlmError(f"{name}: DICOM transfer syntax {str(ts)!r} is not a known transfer syntax")
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        body = _Body(view[start:], ts == _DEFLATED, name)
        head = io.BytesIO(body.take(MAX_HEADER_BYTES))
        watch = _HeaderWatch(head, name)
        ds = read_dataset(head, implicit, little, stop_when=watch)
    except MedvlmError:
        raise
    except InvalidDicomError as e:
        raise MedvlmError(f"{name}: not a readable DICOM file ({e})") from None
    except (ValueError, TypeError, KeyError, EOFError, OSError, AttributeError, NotImplementedError, struct.error) as e:
        # the message may quote header values read before de-identification: name the error type only
        raise MedvlmError(f"{name}: not a readable DICOM file ({type(e).__name__})") from None
    deidentify(ds)
    if watch.pixel is None:
        if body.more(MAX_HEADER_BYTES):
            raise DicomTooLargeError(f"{name}: DICOM header is larger than {MAX_HEADER_BYTES} bytes")
        raise MedvlmError(f"{name}: DICOM file holds no image (no pixel data)")
    rows, cols = _int(ds, "Rows", None, name), _int(ds, "Columns", None, name)
    samples, bits = _int(ds, "SamplesPerPixel", 1, name), _int(ds, "BitsAllocated", None, name)
    frames = _int(ds, "NumberOfFrames", 1, name)
    if rows * cols * frames > max_pixels:
        raise DicomTooLargeError(
            f"{name}: {cols}x{rows}{f'x{frames} frames' if frames > 1 else ''} pixels "
            f"exceed the limit of {max_pixels} pixels"
        )
    need = decoded_size(rows, cols, samples, bits, frames)
    if need > max_decoded_bytes:
        raise DicomTooLargeError(
            f"{name}: decoding needs {need} bytes ({cols}x{rows}, {samples} samples of "
            f"{bits} bits, {frames} frames), over the limit of {max_decoded_bytes} bytes"
        )
    tag, length, offset = watch.pixel
    if length != _UNDEFINED and length > max_decoded_bytes:
        raise DicomTooLargeError(f"{name}: pixel data of {length} bytes exceeds the limit of {max_decoded_bytes} bytes")
    # Read no more of the pixel element than the decode can use: native data is at most ``need`` bytes and
    # compressed frames are smaller (1 MiB of slack for item headers). A longer declared length (a Deflated
    # stream of zeros behind a 1x1 header) is cut here instead of being inflated.
    end = offset + 12 + min(length if length != _UNDEFINED else need, need) + (1 << 20)
    try:
        pix_fp = io.BytesIO(body.take(end))
        pix_fp.seek(offset)
        pix = read_dataset(pix_fp, implicit, little, stop_when=lambda t, vr, n: int(t) != tag)
    except (ValueError, TypeError, KeyError, EOFError, OSError, AttributeError, NotImplementedError, struct.error) as e:
        raise MedvlmError(f"{name}: cannot read the DICOM pixel data ({type(e).__name__})") from None
    if tag not in pix:
        raise MedvlmError(f"{name}: cannot read the DICOM pixel data")
    ds[tag] = pix[tag]
    meta.TransferSyntaxUID = UID(_EXPLICIT_LE) if ts == _DEFLATED else ts  # the body is inflated now
    ds.file_meta = FileMetaDataset(meta)
    deidentify(ds)  # the file meta (MediaStorageSOPInstanceUID ...)
    ds.set_original_encoding(implicit, little, ds.get("SpecificCharacterSet"))
    return ds


def _voi_range(ds: Any) -> tuple[float, float] | None:
    """Output range of ``apply_voi_lut`` for this header, or None when it applies nothing.

    Mirrors pydicom's ``apply_voi`` (LUT: 0..2**bits-1) and ``apply_windowing`` (the stored range,
    rescaled by slope/intercept when present) so the window maps onto 0..255.
    """
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = a.astype(np.float64)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return (np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grey_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT, VOI window (header or percentile) and MONOCHROME1 inversion -> uint8 [H, W]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    a = apply_modality_lut(arr, ds)  # stored values -> modality units (e.g. Hounsfield)
    rng = _voi_range(ds)
    if rng is not None:
        out = _to_uint8(apply_voi_lut(a, ds, index=0), *rng)
    else:
        lo, hi = np.percentile(a, PERCENTILE_WINDOW)
        out = _to_uint8(a, float(lo), float(hi))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are bright
    return out


def _colour_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Scale colour samples of ``bits`` significant bits to 0..255."""
    if bits <= 8 and arr.dtype == np.uint8:
        return arr
    return _to_uint8(arr, 0.0, float(2**bits - 1))


def decode_dicom_bytes(
    data: bytes | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    frame: str | int = "middle",
    name: str = "DICOM image",
) -> Image.Image:
    """DICOM file bytes -> 8-bit RGB PIL image, in memory, budgets checked before decoding (see module docstring).

    ``name`` is used in messages (a file path, or "image 2" for a request). Raises
    :class:`DicomTooLargeError` over a budget, :class:`MedvlmError` for anything unreadable.
    """
    if isinstance(frame, str) and frame not in FRAME_CHOICES:
        raise MedvlmError(f"{name}: frame {frame!r}: choose 'middle', 'first' or an index")
    ds = read_dicom_dataset(data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes, name=name)
    from pydicom.pixels import apply_color_lut

    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    index = _frame_index(_int(ds, "NumberOfFrames", 1, name), frame, name)
    try:
        ds.pixel_array_options(index=index, allow_excess_frames=False)  # only the chosen frame, as many as declared
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
        if pi == "PALETTE COLOR":
            # palette entries have their own bit depth (LUT descriptor), not BitsStored
            rgb = _colour_to_uint8(apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
        elif arr.ndim == 3 and arr.shape[-1] == 3:
            rgb = _colour_to_uint8(arr, int(ds.get("BitsStored", 8) or 8))
        elif arr.ndim == 2:
            rgb = np.repeat(grey_to_uint8(arr, ds)[:, :, None], 3, axis=2)
        else:
            raise ValueError(
                f"unsupported pixel array shape {arr.shape} for {pi or 'unknown'} photometric interpretation"
            )
    except MedvlmError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, IndexError) as e:
        # identifying attributes were deleted before decoding, so the library's message cannot quote them
        raise MedvlmError(f"{name}: cannot decode the DICOM pixel data ({type(e).__name__}: {e})") from None
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def load_dicom(
    path: str | os.PathLike,
    frame: str | int = "middle",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Read a DICOM file as an 8-bit RGB PIL image (see module docstring). ``frame``: middle | first | index.

    The file is read into memory once (at most ``max_decoded_bytes + MAX_HEADER_BYTES`` bytes: a larger
    file cannot fit the budget) and decoded by :func:`decode_dicom_bytes`.
    """
    path = Path(path)
    if isinstance(frame, str) and frame not in FRAME_CHOICES:
        raise MedvlmError(f"frame {frame!r}: choose 'middle', 'first' or an index")
    _pydicom()
    if not path.is_file():
        raise MedvlmError(f"{path}: image file not found")
    cap = max_decoded_bytes + MAX_HEADER_BYTES
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise MedvlmError(f"{path}: cannot read the file ({e.strerror})") from None
    if len(data) > cap:
        raise DicomTooLargeError(
            f"{path}: DICOM file is larger than {cap} bytes (the decoded-bytes limit plus the header limit)"
        )
    return decode_dicom_bytes(
        data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes, frame=frame, name=str(path)
    )
