"""DICOM -> 8-bit RGB PIL image, the way a radiologist's viewer would show it (needs ``medvlm[dicom]``).

Pipeline for greyscale images: modality LUT (rescale slope/intercept,
``pydicom.pixels.apply_modality_lut``) -> VOI from the header (VOI LUT Sequence or Window
Center/Width, ``apply_voi_lut``), or, when the header has none, a percentile window (0.5-99.5) of the
pixel values -> 8 bits -> MONOCHROME1 inverted (so bright is dense, as for MONOCHROME2). Colour
images: RGB/YBR as decoded by pydicom (YBR is converted to RGB), palette colour through its LUT.
Multi-frame files give one frame: the middle one by default (``frame="first"`` or an index also work).

Privacy: patient-identifying header values are never logged, returned or written. Error messages name
the file and the problem only; values of identifying fields are redacted from library messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medvlm.errors import MedvlmError

PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
"""Percentiles used as the window when the header gives none."""
FRAME_CHOICES: tuple[str, ...] = ("middle", "first")
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "IssuerOfPatientID", "AccessionNumber",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "StudyID", "MedicalRecordLocator", "PatientSex", "PatientAge",
)
"""Header fields that may identify a patient: never printed (their values are scrubbed from errors)."""


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (the processing functions live here)
    except ImportError as e:
        raise MedvlmError("reading DICOM (.dcm) images needs pydicom: pip install 'medvlm[dicom]'") from e
    return pydicom


def _scrub(text: str, ds: Any) -> str:
    """Remove identifying header values from a message (library errors may quote header content)."""
    if ds is None:
        return text
    for kw in IDENTIFYING_KEYWORDS:
        value = ds.get(kw) if hasattr(ds, "get") else None
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            s = str(v).strip()
            if len(s) >= 2:
                text = text.replace(s, "<redacted>")
    return text


def _fail(path: Path, what: str, err: BaseException | None, ds: Any) -> MedvlmError:
    detail = f" ({type(err).__name__}: {_scrub(str(err), ds)})" if err is not None else ""
    return MedvlmError(f"{path}: {what}{detail}")


def _select_frame(arr: np.ndarray, ds: Any, frame: str | int) -> np.ndarray:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n <= 1:
        return arr
    if frame == "middle":
        i = n // 2
    elif frame == "first":
        i = 0
    elif isinstance(frame, int) and -n <= frame < n:
        i = frame
    else:
        raise MedvlmError(f"frame {frame!r}: choose 'middle', 'first' or an index in 0..{n - 1}")
    return arr[i]


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
        lo, hi = 0.0, float(2 ** bits - 1)
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
    return _to_uint8(arr, 0.0, float(2 ** bits - 1))


def load_dicom(path: str | os.PathLike, frame: str | int = "middle") -> Image.Image:
    """Read a DICOM file as an 8-bit RGB PIL image (see module docstring). ``frame``: middle | first | index."""
    path = Path(path)
    if isinstance(frame, str) and frame not in FRAME_CHOICES:
        raise MedvlmError(f"frame {frame!r}: choose 'middle', 'first' or an index")
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut

    if not path.is_file():
        raise MedvlmError(f"{path}: image file not found")
    ds = None
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise _fail(path, "not a readable DICOM file", e, None) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(path, "DICOM file holds no image (no pixel data)", None, ds)
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
        arr = _select_frame(arr, ds, frame)
        if pi == "PALETTE COLOR":
            # palette entries have their own bit depth (LUT descriptor), not BitsStored
            rgb = _colour_to_uint8(apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
        elif arr.ndim == 3 and arr.shape[-1] == 3:
            rgb = _colour_to_uint8(arr, int(ds.get("BitsStored", 8) or 8))
        elif arr.ndim == 2:
            rgb = np.repeat(grey_to_uint8(arr, ds)[:, :, None], 3, axis=2)
        else:
            raise ValueError(f"unsupported pixel array shape {arr.shape} for {pi or 'unknown'} photometric interpretation")
    except MedvlmError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, IndexError) as e:
        raise _fail(path, "cannot decode the DICOM pixel data", e, ds) from None
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
