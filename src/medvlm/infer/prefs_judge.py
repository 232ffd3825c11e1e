"""The preference judge of STLLaVA-Med's self-training: an image-aware LLM scores two answers.

The judge sees the image itself (a data-URL content part), the question and both answers, and
writes two 1-10 scores on its first line (the same reply contract as the chat-benchmark judge, read
by :func:`medvlm.llm.scores.parse_scores`), then its reasons. The wording is ours: a medical-expert
framing, correctness against the image first, and an explicit instruction that the answers' order
and length must not matter. Replies without readable scores are re-asked (:mod:`medvlm.llm.judge`).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from medvlm.data.images import load_image

SYSTEM_PROMPT = (
    "You are a senior physician with broad expertise in radiology, pathology and clinical medicine. You review "
    "answers that an AI assistant gave to questions about a medical image, to build a research dataset. You see "
    "the image yourself. Judge strictly, precisely and fairly."
)

INSTRUCTION = (
    "Score each assistant's answer from 1 to 10, where a higher score means a better answer. Judge first whether "
    "the answer is correct for this image (what it actually shows and established medical knowledge), then whether "
    "it addresses the question, then completeness and clarity. A fluent answer that contradicts the image is worse "
    "than a short correct one. The answers are shown in an arbitrary order: their position must not affect your "
    "scores, and neither must their length. Write the two scores on the first line and nothing else: the score of "
    "Assistant 1, a space, the score of Assistant 2 (for example: 3 8). From the second line on, give your reasons."
)

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def image_data_url(path: str | os.PathLike) -> str:
    """The image as a ``data:`` URL: PNG/JPEG bytes as they are, any other format (DICOM, TIFF ...)
    re-encoded as PNG."""
    p = Path(path)
    mime = _MIME.get(p.suffix.lower())
    if mime is not None:
        data = p.read_bytes()
    else:
        buf = io.BytesIO()
        load_image(p).save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def judge_messages(image_url: str, question: str, answer_1: str, answer_2: str) -> list[dict]:
    """Chat messages asking the judge to score Assistant 1 and Assistant 2 on ``question`` about the image."""
    text = (
        f"[Question about the image]\n{question}\n\n"
        f"[Assistant 1]\n{answer_1}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer_2}\n[End of Assistant 2]\n\n[Instruction]\n{INSTRUCTION}"
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}],
        },
    ]


def reasons_of(reply: str) -> str:
    """The judge's reasons: the reply after its first (score) line."""
    lines = reply.strip().splitlines()
    return "\n".join(lines[1:]).strip()
