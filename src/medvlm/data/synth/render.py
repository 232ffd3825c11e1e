"""Pixel rendering for the synthetic biomedical demo dataset (:mod:`medvlm.data.synth`).

Every answer of the dataset is decided by what is drawn here, and the drawing is designed to be easy
for a tiny from-scratch ViT (64-128 px, patch 8-16): a distinctive global look per modality and big,
high-contrast, well separated lesions.

Pixel contract (tests recover every factor from the array with it):
- a bright lesion has every RGB channel >= :data:`BRIGHT_MIN`; nothing else in the image does;
- a dark lesion has every channel <= :data:`DARK_MAX`; anything else that dark is background
  connected to the image border (outside the body), never inside the body;
- lesions of the left side lie entirely in the left half of the image, right ones in the right half;
- all lesions of an image have one size: radius ~``SIZE_RADIUS[size] * image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MODALITIES: tuple[str, ...] = ("xray", "ct", "mri", "histology", "gross")
"""Rendered modalities; each maps onto one LLaVA-Med domain (:data:`MODALITY_DOMAIN`)."""
MODALITY_DOMAIN: dict[str, str] = {
    "xray": "chest_xray",
    "ct": "ct_scan",
    "mri": "mri",
    "histology": "histology",
    "gross": "gross",
}
COUNTS: tuple[int, ...] = (1, 2, 3)
SIDES: tuple[str, ...] = ("left", "right", "both")
"""Side of the *image* (viewer's left/right) holding the lesions; ``both`` needs two or more lesions."""
SIZES: tuple[str, ...] = ("small", "large")
INTENSITIES: tuple[str, ...] = ("bright", "dark")
SIZE_RADIUS: dict[str, float] = {"small": 0.05, "large": 0.09}
"""Lesion radius as a fraction of the image side."""
BRIGHT_MIN = 230
DARK_MAX = 40

# Lesion centres (fractions of the image side). The vertical slots are 0.25 apart so that even large
# lesions (diameter 0.18) keep a clear gap, and the whole stack stays inside every body outline.
_SIDE_X = {"left": 0.32, "right": 0.68}
_SLOTS = {1: (0.5,), 2: (0.375, 0.625), 3: (0.25, 0.5, 0.75)}
_LESION_RGB = {
    "bright": {
        "xray": (250, 250, 250),
        "ct": (250, 250, 250),
        "mri": (250, 250, 250),
        "histology": (252, 247, 250),
        "gross": (252, 246, 236),
    },
    "dark": {"xray": (6, 6, 6), "ct": (6, 6, 6), "mri": (6, 6, 6), "histology": (28, 8, 34), "gross": (30, 12, 10)},
}


@dataclass(frozen=True)
class Factors:
    """The visual factors of one image; every question's answer is a function of these."""

    modality: str
    """One of :data:`MODALITIES`."""
    count: int
    """Number of lesions (1-3)."""
    side: str
    """``left`` | ``right`` | ``both`` (image side)."""
    size: str
    """``small`` | ``large``."""
    intensity: str
    """``bright`` | ``dark`` (relative to the surrounding tissue)."""

    @property
    def domain(self) -> dict[str, bool]:
        """LLaVA-Med's five domain booleans for this modality."""
        dom = MODALITY_DOMAIN[self.modality]
        return {d: d == dom for d in ("chest_xray", "mri", "ct_scan", "histology", "gross")}


def lesion_layout(f: Factors, rng: np.random.Generator) -> list[tuple[float, float, str]]:
    """Lesion centres ``(x, y, side)`` as fractions of the image side, well separated and inside the body."""
    if f.side == "both":
        major = str(rng.choice(["left", "right"]))
        minor = "right" if major == "left" else "left"
        groups = [(major, f.count - 1), (minor, 1)]
    else:
        groups = [(f.side, f.count)]
    out = []
    for side, k in groups:
        shift = rng.uniform(-0.015, 0.015)  # the stack moves as a whole, so the gaps never shrink
        for y in _SLOTS[k]:
            out.append((_SIDE_X[side] + rng.uniform(-0.02, 0.02), y + shift, side))
    return out


def _jit(rng: np.random.Generator, base: int, spread: int) -> int:
    return int(base + rng.integers(-spread, spread + 1))


def _grey(v: int) -> tuple[int, int, int]:
    return (v, v, v)


def _rgb(rng: np.random.Generator, base: tuple[int, int, int], spread: int) -> tuple[int, int, int]:
    return tuple(_jit(rng, c, spread) for c in base)  # type: ignore[return-value]


class _Canvas:
    """ImageDraw with coordinates given as fractions of the image side."""

    def __init__(self, size: int, background: tuple[int, int, int]):
        self.size = size
        self.img = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.img)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple[int, int, int]) -> None:
        s = self.size
        self.draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int]) -> None:
        s = self.size
        self.draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=fill)

    def arc(self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int], width: float) -> None:
        s = self.size
        self.draw.arc([x0 * s, y0 * s, x1 * s, y1 * s], start=195, end=345, fill=fill, width=max(1, round(width * s)))

    def line(self, pts: list[tuple[float, float]], fill: tuple[int, int, int], width: float) -> None:
        s = self.size
        self.draw.line([(x * s, y * s) for x, y in pts], fill=fill, width=max(1, round(width * s)))


def _xray(c: _Canvas, rng: np.random.Generator) -> None:
    # Frontal chest radiograph: dark lungs, bright rib arcs, bright spine, grey soft tissue.
    c.ellipse(0.5, 0.64, 0.45, 0.62, _grey(_jit(rng, 105, 8)))
    lung = _jit(rng, 62, 5)
    for cx in (0.3, 0.7):
        c.ellipse(cx + rng.uniform(-0.01, 0.01), 0.52, 0.17, 0.37, _grey(lung))
    c.ellipse(0.56, 0.64, 0.12, 0.13, _grey(_jit(rng, 125, 6)))  # cardiac silhouette
    rib = _grey(_jit(rng, 170, 8))
    n_ribs = int(rng.integers(5, 8))
    for y in np.linspace(0.16, 0.78, n_ribs):
        c.arc(0.09, y, 0.49, y + 0.16, rib, 0.022)
        c.arc(0.51, y, 0.91, y + 0.16, rib, 0.022)
    c.rect(0.47, 0.0, 0.53, 1.0, _grey(_jit(rng, 182, 6)))  # spine


def _ct(c: _Canvas, rng: np.random.Generator) -> None:
    # Axial CT: round body outline on black, bright rim, grey soft tissue, bright vertebra.
    cx, cy, r = 0.5 + rng.uniform(-0.005, 0.005), 0.5 + rng.uniform(-0.005, 0.005), 0.47 + rng.uniform(-0.01, 0.01)
    c.ellipse(cx, cy, r, r, _grey(_jit(rng, 205, 8)))
    c.ellipse(cx, cy, r - 0.025, r - 0.025, _grey(_jit(rng, 112, 10)))
    c.ellipse(0.5, 0.45, 0.12 + rng.uniform(-0.02, 0.02), 0.09, _grey(_jit(rng, 138, 6)))
    c.ellipse(0.5, 0.86, 0.045, 0.045, _grey(_jit(rng, 212, 6)))


def _mri(c: _Canvas, rng: np.random.Generator) -> None:
    # Axial MR head: darker overall, bright scalp rim, smooth grey blobs (blurred).
    c.ellipse(0.5, 0.5, 0.42, 0.47, _grey(_jit(rng, 160, 8)))
    c.ellipse(0.5, 0.5, 0.39, 0.44, _grey(_jit(rng, 72, 5)))
    for _ in range(int(rng.integers(6, 10))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.28)
        c.ellipse(
            0.5 + d * np.cos(a) * 0.85,
            0.5 + d * np.sin(a),
            rng.uniform(0.04, 0.09),
            rng.uniform(0.04, 0.09),
            _grey(_jit(rng, 104, 12)),
        )
    c.img = c.img.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.015 * c.size)))
    c.draw = ImageDraw.Draw(c.img)


def _histology(c: _Canvas, rng: np.random.Generator) -> None:
    # H&E section: pink eosin background, paler fibres, purple nuclei dots.
    for _ in range(int(rng.integers(3, 6))):
        y0, y1 = rng.uniform(0, 1), rng.uniform(0, 1)
        c.line([(0.0, y0), (1.0, y1)], _rgb(rng, (242, 196, 220), 6), rng.uniform(0.02, 0.05))
    for _ in range(int(rng.integers(70, 120))):
        r = rng.uniform(0.012, 0.02)
        c.ellipse(rng.uniform(0, 1), rng.uniform(0, 1), r, r * rng.uniform(0.7, 1.0), _rgb(rng, (118, 56, 162), 12))


def _gross(c: _Canvas, rng: np.random.Generator) -> None:
    # Gross specimen photograph: tan-brown organ on a blue-green surgical drape.
    for _ in range(int(rng.integers(2, 5))):
        x = rng.uniform(0, 1)
        c.line([(x, 0.0), (x + rng.uniform(-0.3, 0.3), 1.0)], _rgb(rng, (30, 88, 108), 5), 0.02)
    cx, cy = 0.5 + rng.uniform(-0.01, 0.01), 0.52 + rng.uniform(-0.01, 0.01)
    rx, ry = 0.43 + rng.uniform(-0.01, 0.01), 0.41 + rng.uniform(-0.01, 0.01)
    c.ellipse(cx, cy, rx, ry, _rgb(rng, (125, 62, 48), 6))
    c.ellipse(cx, cy, rx - 0.03, ry - 0.03, _rgb(rng, (178, 98, 72), 8))
    for _ in range(int(rng.integers(4, 8))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.25)
        c.ellipse(
            cx + d * np.cos(a),
            cy + d * np.sin(a),
            rng.uniform(0.03, 0.08),
            rng.uniform(0.03, 0.08),
            _rgb(rng, (160, 86, 62), 8),
        )


_BACKGROUND = {
    "xray": lambda rng: _grey(_jit(rng, 48, 4)),
    "ct": lambda rng: _grey(int(rng.integers(0, 4))),
    "mri": lambda rng: _grey(_jit(rng, 18, 3)),
    "histology": lambda rng: _rgb(rng, (232, 168, 200), 6),
    "gross": lambda rng: _rgb(rng, (40, 106, 128), 6),
}
_BODY = {"xray": _xray, "ct": _ct, "mri": _mri, "histology": _histology, "gross": _gross}


def render(f: Factors, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw one image of side ``size`` px for factors ``f`` (all randomness from ``rng``)."""
    c = _Canvas(size, _BACKGROUND[f.modality](rng))
    _BODY[f.modality](c, rng)
    base = _LESION_RGB[f.intensity][f.modality]
    r = SIZE_RADIUS[f.size]
    for x, y, _side in lesion_layout(f, rng):
        rx, ry = r * rng.uniform(0.93, 1.0), r * rng.uniform(0.93, 1.0)
        fill = tuple(int(np.clip(v + rng.integers(-3, 4), 0, 255)) for v in base)
        c.ellipse(x, y, rx, ry, fill)  # type: ignore[arg-type]
    return c.img
