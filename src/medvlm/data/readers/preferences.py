"""Preference-pair records -> :class:`~medvlm.data.schema.PreferenceSample` (for DPO).

- ``stllava_dpo``: STLLaVA-Med's ``image``, ``chosen_conversations``, ``reject_conversations`` (note
  "reject"; ``rejected_conversations`` is accepted too). Both are whole LLaVA conversations; the shared
  leading turns become the prompt and the rest the two continuations.
- ``trl_preference``: TRL's ``prompt``/``chosen``/``rejected`` (strings or message lists, ``images`` or
  ``image`` column); without ``prompt`` (TRL's "implicit prompt"), the shared prefix is the prompt.
"""

from __future__ import annotations

from typing import Any

from medvlm.data.readers.formats import chat_messages, llava_turns, record_id, record_images, record_meta
from medvlm.data.schema import Message, PreferenceSample, text_part
from medvlm.errors import MedvlmError

_USERLIKE = ("user", "vuser")


def split_shared_prompt(
    chosen: list[Message], rejected: list[Message], where: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """``(prompt, chosen_rest, rejected_rest)``: the longest shared prefix ending on a user turn, and the rest."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n].to_dict() == rejected[n].to_dict():
        n += 1
    while n > 0 and chosen[n - 1].role not in _USERLIKE:
        n -= 1  # the prompt must end on a question; a shared answer belongs to both continuations
    if n == 0:
        raise MedvlmError(f"{where}: chosen and rejected conversations share no prompt ending on a user turn")
    if n == len(chosen) or n == len(rejected):
        raise MedvlmError(f"{where}: chosen or rejected has no answer after the shared prompt")
    if [m.to_dict() for m in chosen[n:]] == [m.to_dict() for m in rejected[n:]]:
        raise MedvlmError(f"{where}: chosen and rejected are identical")
    return chosen[:n], chosen[n:], rejected[n:]


def _stllava(rec: dict, index: int, where: str) -> PreferenceSample:
    rkey = "reject_conversations" if "reject_conversations" in rec else "rejected_conversations"
    for k in ("chosen_conversations", rkey):
        if k not in rec:
            raise MedvlmError(f"{where}: field {k!r} is missing")
    chosen = llava_turns(rec["chosen_conversations"], f"{where}: chosen_conversations")
    rejected = llava_turns(rec[rkey], f"{where}: {rkey}")
    prompt, c, r = split_shared_prompt(chosen, rejected, where)
    return PreferenceSample(
        id=record_id(rec, index, "id"),
        prompt=prompt,
        chosen=c,
        rejected=r,
        images=record_images(rec, where),
        meta=record_meta(rec, {"id", "image", "chosen_conversations", rkey}),
    )


def _side(value: Any, where: str, inline: list[str]) -> list[Message]:
    if isinstance(value, str):
        return [Message("assistant", [text_part(value)])]
    return chat_messages(value, where, inline)


def _trl(rec: dict, index: int, where: str) -> PreferenceSample:
    inline: list[str] = []
    chosen = _side(rec.get("chosen"), f"{where}: chosen", inline)
    rejected = _side(rec.get("rejected"), f"{where}: rejected", inline)
    prompt_value = rec.get("prompt")
    if prompt_value is None:
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected, where)
    elif isinstance(prompt_value, str):
        prompt = [Message.from_text("user", prompt_value)]
    else:
        prompt = chat_messages(prompt_value, f"{where}: prompt", inline)
    if [m.to_dict() for m in chosen] == [m.to_dict() for m in rejected]:
        raise MedvlmError(f"{where}: chosen and rejected are identical")
    images = record_images(rec, where, "images") if "images" in rec else record_images(rec, where, "image")
    if inline and images:
        raise MedvlmError(f"{where}: images are given both inside the messages and in the 'images' column")
    return PreferenceSample(
        id=record_id(rec, index, "id"),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        images=inline or images,
        meta=record_meta(rec, {"id", "prompt", "chosen", "rejected", "images", "image"}),
    )


PREFERENCE_CONVERTERS = {"stllava_dpo": _stllava, "trl_preference": _trl}


def convert_preference(fmt: str, rec: Any, index: int, where: str) -> PreferenceSample:
    """Convert one raw preference record of format ``fmt``; errors name ``where`` and the field."""
    if not isinstance(rec, dict):
        raise MedvlmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if fmt not in PREFERENCE_CONVERTERS:
        raise MedvlmError(f"{where}: format {fmt!r} is not a preference format ({', '.join(PREFERENCE_CONVERTERS)})")
    return PREFERENCE_CONVERTERS[fmt](rec, index, where)


def preference_as_samples(p: PreferenceSample) -> tuple[list[Message], list[Message]]:
    """The two full conversations (prompt + chosen, prompt + rejected)."""
    return p.prompt + p.chosen, p.prompt + p.rejected
