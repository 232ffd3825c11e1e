"""Merge the single-question samples of each image into multi-turn conversations.

VQA datasets (VQA-RAD, SLAKE, PathVQA, the synthetic set) hold one question per record, so an image with
five questions is encoded, run through the vision tower and the LM five times. LLaVA-1.5 merged the QA
pairs of an image into one conversation for its VQA training data; every answer is still learned (the
label mask covers each assistant turn) while the image and its tokens are processed once per
conversation instead of once per question. Evaluation stays one question per record.

Only samples of the form [system?] user(one image + question) -> assistant are merged; everything else
(text-only, several images, multi-turn) passes through unchanged, so mixed files are safe.

``yes_no_last`` orders each merged conversation so that the questions answered "yes" / "no" come after the others.
In a merged conversation a later answer can follow from the text of an earlier one ("Which side?" "left", then "Is
the right side affected?" "no"); with the open answers first, every open answer must come from the image, and the
yes/no answers after them are the ones left to that shortcut.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError


@dataclass
class GroupStats:
    """What :func:`group_by_image` did."""

    samples_in: int = 0
    """Samples read."""
    merged: int = 0
    """Single-question image samples that were merged into conversations."""
    passed_through: int = 0
    """Samples left as they were (not a single image question)."""
    conversations: int = 0
    """Multi-turn conversations written (each holds 1..max_questions merged questions)."""
    images: int = 0
    """Distinct images among the merged samples."""


def _single_question(s: Sample) -> bool:
    """[system?] user(1 image + text) -> assistant, with exactly one image."""
    turns = [m for m in s.messages if m.role != "system"]
    return (
        len(s.images) == 1
        and len(turns) == 2
        and turns[0].role == "user"
        and turns[1].role == "assistant"
        and turns[0].num_images == 1
        and turns[1].num_images == 0
        and s.messages[-1].role == "assistant"
    )


YES_NO: frozenset[str] = frozenset({"yes", "no"})
"""Answers (lower-cased, stripped of a final period) that make a question a yes/no one for ``yes_no_last``."""


def answer_key(text: str) -> str:
    """A short answer as compared: stripped, lower case, without final periods ("Yes." = "yes")."""
    return text.strip().rstrip(".").strip().lower()


def is_yes_no(sample: Sample) -> bool:
    """The sample's (last) answer is "yes" or "no", in any case, with or without a final period."""
    return answer_key(sample.messages[-1].text) in YES_NO


def group_by_image(
    samples: list[Sample],
    *,
    max_questions: int | None = None,
    seed: int = 0,
    stats: GroupStats | None = None,
    yes_no_last: bool = False,
) -> list[Sample]:
    """Merge the single-question samples of each image into conversations of at most ``max_questions`` turns.

    Questions of an image are shuffled with ``seed`` (so the question that carries the image varies); with
    ``yes_no_last`` the yes/no questions then move after the others (a stable sort: each part keeps its shuffled
    order). They are cut into chunks of ``max_questions`` (None = all in one). The image goes first in the first
    user turn, as LLaVA places it. Samples that are not single image questions are returned unchanged, in place of
    their first occurrence order. Merged ids are ``"<first id>+<n-1>"``; ``meta["merged_ids"]`` lists them.
    Raises when merged samples of one image carry different system prompts.
    """
    if max_questions is not None and max_questions < 1:
        raise MedvlmError(f"max_questions must be >= 1 (got {max_questions})")
    st = stats if stats is not None else GroupStats()
    groups: dict[str, list[Sample]] = {}
    order: list[tuple[str, object]] = []  # ("group", image) or ("keep", sample), in first-seen order
    for s in samples:
        st.samples_in += 1
        if not _single_question(s):
            st.passed_through += 1
            order.append(("keep", s))
            continue
        st.merged += 1
        if s.images[0] not in groups:
            groups[s.images[0]] = []
            order.append(("group", s.images[0]))
        groups[s.images[0]].append(s)
    rng = random.Random(seed)
    out: list[Sample] = []
    for kind, item in order:
        if kind == "keep":
            out.append(item)  # type: ignore[arg-type]
            continue
        members = list(groups[item])  # type: ignore[index]
        rng.shuffle(members)
        if yes_no_last:
            members.sort(key=is_yes_no)
        st.images += 1
        if len(members) == 1:  # already a one-question conversation (also a caption with no question text)
            out.append(members[0])
            st.conversations += 1
            continue
        size = max_questions or len(members)
        for start in range(0, len(members), size):
            out.append(_merge(members[start : start + size]))
            st.conversations += 1
    return out


def _merge(members: list[Sample]) -> Sample:
    """One conversation from single-question samples of the same image (already in their final order)."""
    systems = {tuple(m.text for m in s.messages if m.role == "system") for s in members}
    if len(systems) > 1:
        raise MedvlmError(
            f"samples {[s.id for s in members]} of image {members[0].images[0]!r}: "
            "different system prompts, cannot merge them into one conversation"
        )
    messages = [Message("system", [text_part(t)]) for t in next(iter(systems))]
    for i, s in enumerate(members):
        user, answer = [m for m in s.messages if m.role != "system"]
        question = user.text.strip()
        if not question:
            raise MedvlmError(f"sample {s.id!r}: the question has no text")
        content = ([image_part()] if i == 0 else []) + [text_part(question)]
        messages += [Message("user", content), Message("assistant", [text_part(answer.text)])]
    first = members[0]
    sid = first.id if len(members) == 1 else f"{first.id}+{len(members) - 1}"
    meta = {"merged_ids": [s.id for s in members]}
    return Sample(id=sid, messages=messages, images=[first.images[0]], meta=meta)


def split_merged(sample: Sample) -> list[Sample]:
    """The single-question samples of a conversation that :func:`group_by_image` merged (``meta["merged_ids"]``):
    the inverse of its merge, used by training's ``isolate_questions`` (:mod:`medvlm.train.shared_image`).

    Each keeps the system messages and puts the image first in its user turn, as ``group_by_image`` placed it in
    the first turn (and as ``"<image>\\n" + question`` renders). Anything else - a real multi-turn conversation,
    whose later questions need the earlier turns, or a caption - is returned as it is, alone.
    """
    system = [m for m in sample.messages if m.role == "system"]
    turns = [m for m in sample.messages if m.role != "system"]
    merged = sample.meta.get("merged_ids") or []
    paired = len(merged) >= 2 and len(turns) == 2 * len(merged)
    paired = paired and all(m.role == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns))
    if not paired or len(sample.images) != 1 or turns[0].num_images != 1 or sample.num_image_parts != 1:
        return [sample]
    out = []
    for i in range(0, len(turns), 2):
        question = [p for p in turns[i].content if p.get("type") != "image"]
        if not question:
            raise MedvlmError(f"sample {sample.id!r}: question {i // 2 + 1} has no text")
        user = Message("user", [image_part(), *question])
        answer = Message("assistant", [text_part(turns[i + 1].text)])
        out.append(Sample(f"{sample.id}#{i // 2}", [*system, user, answer], list(sample.images), dict(sample.meta)))
    return out


def group_file(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_questions: int | None = None,
    seed: int = 0,
    yes_no_last: bool = False,
) -> GroupStats:
    """Read a sample file (any supported format), merge per image (:func:`group_by_image`), write LLaVA JSON to
    ``dest`` atomically."""
    from medvlm.data.readers import read_samples, sample_to_llava
    from medvlm.utils.io import write_json_atomic

    src, dest = Path(src), Path(dest)
    if src.resolve() == dest.resolve():
        raise MedvlmError(f"{dest}: the output must not overwrite the input file")
    stats = GroupStats()
    grouped = group_by_image(
        list(read_samples(src)), max_questions=max_questions, seed=seed, stats=stats, yes_no_last=yes_no_last
    )
    write_json_atomic(dest, [sample_to_llava(s) for s in grouped], indent=None)
    return stats
