"""Post-processing of generated conversations into the LLaVA-Med instruct format.

For each line of the generation output: parse the ``User:`` / ``Assistant:`` turns of ``result``
(tolerating ``**User:**``, numbering, bullets and extra whitespace), drop pairs whose answer admits
not seeing the image, strip phrases that point at the caption ("According to the caption, ...",
"..., as mentioned in the description"), capitalise only the first letter, drop pairs that still
talk about a caption/description, and put ``<image>`` at the start or end of the first kept human
turn by a seeded per-sample choice. A line that cannot be parsed is reported and skipped. The output
is written atomically with a count of drops by reason.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.errors import MedvlmError
from medvlm.utils.io import iter_jsonl, write_json_atomic

IMAGE_TOKEN = "<image>"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm")

# An answer containing one of these admits that the model worked from text, not an image.
NO_IMAGE_ACCESS_PHRASES: tuple[str, ...] = (
    "without access",
    "cannot see the",
    "can't see the",
    "can not see the",
    "unable to see",
    "unable to view",
    "not able to see",
    "not able to view",
    "cannot view",
    "can't view",
    "don't have access",
    "do not have access",
    "no access to the image",
    "not mentioned in the caption",
    "not mentioned in the description",
    "not mentioned in the context",
    "not provided in the caption",
    "not provided in the context",
    "not specified in the caption",
    "not described in the caption",
    "sorry",
    "as an ai",
    "i am unable",
    "i'm unable",
)

# "in the context of ..." is ordinary English, not a pointer at the prompt: the lookahead keeps it.
_SOURCE = r"(?:given |provided |figure |image |above )?(?:caption|description|context|text|information)s?(?!\s+of\b)"
_LEADING = re.compile(
    r"(^|[.!?]\s+)(?:according to|based on|as (?:described|mentioned|stated|noted|indicated|shown|seen|explained) in"
    r"|from|in) the " + _SOURCE + r"(?: provided| given| above)?\s*[,:]?\s*(\S)",
    re.IGNORECASE,
)
_INLINE = re.compile(
    r"\s*(?:,\s*)?\(?(?:(?:as |which is |that is )?(?:described|mentioned|stated|noted|indicated|shown|seen|explained"
    r"|specified|depicted) (?:in|by)|according to|as per|per) the " + _SOURCE + r"\)?(?:\s*,)?",
    re.IGNORECASE,
)
_TURN = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:[-*\u2022>]\s+)?(?:\(?\d{1,3}[.):]\s*)?(?:\*\*|__)?\s*(user|assistant)\s*\d{0,3}\s*"
    r"(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(.*)$",
    re.IGNORECASE,
)
_RULE = re.compile(r"^\s*([-*_=])\1{2,}\s*$")
_MENTIONS_SOURCE_ANSWER = re.compile(r"\b(?:captions?|descriptions?)\b", re.IGNORECASE)
_MENTIONS_SOURCE_QUESTION = re.compile(r"\bcaptions?\b", re.IGNORECASE)


class ConversationParseError(MedvlmError):
    """A model reply with no ``User:`` / ``Assistant:`` turns."""


@dataclass
class PostprocessConfig:
    """Inputs and options of the post-processing."""

    inp: Path
    """Generation output (JSONL with ``pair_id``, ``domain`` and ``result``)."""
    out: Path
    """LLaVA-Med instruct JSON (array of ``id``, ``image``, ``domain``, ``conversations``)."""
    seed: int = 0
    """Seed of the per-sample choice of putting ``<image>`` before or after the first question."""
    image_folder: Path | None = None
    """If set, ``image`` is the real file ``{pair_id}.<ext>`` found here (samples without one are skipped)."""
    image_ext: str = ".jpg"
    """Extension for ``image`` when there is no ``image_folder`` and the record has no ``image`` field."""


@dataclass
class PostprocessReport:
    """Counts of what the post-processing kept and dropped."""

    samples_read: int = 0
    samples_written: int = 0
    pairs_kept: int = 0
    pair_drops: Counter = field(default_factory=Counter)
    """Dropped question/answer pairs by reason: ``no_image_access``, ``mentions_caption``, ``unpaired_turn``,
    ``empty_turn``."""
    sample_drops: Counter = field(default_factory=Counter)
    """Skipped samples by reason: ``parse_error``, ``no_pairs_left``, ``missing_result``, ``duplicate_id``,
    ``image_not_found``, ``bad_line``."""
    problems: list[str] = field(default_factory=list)
    """One message per skipped sample, naming the file and line."""

    def as_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "samples_read": self.samples_read,
            "samples_written": self.samples_written,
            "pairs_kept": self.pairs_kept,
            "pair_drops": dict(self.pair_drops),
            "sample_drops": dict(self.sample_drops),
            "problems": self.problems,
        }


def parse_turns(text: str) -> list[tuple[str, str]]:
    """``[(role, text)]`` with role ``user``/``assistant``; consecutive turns of one role are merged."""
    turns: list[list[str]] = []
    for line in text.splitlines():
        if _RULE.match(line):
            continue
        m = _TURN.match(line)
        if m:
            role = m.group(1).lower()
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + m.group(2)
            else:
                turns.append([role, m.group(2)])
        elif turns:
            turns[-1][1] += "\n" + line
        # text before the first turn (a preamble such as "Here is a conversation:") is ignored
    if not turns:
        raise ConversationParseError("no 'User:' / 'Assistant:' turns found")
    return [(role, re.sub(r"\n{3,}", "\n\n", body).strip()) for role, body in turns]


def pair_turns(turns: list[tuple[str, str]], drops: Counter) -> list[tuple[str, str]]:
    """(question, answer) pairs; a turn without its partner counts as ``unpaired_turn``."""
    pairs = []
    i = 0
    while i < len(turns):
        if turns[i][0] == "user" and i + 1 < len(turns) and turns[i + 1][0] == "assistant":
            pairs.append((turns[i][1], turns[i + 1][1]))
            i += 2
        else:
            drops["unpaired_turn"] += 1
            i += 1
    return pairs


def clean_text(text: str) -> str:
    """Strip phrases pointing at the caption/description and capitalise the first letter (the rest is kept)."""
    text = _LEADING.sub(lambda m: m.group(1) + m.group(2).upper(), text.strip())
    text = _INLINE.sub(" ", text)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text[:1].upper() + text[1:]


def admits_no_image(answer: str) -> bool:
    """True if the answer says the model cannot see the image (or apologises)."""
    low = answer.lower()
    return any(p in low for p in NO_IMAGE_ACCESS_PHRASES)


def filter_pairs(pairs: list[tuple[str, str]], drops: Counter) -> list[tuple[str, str]]:
    """Drop, clean, drop again (see the module docstring); counts drops by reason into ``drops``."""
    kept = []
    for q, a in pairs:
        q, a = q.replace(IMAGE_TOKEN, "").strip(), a.replace(IMAGE_TOKEN, "").strip()
        if not q or not a:
            drops["empty_turn"] += 1
            continue
        if admits_no_image(a):
            drops["no_image_access"] += 1
            continue
        q, a = clean_text(q), clean_text(a)
        if _MENTIONS_SOURCE_ANSWER.search(a) or _MENTIONS_SOURCE_QUESTION.search(q):
            drops["mentions_caption"] += 1
            continue
        kept.append((q, a))
    return kept


def image_at_start(seed: int, sample_id: str) -> bool:
    """The seeded per-sample choice: True = ``<image>`` before the first question."""
    return random.Random(f"{seed}:{sample_id}").random() < 0.5


def to_conversations(pairs: list[tuple[str, str]], at_start: bool) -> list[dict]:
    """LLaVA ``conversations`` with ``<image>`` in the first human turn."""
    conv = []
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = f"{IMAGE_TOKEN}\n{q}" if at_start else f"{q}\n{IMAGE_TOKEN}"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


def _image_name(row: dict, pair_id: str, cfg: PostprocessConfig) -> str | None:
    if cfg.image_folder is not None:
        for ext in IMAGE_EXTS:
            for cand in (ext, ext.upper()):
                if (cfg.image_folder / f"{pair_id}{cand}").is_file():
                    return f"{pair_id}{cand}"
        return None
    if isinstance(row.get("image"), str) and row["image"]:
        return row["image"]
    return f"{pair_id}{cfg.image_ext}"


def postprocess_file(cfg: PostprocessConfig) -> PostprocessReport:
    """Turn a generation JSONL into the LLaVA-Med instruct JSON; see the module docstring."""
    if cfg.inp.resolve() == cfg.out.resolve():
        raise MedvlmError(f"--out {cfg.out} would overwrite the input")
    if cfg.image_folder is not None and not cfg.image_folder.is_dir():
        raise MedvlmError(f"--image-folder {cfg.image_folder}: not a directory")
    report = PostprocessReport()
    bad: list[str] = []
    out: list[dict] = []
    seen: set[str] = set()

    def skip(reason: str, msg: str) -> None:
        report.sample_drops[reason] += 1
        report.problems.append(msg)

    def drain_bad() -> None:  # report unreadable lines in file order, as iter_jsonl meets them
        for msg in bad:
            report.samples_read += 1
            skip("bad_line", msg)
        bad.clear()

    for lineno, row in iter_jsonl(cfg.inp, skip_bad=True, bad=bad):
        drain_bad()
        report.samples_read += 1
        where = f"{cfg.inp}:{lineno}"
        if not isinstance(row, dict):
            skip("bad_line", f"{where}: expected a JSON object")
            continue
        pair_id = row.get("pair_id") or row.get("id")
        if not isinstance(pair_id, str) or not pair_id:
            skip("bad_line", f"{where}: field 'pair_id' missing or not a string")
            continue
        if pair_id in seen:
            skip("duplicate_id", f"{where}: pair_id {pair_id!r} appeared on an earlier line; kept the first")
            continue
        seen.add(pair_id)
        result = row.get("result")
        if not isinstance(result, str) or not result.strip():
            skip("missing_result", f"{where}: field 'result' missing or empty")
            continue
        try:
            turns = parse_turns(result)
        except ConversationParseError as e:
            skip("parse_error", f"{where} ({pair_id}): {e}")
            continue
        pairs = filter_pairs(pair_turns(turns, report.pair_drops), report.pair_drops)
        if not pairs:
            skip("no_pairs_left", f"{where} ({pair_id}): every question/answer pair was dropped")
            continue
        image = _image_name(row, pair_id, cfg)
        if image is None:
            skip("image_not_found", f"{where} ({pair_id}): no image {pair_id}.* in {cfg.image_folder}")
            continue
        domain = row.get("domain") if isinstance(row.get("domain"), dict) else {}
        out.append(
            {
                "id": pair_id,
                "image": image,
                "domain": domain,
                "conversations": to_conversations(pairs, image_at_start(cfg.seed, pair_id)),
            }
        )
        report.pairs_kept += len(pairs)
    drain_bad()
    write_json_atomic(cfg.out, out)
    report.samples_written = len(out)
    return report
