"""medvlm's one internal sample format.

A :class:`Sample` is a conversation of :class:`Message` s whose ``content`` is a list of parts, either
``{"type": "text", "text": ...}`` or ``{"type": "image"}`` (HF / OpenAI style). The i-th image part of
the whole conversation refers to ``Sample.images[i]`` (a path relative to an image folder, or an
absolute path). Every reader in :mod:`medvlm.data.readers` produces Samples; templates, collate,
training, inference and evaluation consume them. Nothing downstream knows about file-format quirks.

Roles: ``system``, ``user``, ``assistant`` and ``vuser`` (STLLaVA-Med's self-questioning role: a
user question the model learns to ask).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "vuser"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "vuser")
IMAGE_PLACEHOLDER = "<image>"


def text_part(text: str) -> dict:
    """A text content part."""
    return {"type": "text", "text": text}


def image_part() -> dict:
    """An image content part (refers to the next image of ``Sample.images``)."""
    return {"type": "image"}


@dataclass
class Message:
    """One turn of a conversation."""

    role: str
    """``system`` | ``user`` | ``assistant`` | ``vuser``."""
    content: list[dict] = field(default_factory=list)
    """Parts in order: ``{"type": "text", "text": str}`` or ``{"type": "image"}``."""

    @property
    def text(self) -> str:
        """The concatenated text parts (image parts omitted)."""
        return "".join(p["text"] for p in self.content if p.get("type") == "text")

    @property
    def num_images(self) -> int:
        """How many image parts this turn holds."""
        return sum(1 for p in self.content if p.get("type") == "image")

    @classmethod
    def from_text(cls, role: str, text: str, placeholder: str = IMAGE_PLACEHOLDER) -> Message:
        """Build a message from legacy text in which ``placeholder`` marks image positions.

        Whitespace (one newline) adjacent to a placeholder is absorbed, as LLaVA's
        ``"<image>\\n" + question`` convention intends.
        """
        parts: list[dict] = []
        pieces = text.split(placeholder)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append(image_part())
                if piece.startswith("\n"):
                    piece = piece[1:]
            if i < len(pieces) - 1 and piece.endswith("\n"):
                piece = piece[:-1]
            if piece:
                parts.append(text_part(piece))
        return cls(role=role, content=parts)

    def to_text(self, placeholder: str = IMAGE_PLACEHOLDER) -> str:
        """Render back to legacy text; an image at the start becomes ``"<image>\\n"``, at the end ``"\\n<image>"``."""
        out: list[str] = []
        for i, p in enumerate(self.content):
            if p.get("type") == "image":
                if i == 0:
                    out.append(placeholder + ("\n" if len(self.content) > 1 else ""))
                else:
                    out.append("\n" + placeholder)
            else:
                out.append(p["text"])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"role": self.role, "content": copy.deepcopy(self.content)}

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        content = d["content"]
        if isinstance(content, str):
            return cls.from_text(d["role"], content)
        return cls(role=d["role"], content=copy.deepcopy(list(content)))


@dataclass
class Sample:
    """One training/eval record: a conversation with its images."""

    id: str
    """Record id (the source file's ``id``/``question_id``, or the record index)."""
    messages: list[Message]
    """The conversation, in order."""
    images: list[str] = field(default_factory=list)
    """Image paths (relative to an image folder, or absolute), one per image part, in order."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Everything else the source carried: ``domain``, ``answer_type``, ``question_type``, ``type``,
    ``fig_caption``, ``gpt4_answer``, ``pair_id``, ... Never used to decide model behaviour."""

    @property
    def num_image_parts(self) -> int:
        """Total image parts across all messages."""
        return sum(m.num_images for m in self.messages)

    def to_dict(self) -> dict:
        """A JSON-able dict (``id``, ``images``, ``messages``, ``meta``)."""
        return {
            "id": self.id,
            "images": list(self.images),
            "messages": [m.to_dict() for m in self.messages],
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(
            id=str(d["id"]),
            messages=[Message.from_dict(m) for m in d["messages"]],
            images=list(d.get("images", [])),
            meta=dict(d.get("meta", {})),
        )


@dataclass
class PreferenceSample:
    """A DPO preference pair: a shared prompt conversation and two alternative final assistant turns."""

    id: str
    prompt: list[Message]
    """The conversation up to (not including) the answer being compared."""
    chosen: list[Message]
    """The preferred continuation (usually one assistant message)."""
    rejected: list[Message]
    """The dispreferred continuation."""
    images: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    """Judge scores/reasons and anything else the source carried."""
