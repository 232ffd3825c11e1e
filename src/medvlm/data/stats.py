"""``medvlm data stats``: the counts LLaVA-Med's paper reports for its data files.

For instruction files the paper reports #images, #QA pairs and per-domain image counts; for the
alignment file #records/#images; for the chat benchmark #questions per type and domain; for VQA
splits #questions per answer type. :func:`dataset_stats` computes all of these in one streaming pass.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medvlm.data.readers import PREFERENCE_FORMATS, read_image_urls, read_preferences, read_samples, resolve_format
from medvlm.data.readers.figures import primary_domain
from medvlm.data.schema import Message, Sample

_USERLIKE = ("user", "vuser")


def _qa_pairs(messages: list[Message]) -> int:
    """User (or vuser) turns directly answered by an assistant turn."""
    return sum(1 for a, b in zip(messages, messages[1:]) if a.role in _USERLIKE and b.role == "assistant")


def dataset_stats(path: str | os.PathLike, format: str = "auto", *, skip_bad: bool = False) -> dict[str, Any]:
    """Count records, turns, QA pairs, questions, distinct images, and break them down by domain/type.

    Returns ``{"path", "format", "records", "turns", "questions", "qa_pairs", "images", "domains":
    {domain: {"records", "images", "qa_pairs"}}, "domain_flags": {domain: records}, "types": {...},
    "answer_types": {...}, "bad_records": n}``. ``domains`` uses each record's primary domain
    (LLaVA-Med's precedence) so rows sum to the total; ``domain_flags`` counts every true flag.
    Preference files count the prompt + chosen conversation of each pair.
    """
    path = Path(path)
    fmt = resolve_format(path, format)
    bad: list[str] = []
    out: dict[str, Any] = {"path": str(path), "format": fmt}
    if fmt == "image_urls":
        rows = list(r.pair_id for r in read_image_urls(path, skip_bad=skip_bad, bad=bad))
        out.update(records=len(rows), images=len(set(rows)), bad_records=len(bad))
        return out
    if fmt in PREFERENCE_FORMATS:
        samples = (
            Sample(id=p.id, messages=p.prompt + p.chosen, images=p.images, meta=p.meta)
            for p in read_preferences(path, fmt, skip_bad=skip_bad, bad=bad)
        )
    else:
        samples = read_samples(path, fmt, skip_bad=skip_bad, bad=bad)
    records = turns = questions = qa = 0
    images: set[str] = set()
    dom_records: Counter = Counter()
    dom_qa: Counter = Counter()
    dom_images: dict[str, set[str]] = defaultdict(set)
    flags: Counter = Counter()
    types: Counter = Counter()
    answer_types: Counter = Counter()
    for s in samples:
        records += 1
        turns += len(s.messages)
        questions += sum(1 for m in s.messages if m.role in _USERLIKE)
        n_qa = _qa_pairs(s.messages)
        qa += n_qa
        images.update(s.images)
        d = s.meta.get("domain")
        dom = (primary_domain(d) or "none") if isinstance(d, dict) else d if isinstance(d, str) else None
        if dom is not None:
            dom_records[dom] += 1
            dom_qa[dom] += n_qa
            dom_images[dom].update(s.images)
        if isinstance(d, dict):
            flags.update(k for k, v in d.items() if v)
        for key, counter in (("type", types), ("answer_type", answer_types)):
            if isinstance(s.meta.get(key), str):
                counter[s.meta[key]] += 1
    out.update(
        records=records,
        turns=turns,
        questions=questions,
        qa_pairs=qa,
        images=len(images),
        domains={
            k: {"records": dom_records[k], "images": len(dom_images[k]), "qa_pairs": dom_qa[k]}
            for k in sorted(dom_records)
        },
        domain_flags=dict(sorted(flags.items())),
        types=dict(sorted(types.items())),
        answer_types=dict(sorted(answer_types.items())),
        bad_records=len(bad),
    )
    return out
