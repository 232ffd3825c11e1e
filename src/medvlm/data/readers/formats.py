"""Record-level converters: one raw JSON record of a known format -> :class:`~medvlm.data.schema.Sample`.

Format names (``FORMATS``) and what ``format="auto"`` looks for in the *first record's keys*
(first match wins; the file name is never consulted):

1. ``stllava_dpo``     ``chosen_conversations`` or ``reject_conversations`` (STLLaVA-Med preference pairs)
2. ``trl_preference``  ``chosen`` and ``rejected`` (TRL's ``prompt``/``chosen``/``rejected``)
3. ``image_urls``      ``pmc_tar_url`` (``llava_med_image_urls.jsonl``)
4. ``vqa_test``        ``conversations``/``conversatons`` and ``answer_type`` (converted VQA-RAD/SLAKE/PathVQA)
5. ``llava``           ``conversations`` or the alignment file's typo ``conversatons``
6. ``messages``        ``messages`` (OpenAI / HF chat format, images in an ``images`` column)
7. ``qa50``            ``question_id``, ``text`` and ``image`` (the LLaVA-Med chat benchmark questions;
                       with ``answer_id``/``model_id`` it is a model answer file, an error here)
8. ``vqa_flat``        ``question`` and ``answer`` (flat VQA rows with ``image``)
9. ``fig_captions``    a file that is one JSON object of lists (decided from the container, see readers)

Every key a converter does not consume is kept in ``Sample.meta``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError

SAMPLE_FORMATS: tuple[str, ...] = ("llava", "vqa_test", "messages", "vqa_flat", "qa50", "fig_captions")
PREFERENCE_FORMATS: tuple[str, ...] = ("stllava_dpo", "trl_preference")
FORMATS: list[str] = [*SAMPLE_FORMATS, *PREFERENCE_FORMATS, "image_urls"]
"""Every format name ``read_samples`` / ``read_preferences`` / ``validate_file`` accept explicitly."""

LLAVA_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "vuser": "vuser",
}
"""LLaVA ``from`` values -> internal roles (``vuser``: STLLaVA-Med's self-questioning turn)."""
CHAT_ROLES: dict[str, str] = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "vuser": "vuser",
    "human": "user",
    "gpt": "assistant",
}
CONVERSATION_KEYS: tuple[str, ...] = ("conversations", "conversatons")


def detect_format(record: Any, where: str) -> str:
    """Decide a record's format from its keys (precedence in the module docstring)."""
    if not isinstance(record, dict):
        raise MedvlmError(f"{where}: expected a JSON object, got {type(record).__name__}; cannot decide the format")
    keys = record.keys()
    if "chosen_conversations" in keys or "reject_conversations" in keys:
        return "stllava_dpo"
    if "chosen" in keys and "rejected" in keys:
        return "trl_preference"
    if "pmc_tar_url" in keys:
        return "image_urls"
    if any(k in keys for k in CONVERSATION_KEYS):
        return "vqa_test" if "answer_type" in keys else "llava"
    if "messages" in keys:
        return "messages"
    if "question_id" in keys and "text" in keys and ("answer_id" in keys or "model_id" in keys):
        raise MedvlmError(
            f"{where}: a model answer file (question_id/text/answer_id), not a data file; "
            "answer files are read by the evaluation commands"
        )
    if "question_id" in keys and "text" in keys and "image" in keys:
        return "qa50"
    if "question" in keys and "answer" in keys:
        return "vqa_flat"
    shown = ", ".join(sorted(map(str, keys))[:12]) or "no keys"
    raise MedvlmError(
        f"{where}: cannot decide the format from the keys ({shown}); pass --format, one of {', '.join(FORMATS)}"
    )


def check_format(name: str) -> str:
    """Validate a format name (``auto`` included)."""
    if name != "auto" and name not in FORMATS:
        raise MedvlmError(f"unknown format {name!r}; choose auto or one of {', '.join(FORMATS)}")
    return name


def _str(rec: dict, key: str, where: str, *, required: bool = True) -> str | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise MedvlmError(f"{where}: field {key!r} is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise MedvlmError(f"{where}: field {key!r}: expected a string, got {type(v).__name__}")
    return str(v)


def record_images(rec: dict, where: str, key: str = "image") -> list[str]:
    """``image``: a path, a list of paths, or absent/null."""
    v = rec.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(x, str) and x for x in v):
        return list(v)
    raise MedvlmError(f"{where}: field {key!r}: expected an image path or a list of paths, got {type(v).__name__}")


def record_id(rec: dict, index: int, *keys: str) -> str:
    """The first of ``keys`` present with a scalar value, as a string; else the record's index."""
    for k in keys:
        v = rec.get(k)
        if v is not None and not isinstance(v, (dict, list)):
            return str(v)
    return str(index)


def record_meta(rec: dict, used: set[str]) -> dict[str, Any]:
    """Every field of ``rec`` the reader did not consume (kept in ``Sample.meta``)."""
    return {k: v for k, v in rec.items() if k not in used}


def conversation_key(rec: dict) -> str | None:
    """The LLaVA conversation field present in ``rec`` (``conversations`` or the typo ``conversatons``)."""
    for k in CONVERSATION_KEYS:
        if k in rec:
            return k
    return None


def llava_turns(turns: Any, where: str) -> list[Message]:
    """LLaVA ``[{"from": "human"|"gpt", "value": str}, ...]`` -> messages (``<image>`` -> image parts)."""
    if not isinstance(turns, list):
        raise MedvlmError(f"{where}: expected a list of turns, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise MedvlmError(f"{where}[{i}]: expected an object with 'from' and 'value'")
        role = t.get("from")
        if role not in LLAVA_ROLES:
            raise MedvlmError(f"{where}[{i}].from: unknown role {role!r}; expected one of {', '.join(LLAVA_ROLES)}")
        value = t.get("value")
        if not isinstance(value, str):
            raise MedvlmError(f"{where}[{i}].value: expected a string, got {type(value).__name__}")
        out.append(Message.from_text(LLAVA_ROLES[role], value))
    return out


def _llava(rec: dict, index: int, where: str) -> Sample:
    key = conversation_key(rec)
    if key is None:
        raise MedvlmError(f"{where}: field 'conversations' is missing")
    return Sample(
        id=record_id(rec, index, "id"),
        messages=llava_turns(rec[key], f"{where}: {key}"),
        images=record_images(rec, where),
        meta=record_meta(rec, {"id", "image", key}),
    )


def _vqa_test(rec: dict, index: int, where: str) -> Sample:
    s = _llava(rec, index, where)
    at = _str(rec, "answer_type", where)
    s.meta["answer_type"] = at.strip().upper()
    return s


def chat_content(content: Any, where: str, inline_images: list[str]) -> list[dict]:
    """A ``content`` string (``<image>`` placeholders) or list of parts -> internal parts.

    Image parts that carry their own reference (``image``/``path``/``url`` string, or OpenAI
    ``image_url.url``) append it to ``inline_images``.
    """
    if isinstance(content, str):
        return Message.from_text("user", content).content
    if not isinstance(content, list):
        raise MedvlmError(f"{where}: expected a string or a list of parts, got {type(content).__name__}")
    parts: list[dict] = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or "type" not in p:
            raise MedvlmError(f"{where}[{j}]: expected a part object with a 'type'")
        kind = p["type"]
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise MedvlmError(f"{where}[{j}].text: expected a string")
            parts.append(text_part(p["text"]))
        elif kind in ("image", "image_url"):
            ref = p.get("image_url", {}).get("url") if isinstance(p.get("image_url"), dict) else None
            ref = ref or next((p[k] for k in ("image", "path", "url") if isinstance(p.get(k), str)), None)
            if ref is not None:
                if ref.startswith("data:"):
                    raise MedvlmError(
                        f"{where}[{j}]: inline data: URLs are not supported; save the image and reference its path"
                    )
                inline_images.append(ref)
            parts.append(image_part())
        else:
            raise MedvlmError(f"{where}[{j}].type: unknown part type {kind!r} (expected text or image)")
    return parts


def chat_messages(msgs: Any, where: str, inline_images: list[str]) -> list[Message]:
    """OpenAI/HF ``[{"role", "content"}, ...]`` -> messages."""
    if not isinstance(msgs, list):
        raise MedvlmError(f"{where}: expected a list of messages, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise MedvlmError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise MedvlmError(f"{where}[{i}].role: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        out.append(
            Message(
                role=CHAT_ROLES[role], content=chat_content(m.get("content"), f"{where}[{i}].content", inline_images)
            )
        )
    return out


def _messages(rec: dict, index: int, where: str) -> Sample:
    inline: list[str] = []
    messages = chat_messages(rec.get("messages"), f"{where}: messages", inline)
    images = record_images(rec, where, "images") if "images" in rec else record_images(rec, where, "image")
    if inline and images:
        raise MedvlmError(f"{where}: images are given both inside the messages and in the 'images' column")
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
    meta.update(record_meta(rec, {"id", "messages", "images", "image", "meta"}))
    return Sample(id=record_id(rec, index, "id"), messages=messages, images=inline or images, meta=meta)


def _qa50(rec: dict, index: int, where: str) -> Sample:
    text = _str(rec, "text", where)
    return Sample(
        id=record_id(rec, index, "question_id"),
        messages=[Message.from_text("user", text)],
        images=record_images(rec, where),
        meta=record_meta(rec, {"question_id", "image", "text"}) | {"question_id": rec["question_id"]},
    )


def _vqa_flat(rec: dict, index: int, where: str) -> Sample:
    question = _str(rec, "question", where)
    answer = _str(rec, "answer", where)
    images = record_images(rec, where)
    user = Message.from_text("user", question)
    if images and user.num_images == 0:
        user.content.insert(0, image_part())  # flat rows carry no placeholder: the image goes first, as LLaVA does
    meta = record_meta(rec, {"id", "qid", "question_id", "image", "question"})
    if isinstance(meta.get("answer_type"), str):
        meta["answer_type"] = meta["answer_type"].strip().upper()
    return Sample(
        id=record_id(rec, index, "id", "qid", "question_id"),
        messages=[user, Message("assistant", [text_part(answer)])],
        images=images,
        meta=meta,
    )


SAMPLE_CONVERTERS: dict[str, Callable[[dict, int, str], Sample]] = {
    "llava": _llava,
    "vqa_test": _vqa_test,
    "messages": _messages,
    "qa50": _qa50,
    "vqa_flat": _vqa_flat,
}
"""Per-record converters for the list-of-records sample formats (``fig_captions`` is whole-file)."""


def convert_record(fmt: str, rec: Any, index: int, where: str) -> Sample:
    """Convert one raw record of format ``fmt``; errors name ``where`` (file and record) and the field."""
    if not isinstance(rec, dict):
        raise MedvlmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    try:
        conv = SAMPLE_CONVERTERS[fmt]
    except KeyError:
        raise MedvlmError(
            f"{where}: format {fmt!r} does not hold conversations "
            f"(use read_preferences for {', '.join(PREFERENCE_FORMATS)}; read_image_urls for image_urls)"
        ) from None
    return conv(rec, index, where)


def turn_field(fmt: str, rec: Any, i: int) -> str:
    """The source field holding message ``i`` of a record (for validation messages)."""
    if fmt in ("llava", "vqa_test") and isinstance(rec, dict):
        return f"{conversation_key(rec) or 'conversations'}[{i}]"
    if fmt == "messages":
        return f"messages[{i}]"
    if fmt == "qa50":
        return "text"
    if fmt == "vqa_flat":
        return "question" if i == 0 else "answer"
    if fmt == "fig_captions":
        return "image" if i == 0 else "fig_caption"
    return f"messages[{i}]"
