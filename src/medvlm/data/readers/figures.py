"""Reader for ``llava_med_instruct_fig_captions.json``: a JSON object of lists, one list per domain.

``in_text_mention`` comes in three shapes in the real file: a list of strings, a list of
``{"tokens": str, "entities": [...]}`` objects, or null. :class:`FigureRecord` normalises it to a
list of strings and keeps the raw record for round-tripping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.utils.io import read_json

DOMAINS: tuple[str, ...] = ("chest_xray", "mri", "histology", "gross", "ct_scan")
"""LLaVA-Med's five domains, in the precedence order its evaluation uses (first true wins)."""


@dataclass
class FigureRecord:
    """One figure with its caption and mentions."""

    pair_id: str
    """The image stem used everywhere (``{pmid}_{fig_id}``)."""
    fig_label: str
    """e.g. ``Figure 2`` / ``Fig. 3``."""
    fig_caption: str
    mentions: list[str]
    """Sentences of the paper that mention the figure (``in_text_mention`` normalised to strings)."""
    domain_list: str
    """The key of the top-level list the record came from."""
    domain: dict[str, bool] = field(default_factory=dict)
    """The record's own 5-boolean domain flags (may have several true)."""
    raw: dict[str, Any] = field(default_factory=dict)


def normalize_mentions(value: Any, where: str = "") -> list[str]:
    """``in_text_mention`` -> list of strings (strings kept, ``{"tokens": ...}`` objects unwrapped, null -> [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise MedvlmError(f"{where}in_text_mention: expected a list, string or null, got {type(value).__name__}")
    out: list[str] = []
    for i, m in enumerate(value):
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, dict) and isinstance(m.get("tokens"), str):
            out.append(m["tokens"])
        else:
            raise MedvlmError(f"{where}in_text_mention[{i}]: expected a string or an object with 'tokens'")
    return out


def read_fig_captions(path: str | os.PathLike) -> dict[str, list[FigureRecord]]:
    """Read the fig-captions object-of-lists; errors name the domain list, index and field."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise MedvlmError(f"{path}: expected a JSON object of lists (one list per domain), got {type(data).__name__}")
    out: dict[str, list[FigureRecord]] = {}
    for dom, items in data.items():
        if not isinstance(items, list):
            raise MedvlmError(f"{path}: [{dom!r}] expected a list of figure records")
        recs = []
        for i, r in enumerate(items):
            where = f"{path}: [{dom!r}][{i}] "
            if not isinstance(r, dict):
                raise MedvlmError(f"{where}expected an object")
            for key in ("pair_id", "fig_caption"):
                if not isinstance(r.get(key), str) or not r.get(key):
                    raise MedvlmError(f"{where}field {key!r}: missing or not a non-empty string")
            recs.append(
                FigureRecord(
                    pair_id=r["pair_id"],
                    fig_label=str(r.get("fig_label") or ""),
                    fig_caption=r["fig_caption"],
                    mentions=normalize_mentions(r.get("in_text_mention"), where),
                    domain_list=dom,
                    domain={k: bool(v) for k, v in (r.get("domain") or {}).items()},
                    raw=r,
                )
            )
        out[dom] = recs
    return out


def primary_domain(flags: dict[str, bool]) -> str | None:
    """The first true domain in LLaVA-Med's precedence order (chest_xray > mri > histology > gross > ct_scan)."""
    for d in DOMAINS:
        if flags.get(d):
            return d
    return None
