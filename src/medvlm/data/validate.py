"""``medvlm data validate``: check a data file before spending compute on it.

:func:`validate_file` streams the file, converts every record with the readers and checks what
LLaVA-style training and evaluation rely on: roles alternate (user/vuser vs assistant, system only
first), no empty turns, one ``<image>`` placeholder per given image (and none without an image, none in
an answer), image files present and decodable under ``image_folder``. Every problem names the record
index, id and source field. Images shared by many records are checked once.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from medvlm.data.images import DICOM_SUFFIXES, open_image
from medvlm.data.readers import (
    PREFERENCE_FORMATS,
    convert_preference,
    convert_record,
    fig_caption_samples,
    iter_typed_records,
    read_image_urls,
    resolve_format,
    turn_field,
)
from medvlm.data.readers.figures import primary_domain
from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError

_USERLIKE = ("user", "vuser")


@dataclass
class Problem:
    """One validation problem."""

    index: int | None
    """0-based record index (None for problems that are not tied to one record)."""
    field: str
    """The source field, e.g. ``conversations[2]``, ``image``."""
    message: str
    record_id: str | None = None

    def __str__(self) -> str:
        where = (
            "file"
            if self.index is None
            else f"record {self.index}" + (f" (id {self.record_id})" if self.record_id is not None else "")
        )
        return f"{where}: {self.field}: {self.message}"


@dataclass
class ValidationReport:
    """What :func:`validate_file` found."""

    path: str
    format: str
    records: int = 0
    """Records read and converted."""
    turns: int = 0
    """Messages over all records."""
    images: int = 0
    """Image references over all records."""
    images_checked: bool = False
    """Whether files were looked up (an ``image_folder`` was given)."""
    images_found: int = 0
    """Distinct image files present and decodable."""
    images_missing: int = 0
    """Distinct image files not found."""
    images_unreadable: int = 0
    """Distinct image files present but not decodable."""
    domains: Counter = field(default_factory=Counter)
    """Records per primary domain (``domain`` flags, LLaVA-Med precedence) or domain string."""
    problems: list[Problem] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)
    """Unreadable lines/records skipped with ``skip_bad`` (one message each)."""

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems and not self.bad_records

    def problem_lines(self) -> list[str]:
        """One line per problem (skipped unreadable records first)."""
        return [*self.bad_records, *(str(p) for p in self.problems)]

    def summary(self) -> dict[str, Any]:
        """The counts as a JSON-able dict."""
        return {
            "path": self.path,
            "format": self.format,
            "records": self.records,
            "turns": self.turns,
            "images": self.images,
            "images_checked": self.images_checked,
            "images_found": self.images_found,
            "images_missing": self.images_missing,
            "images_unreadable": self.images_unreadable,
            "domains": dict(self.domains),
            "problems": len(self.problems),
            "bad_records": len(self.bad_records),
        }


def check_messages(messages: list[Message], images: list[str], field_of) -> list[tuple[str, str]]:
    """Structural checks of one conversation: ``[(field, message), ...]``; ``field_of(i)`` names turn i's field."""
    out: list[tuple[str, str]] = []
    if not messages:
        return [(field_of(0), "no turns")]
    expected, started = "user", False
    for i, m in enumerate(messages):
        if m.num_images == 0 and not m.text.strip():
            out.append((field_of(i), "empty turn"))
        if m.role == "system":
            if started:
                out.append((field_of(i), "a system turn after the conversation started"))
            continue
        started = True
        kind = "user" if m.role in _USERLIKE else "assistant"
        if kind != expected:
            out.append((field_of(i), f"roles do not alternate: expected a {expected} turn, got {m.role}"))
        expected = "assistant" if kind == "user" else "user"
        if kind == "assistant" and m.num_images:
            out.append((field_of(i), "an <image> placeholder in an answer turn"))
    n_parts = sum(m.num_images for m in messages)
    first_user = next((i for i, m in enumerate(messages) if m.role in _USERLIKE), 0)
    if images and n_parts == 0:
        out.append((field_of(first_user), f"no <image> placeholder while {len(images)} image(s) given"))
    elif n_parts != len(images):
        out.append((field_of(first_user), f"{n_parts} <image> placeholder(s) but {len(images)} image(s) given"))
    return out


def check_sample(sample: Sample, fmt: str = "messages", record: Any = None) -> list[tuple[str, str]]:
    """:func:`check_messages` for a Sample, fields named as in the source format."""
    return check_messages(sample.messages, sample.images, lambda i: turn_field(fmt, record, i))


def image_status(path: Path) -> str | None:
    """None if the image decodes, else a short reason (``missing`` / ``unreadable: ...``)."""
    if not path.is_file():
        return "missing"
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            from medvlm.data.dicom import load_dicom  # optional extra

            load_dicom(path)
        else:
            with open_image(path, str(path)) as im:  # refuses other formats and too many pixels
                im.verify()
    except MedvlmError as e:
        return f"unreadable: {e}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return None


def _domain_key(meta: dict) -> str | None:
    d = meta.get("domain")
    if isinstance(d, dict):
        return primary_domain(d) or "none"
    if isinstance(d, str):
        return d
    return None


def _preference_items(fmt: str, rec: Any, index: int, where: str):
    p = convert_preference(fmt, rec, index, where)
    names = (
        ("chosen_conversations", "reject_conversations" if "reject_conversations" in rec else "rejected_conversations")
        if fmt == "stllava_dpo"
        else ("chosen", "rejected")
    )
    for side, cont in zip(names, (p.chosen, p.rejected)):
        msgs = p.prompt + cont

        def field_of(i: int, side: str = side, n: int = len(p.prompt)) -> str:
            if fmt == "stllava_dpo":
                return f"{side}[{i}]"
            return "prompt" if i < n else f"{side}[{i - n}]"

        yield Sample(id=p.id, messages=msgs, images=p.images, meta=p.meta), field_of


def validate_file(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    format: str = "auto",
    *,
    skip_bad: bool = False,
) -> ValidationReport:
    """Validate a data file; returns a :class:`ValidationReport` (``report.ok``; ``report.problem_lines()``).

    Unreadable records (bad JSON, wrong types) raise a :class:`MedvlmError` unless ``skip_bad``, in
    which case they are listed in ``report.bad_records`` and the rest is still checked.
    """
    path = Path(path)
    fmt = resolve_format(path, format)
    rep = ValidationReport(path=str(path), format=fmt, images_checked=image_folder is not None)
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise MedvlmError(f"{folder}: image folder not found")
    seen: dict[str, str | None] = {}

    def add(index: int, sample: Sample, checks: list[tuple[str, str]], img_field: str) -> None:
        rep.records += 1
        rep.turns += len(sample.messages)
        rep.images += len(sample.images)
        dom = _domain_key(sample.meta)
        if dom is not None:
            rep.domains[dom] += 1
        for fld, msg in checks:
            rep.problems.append(Problem(index, fld, msg, sample.id))
        if folder is None:
            return
        for j, ref in enumerate(sample.images):
            if ref not in seen:
                status = image_status(Path(ref) if os.path.isabs(ref) else folder / ref)
                seen[ref] = status
                if status is None:
                    rep.images_found += 1
                elif status == "missing":
                    rep.images_missing += 1
                else:
                    rep.images_unreadable += 1
            if seen[ref] is not None:
                fld = img_field if len(sample.images) == 1 else f"{img_field}[{j}]"
                rep.problems.append(Problem(index, fld, f"image {ref!r} {seen[ref]}", sample.id))

    if fmt == "image_urls":
        rep.records = sum(1 for _ in read_image_urls(path, skip_bad=skip_bad, bad=rep.bad_records))
        return rep
    if fmt == "fig_captions":
        for i, s in enumerate(fig_caption_samples(path)):
            add(i, s, check_sample(s, fmt), "pair_id")
        return rep
    img_field = "images" if fmt in ("messages", "trl_preference") else "image"
    for rfmt, r in iter_typed_records(path, fmt, skip_bad=skip_bad, bad=rep.bad_records):
        where = f"{path}: record {r.index} (line {r.line})"
        try:
            if rfmt in PREFERENCE_FORMATS:
                items = list(_preference_items(rfmt, r.value, r.index, where))
                checks = list(
                    dict.fromkeys(c for s, field_of in items for c in check_messages(s.messages, s.images, field_of))
                )
                add(r.index, items[0][0], checks, img_field)
            else:
                s = convert_record(rfmt, r.value, r.index, where)
                add(r.index, s, check_sample(s, rfmt, r.value), img_field)
        except MedvlmError as e:
            if not skip_bad:
                raise
            rep.bad_records.append(str(e))
    return rep
