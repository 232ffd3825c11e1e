"""Image loading and aspect handling, identical in training, inference, evaluation and serving.

Aspect modes (a named config field, ``image_aspect``):
- ``square``: the image is passed unchanged; the CLIP image processor resizes the shortest edge and
  centre-crops (LLaVA's default, loses the borders of non-square figures).
- ``pad``: expand to a square canvas, image centred, filled with the image processor's mean colour
  × 255 ((122, 116, 104) for CLIP), then the processor resizes (LLaVA v1.5 / LLaVA-Med v1.5).
- ``resize``: plain resize to the processor's square input size (aspect not preserved).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from PIL import Image, UnidentifiedImageError

from medvlm.errors import MedvlmError

if TYPE_CHECKING:
    from medvlm.data.schema import Sample

ASPECT_MODES: tuple[str, ...] = ("square", "pad", "resize")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The only PIL formats medvlm opens (``Image.open(..., formats=IMAGE_FORMATS)``): what biomedical figure and
VQA datasets ship (PMC figures are JPEG/PNG/GIF, pathology and microscopy often TIFF or BMP). Every other
format is refused, so a file named ``.jpg`` that is really EPS/PDF/PSD never reaches Ghostscript or a rarely
used decoder."""
MAX_IMAGE_PIXELS: int = 100_000_000
"""Largest width x height decoded from a user's image file (checked from the header before decoding)."""


def check_aspect(mode: str) -> str:
    """Validate an aspect-mode name."""
    if mode not in ASPECT_MODES:
        raise MedvlmError(f"unknown image_aspect {mode!r}; choose one of {', '.join(ASPECT_MODES)}")
    return mode


def open_image(source: str | os.PathLike | BinaryIO, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS`, with the pixel count checked from the header.

    Lazy: nothing is decoded yet (call ``load()``); the caller closes the image. Raises MedvlmError naming
    ``name`` for another format, a corrupt header or too many pixels.
    """
    try:
        im = Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise MedvlmError(f"{name}: not a {', '.join(IMAGE_FORMATS)} image (other formats are refused)") from None
    except Image.DecompressionBombError as e:
        raise MedvlmError(f"{name}: too many pixels ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise MedvlmError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise MedvlmError(f"{name}: {w}x{h} pixels exceed the limit of {max_pixels} pixels")
    return im


def load_image(
    path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS, max_decoded_bytes: int | None = None
) -> Image.Image:
    """Load an image file as RGB, bounded in pixels before decoding (see :func:`open_image`).

    ``.dcm`` / ``.dicom`` files go through :mod:`medvlm.data.dicom` (needs ``medvlm[dicom]``), in memory, with
    ``max_pixels`` and ``max_decoded_bytes`` (default :data:`medvlm.data.dicom.DEFAULT_MAX_DECODED_BYTES`).
    """
    p = Path(path)
    if not p.is_file():
        raise MedvlmError(f"{p}: image file not found")
    if p.suffix.lower() in DICOM_SUFFIXES:
        from medvlm.data.dicom import DEFAULT_MAX_DECODED_BYTES, load_dicom  # optional extra, only for DICOM files

        return load_dicom(
            p,
            max_pixels=max_pixels,
            max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES if max_decoded_bytes is None else max_decoded_bytes,
        )
    with open_image(p, str(p), max_pixels) as im:
        try:
            im.load()
            return to_rgb(im)
        except Image.DecompressionBombError as e:
            raise MedvlmError(f"{p}: too many pixels ({e})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise MedvlmError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None


def load_sample_images(sample: Sample, image_folder: str | os.PathLike | None = None) -> list[Image.Image]:
    """Load a sample's images (paths relative to ``image_folder`` unless absolute); an error names the sample."""
    out = []
    for rel in sample.images:
        p = Path(rel)
        if not p.is_absolute() and image_folder is not None:
            p = Path(image_folder) / p
        try:
            out.append(load_image(p))
        except MedvlmError as e:
            raise MedvlmError(f"sample {sample.id!r}: {e}") from e
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white; 16-bit grey scaled to 8 bits)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else a * 0
        return Image.fromarray(a.astype("uint8"), mode="L").convert("RGB")
    return im.convert("RGB")


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of side max(w, h), the image centred (LLaVA's ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def apply_aspect(img: Image.Image, mode: str, background: tuple[int, int, int], size: int | None = None) -> Image.Image:
    """Apply an aspect mode before the image processor (see module docstring).

    ``size`` is the processor's square input side, needed only for ``resize``.
    """
    check_aspect(mode)
    if mode == "pad":
        return expand_to_square(img, background)
    if mode == "resize":
        if size is None:
            raise MedvlmError("image_aspect 'resize' needs the processor's input size")
        return img.resize((size, size), Image.BICUBIC)
    return img


def mean_color(image_mean: list[float] | tuple[float, ...]) -> tuple[int, int, int]:
    """The padding colour for ``pad``: the processor mean × 255, as LLaVA computes it (int truncation)."""
    return tuple(int(x * 255) for x in image_mean)  # type: ignore[return-value]
