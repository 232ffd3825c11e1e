"""Shared helpers for the model-family tests: tiny builds cached per session, sample conversations."""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image

from medvlm.data.schema import Message, Sample
from medvlm.model.families import FAMILIES
from medvlm.model.families.processing import FamilyProcessor
from medvlm.model.families.tiny import build_tiny_family

FAMILY_NAMES = list(FAMILIES)
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "images"


@functools.cache
def tiny(family: str):
    """``(model, FamilyProcessor)`` of a tiny random build (cached: build once per test session)."""
    model, processor, extras = build_tiny_family(family, seed=0)
    spec = FAMILIES[family]
    marked = spec.chat_template() if spec.template_file else processor.chat_template
    return model, FamilyProcessor(spec, processor, marked, template=extras.get("template"))


def images() -> list[Image.Image]:
    """Two real sample images of different shapes (from ../shared)."""
    return [
        Image.open(SHARED_IMAGES / "synpic32933.jpg").convert("RGB"),
        Image.open(SHARED_IMAGES / "bio_patch.png").convert("RGB"),
    ]


def msgs(*turns: tuple[str, str]) -> list[Message]:
    return [Message.from_text(role, text) for role, text in turns]


def multi_turn_sample(with_vuser: bool = True) -> Sample:
    """System prompt, two images (first turn and a later turn), three answers, one VUSER question."""
    return Sample(
        "mt",
        msgs(
            ("system", "Answer briefly."),
            ("user", "<image>\nIs there a mass?"),
            ("assistant", "No mass is seen."),
            ("vuser" if with_vuser else "user", "Which organ is shown?"),
            ("assistant", "The left lung."),
            ("user", "Compare with this one.\n<image>"),
            ("assistant", "They look the same."),
        ),
        images=["a.jpg", "b.png"],
    )


def single_sample(answer: str = "Yes.", question: str = "Is it normal?") -> Sample:
    return Sample("one", msgs(("user", "<image>\n" + question), ("assistant", answer)), images=["a.jpg"])


def learned_spans(processor: FamilyProcessor, feature: dict) -> list[str]:
    """Decoded runs of consecutive learned tokens (special tokens kept)."""
    spans, cur = [], []
    for t, lab in zip(feature["input_ids"].tolist(), feature["labels"].tolist()):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(processor.tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(processor.tokenizer.decode(cur))
    return spans
