"""Prompts for instruction generation: the system instruction, the few-shot file and the per-figure context.

The LLM sees only a figure's caption (and, with inline mentions, the sentences of the paper that
mention the figure) and writes a multi-turn ``User:`` / ``Assistant:`` conversation as if both
sides could see the image. The few-shot examples ship as ``medvlm/resources/instruct_few_shot.json``
and can be replaced with a file of the same format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from medvlm.data.readers.figures import FigureRecord, normalize_mentions
from medvlm.errors import MedvlmError
from medvlm.utils.io import read_json

SYSTEM_PROMPT = (
    "You are an AI assistant specialised in biomedical topics.\n"
    "\n"
    "You are given the caption of a figure from a biomedical research paper and, sometimes, sentences "
    "from the paper that refer to the figure. You cannot see the image itself. Using only this text, "
    "write a conversation between a User who asks about the image and an Assistant who answers as if both "
    "of them were looking at the image.\n"
    "\n"
    "Guidelines:\n"
    '- Write alternating turns, each on a new line starting with "User:" or "Assistant:". Write at least '
    "two or three question-answer pairs, more when the figure has more to discuss.\n"
    "- Ask diverse questions about what can be seen: the kind of image or modality, the anatomy, organ or "
    "specimen, the notable findings, their location, appearance and size, and what they may indicate. "
    "Only ask questions that the given information lets you answer with confidence.\n"
    "- Answer in the voice of someone examining the image. Never refer to a caption, a context, a "
    "description, the text or the paper, and do not copy their sentences; say things in your own words.\n"
    "- Detailed explanations that draw on background biomedical knowledge are welcome, especially for "
    "harder questions, but never invent findings the information does not support.\n"
    "- Answer responsibly: give no medical advice, no diagnosis for a real patient and no treatment "
    "instructions; when a question calls for clinical judgement, explain what is generally known and say "
    "that qualified clinicians decide."
)

DEFAULT_FEW_SHOT = "instruct_few_shot.json"
FEW_SHOT_FORMAT = "medvlm.instruct_few_shot/1"


@dataclass
class FewShotExample:
    """One demonstration: a figure and the conversation to write for it."""

    fig_label: str
    fig_caption: str
    mentions: list[str]
    conversation: list[tuple[str, str]]
    """(question, answer) pairs."""
    domain: str = ""


@dataclass
class PromptSet:
    """The system instruction and the few-shot examples used for every request."""

    system: str
    examples: list[FewShotExample] = field(default_factory=list)
    source: str = ""
    """Where the examples came from (file path or the packaged resource)."""

    def fingerprint(self) -> str:
        """sha256 of the system text and examples (recorded in the output to catch a changed prompt on resume)."""
        payload = json.dumps(
            [self.system, [(e.fig_label, e.fig_caption, e.mentions, e.conversation) for e in self.examples]],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _parse_few_shot(data: object, where: str) -> PromptSet:
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise MedvlmError(f"{where}: expected an object with a non-empty 'examples' list (format {FEW_SHOT_FORMAT})")
    system = data.get("system", SYSTEM_PROMPT)
    if not isinstance(system, str) or not system.strip():
        raise MedvlmError(f"{where}: 'system' must be a non-empty string")
    examples = []
    for i, ex in enumerate(data["examples"]):
        at = f"{where}: examples[{i}]"
        if not isinstance(ex, dict):
            raise MedvlmError(f"{at}: expected an object")
        caption = ex.get("fig_caption")
        if not isinstance(caption, str) or not caption.strip():
            raise MedvlmError(f"{at}.fig_caption: missing or not a non-empty string")
        conv = ex.get("conversation")
        if not isinstance(conv, list) or not conv:
            raise MedvlmError(f"{at}.conversation: expected a non-empty list of {{'user', 'assistant'}} objects")
        pairs = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict) or not all(
                isinstance(turn.get(k), str) and turn[k].strip() for k in ("user", "assistant")
            ):
                raise MedvlmError(f"{at}.conversation[{j}]: expected non-empty 'user' and 'assistant' strings")
            pairs.append((turn["user"].strip(), turn["assistant"].strip()))
        examples.append(
            FewShotExample(
                fig_label=str(ex.get("fig_label") or ""),
                fig_caption=caption.strip(),
                mentions=normalize_mentions(ex.get("mentions"), f"{at}."),
                conversation=pairs,
                domain=str(ex.get("domain") or ""),
            )
        )
    return PromptSet(system=system.strip(), examples=examples, source=where)


def load_prompts(path: str | os.PathLike | None = None) -> PromptSet:
    """The system instruction and few-shot examples from ``path`` (None = the packaged file)."""
    if path is None:
        res = resources.files("medvlm").joinpath("resources", DEFAULT_FEW_SHOT)
        try:
            data = json.loads(res.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MedvlmError(f"packaged {DEFAULT_FEW_SHOT} is unreadable ({e}); reinstall medvlm") from e
        return _parse_few_shot(data, f"medvlm/resources/{DEFAULT_FEW_SHOT}")
    return _parse_few_shot(read_json(path), str(Path(path)))


def render_context(fig_label: str, fig_caption: str, mentions: list[str], inline_mentions: bool) -> str:
    """``Figure Caption:\\n{label}: {caption}`` plus, with ``inline_mentions``, ``Figure Context:`` and
    ``- {mention}`` lines."""
    caption = " ".join(fig_caption.split())
    head = f"{fig_label.strip()}: {caption}" if fig_label.strip() else caption
    text = f"Figure Caption:\n{head}"
    lines = [" ".join(m.split()) for m in mentions if m and m.strip()]
    if inline_mentions and lines:
        text += "\n\nFigure Context:\n" + "\n".join(f"- {m}" for m in lines)
    return text


def render_conversation(pairs: list[tuple[str, str]]) -> str:
    """``User: ...`` / ``Assistant: ...`` lines (the format the post-processing parses)."""
    return "\n".join(f"User: {q}\nAssistant: {a}" for q, a in pairs)


def build_messages(record: FigureRecord, prompts: PromptSet, inline_mentions: bool) -> list[dict]:
    """Chat messages for one figure: system, few-shot (context -> conversation) pairs, then the figure's context."""
    messages = [{"role": "system", "content": prompts.system}]
    for ex in prompts.examples:
        messages.append(
            {"role": "user", "content": render_context(ex.fig_label, ex.fig_caption, ex.mentions, inline_mentions)}
        )
        messages.append({"role": "assistant", "content": render_conversation(ex.conversation)})
    messages.append(
        {
            "role": "user",
            "content": render_context(record.fig_label, record.fig_caption, record.mentions, inline_mentions),
        }
    )
    return messages
