"""A second synthetic VQA generator, independent of ``medvlm data synth`` (no shared rendering or wording code).

It stands in for "a user's own small dataset": other modalities, other lesion shapes, another image size,
other question wordings and answer words, and only the converted-VQA JSON that ``medvlm data convert``
writes (no captions, no instruction data). ``medvlm.data.synth`` is deliberately not imported.

Every image: a modality (ultrasound fan, fundus disc, dermoscopy skin patch, plain radiograph), 1-3 lesions
(squares, triangles or diamonds, 7-13 % of the side) in the viewer's left half, right half or both. Questions
per image (6): two closed yes/no about the lesion side, one closed yes/no about the modality, and one open
each about the modality, the lesion count and the side. Closed answers are drawn yes/no 50:50 first and the
predicate asked is then chosen to make it true or false, so the question text alone cannot beat ~50 %.

    python benchmarks/synth2.py --out DIR --n-images 500 --test-images 100 --seed 0

writes ``DIR/images/*.png``, ``DIR/train.json``, ``DIR/test.json`` (records: ``id``, ``image``,
``answer_type`` CLOSED/OPEN, ``question_type`` MODALITY/COUNT/SIDE, ``conversations``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 96
MODS = {"ultrasound": "ultrasound", "fundus": "fundus photo", "dermoscopy": "dermoscopy", "radiograph": "radiograph"}
MOD_NAMES = {
    "ultrasound": ("an ultrasound scan", "a sonogram"),
    "fundus": ("a fundus photograph", "a retinal photo"),
    "dermoscopy": ("a dermoscopy image", "a dermatoscopic photo"),
    "radiograph": ("a plain radiograph", "a plain film"),
}
OPEN_Q = {
    "MODALITY": (
        "Which imaging technique produced this picture?",
        "Name the modality of this study.",
        "What sort of study is shown here?",
    ),
    "COUNT": (
        "How many abnormalities can be seen?",
        "Count the findings in this picture.",
        "What number of focal findings are present?",
    ),
    "SIDE": (
        "Where are the findings, left, right or bilateral?",
        "Which half of the picture holds the findings?",
        "Are the findings left-sided, right-sided or bilateral?",
    ),
}
COUNT_WORD = {1: "1", 2: "2", 3: "3"}
SIDE_WORD = {"left": "left", "right": "right", "both": "bilateral"}
# Closed side predicates: (wording templates, truth as a function of the side).
SIDE_PREDICATES = (
    (
        ("Is there any finding in the left half?", "Does the left half contain a finding?"),
        lambda s: s in ("left", "both"),
    ),
    (
        ("Is there any finding in the right half?", "Does the right half contain a finding?"),
        lambda s: s in ("right", "both"),
    ),
    (("Are findings present on both halves?", "Is the involvement bilateral?"), lambda s: s == "both"),
    (("Are the findings confined to the left half?", "Is only the left half involved?"), lambda s: s == "left"),
    (("Are the findings confined to the right half?", "Is only the right half involved?"), lambda s: s == "right"),
)
MOD_CLOSED = ("Was this acquired as {}?", "Does this picture show {}?")


def _background(mod: str, rng: np.random.Generator) -> Image.Image:
    """A modality's global look, drawn with numpy noise and PIL polygons (no shared code with medvlm's renderer)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    if mod == "ultrasound":
        base = np.zeros((SIDE, SIDE, 3))
        ang = np.arctan2(xx - 0.5, yy + 0.05)
        r = np.hypot(xx - 0.5, yy + 0.05)
        cone = (np.abs(ang) < 0.6) & (r < 1.0)
        speckle = rng.gamma(2.0, 30.0, (SIDE, SIDE))
        for c in range(3):
            base[..., c] = np.where(cone, np.clip(60 + speckle, 0, 190), 5)
    elif mod == "fundus":
        base = np.zeros((SIDE, SIDE, 3))
        disc = np.hypot(xx - 0.5, yy - 0.5) < 0.47
        tint = rng.uniform(-15, 15)
        base[..., 0] = np.where(disc, 200 + tint - 80 * np.hypot(xx - 0.5, yy - 0.5), 0)
        base[..., 1] = np.where(disc, 90 + tint, 0)
        base[..., 2] = np.where(disc, 30, 0)
    elif mod == "dermoscopy":
        base = np.stack([np.full((SIDE, SIDE), 215.0), np.full((SIDE, SIDE), 170.0), np.full((SIDE, SIDE), 140.0)], -1)
        base *= (1 - 0.5 * np.clip(np.hypot(xx - 0.5, yy - 0.5) - 0.3, 0, 1))[..., None]
        base += rng.normal(0, 6, (SIDE, SIDE, 1))
    else:  # radiograph: vertical grey gradient with a bony band
        g = 70 + 90 * yy + rng.normal(0, 5, (SIDE, SIDE))
        g = np.where(np.abs(xx - 0.5) < 0.06, g + 60, g)
        base = np.repeat(g[..., None], 3, -1)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _lesion(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, shape: str, fill: tuple[int, int, int]) -> None:
    if shape == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    else:
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    draw.polygon(pts, fill=fill)


def draw_image(mod: str, count: int, side: str, rng: np.random.Generator) -> Image.Image:
    """One image: the modality background and ``count`` lesions on ``side`` (``both``: at least one per half)."""
    img = _background(mod, rng)
    draw = ImageDraw.Draw(img)
    halves = {"left": ["left"] * count, "right": ["right"] * count}.get(side)
    if halves is None:
        halves = ["left", "right"] + [str(rng.choice(["left", "right"])) for _ in range(count - 2)]
    shape = str(rng.choice(["square", "triangle", "diamond"]))
    fill = (20, 230, 60) if mod in ("fundus", "dermoscopy") else (250, 250, 40)
    rows = {"left": [0.2, 0.5, 0.8], "right": [0.2, 0.5, 0.8]}
    for h in rows:
        rng.shuffle(rows[h])
    for h in halves:
        cy = rows[h].pop() * SIDE
        cx = (0.27 if h == "left" else 0.73) * SIDE + rng.uniform(-5, 5)
        _lesion(draw, cx, cy + rng.uniform(-3, 3), rng.uniform(0.07, 0.13) * SIDE / 1.5, shape, fill)
    return img


def _record(rid: int, image: str, atype: str, qtype: str, question: str, answer: str) -> dict:
    return {
        "id": rid,
        "image": image,
        "answer_type": atype,
        "question_type": qtype,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def questions(mod: str, count: int, side: str, rnd: random.Random) -> list[tuple[str, str, str, str]]:
    """``(answer_type, question_type, question, answer)`` x 6 for one image; closed answers drawn 50:50 first."""
    out = []
    for _ in range(2):
        want = rnd.random() < 0.5
        fits = [p for p in SIDE_PREDICATES if p[1](side) == want]
        words, _truth = rnd.choice(fits)
        out.append(("CLOSED", "SIDE", rnd.choice(words), "yes" if want else "no"))
    want = rnd.random() < 0.5
    asked = mod if want else rnd.choice([m for m in MODS if m != mod])
    out.append(
        ("CLOSED", "MODALITY", rnd.choice(MOD_CLOSED).format(rnd.choice(MOD_NAMES[asked])), "yes" if want else "no")
    )
    out.append(("OPEN", "MODALITY", rnd.choice(OPEN_Q["MODALITY"]), MODS[mod]))
    out.append(("OPEN", "COUNT", rnd.choice(OPEN_Q["COUNT"]), COUNT_WORD[count]))
    out.append(("OPEN", "SIDE", rnd.choice(OPEN_Q["SIDE"]), SIDE_WORD[side]))
    return out


def generate(out: Path, n_images: int, test_images: int, seed: int) -> dict:
    """Write ``images/``, ``train.json`` and ``test.json`` under ``out``; returns counts."""
    rng = np.random.default_rng(seed + 1000)
    rnd = random.Random(seed + 2000)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, test = [], []
    rid = 0
    for i in range(n_images):
        mod = rnd.choice(list(MODS))
        side = rnd.choice(["left", "right", "both"])
        count = rnd.choice([2, 3]) if side == "both" else rnd.choice([1, 2, 3])
        name = f"case_{seed}_{i:05d}.png"
        draw_image(mod, count, side, rng).save(out / "images" / name)
        split = test if i < test_images else train
        for atype, qtype, q, a in questions(mod, count, side, rnd):
            split.append(_record(rid, name, atype, qtype, q, a))
            rid += 1
    for name, recs in (("train.json", train), ("test.json", test)):
        (out / name).write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")
    return {"train_questions": len(train), "test_questions": len(test), "images": n_images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--test-images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(generate(a.out, a.n_images, a.test_images, a.seed))


if __name__ == "__main__":
    main()
