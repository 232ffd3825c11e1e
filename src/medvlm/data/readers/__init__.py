"""Readers for every LLaVA-Med / STLLaVA-Med file format, all producing the internal :mod:`~medvlm.data.schema`.

Public API (stable; training, evaluation, the downloader and the CLI use it):

- :func:`read_samples` ``(path, format="auto", *, skip_bad=False, bad=None) -> Iterator[Sample]``
- :func:`read_preferences` ``(path, format="auto", *, skip_bad=False, bad=None) -> Iterator[PreferenceSample]``
- :func:`read_image_urls` ``(path, *, skip_bad=False, bad=None) -> Iterator[ImageUrlRow]``
- :func:`sample_to_llava` ``(sample) -> dict`` — back to LLaVA's ``conversations`` format
- :func:`images_first` ``(sample) -> Sample`` — LLaVA's "move ``<image>`` to the front" preprocessing
- :class:`LazySamples` / :class:`RecordFile` / :func:`index_json_array` — random access for training
- ``FORMATS`` — the accepted format names (precedence of ``format="auto"`` in
  :mod:`medvlm.data.readers.formats`: decided by the first record's keys, never the file name).

All readers stream: JSON arrays are decoded record by record (:mod:`.stream`), JSON lines line by line.
``skip_bad=True`` skips malformed JSONL lines and records that do not fit the format, appending one
message per problem (file, line/record, field) to ``bad``; without it the first problem raises a
:class:`~medvlm.errors.MedvlmError`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medvlm.data.readers.figures import read_fig_captions
from medvlm.data.readers.formats import (
    FORMATS,
    PREFERENCE_FORMATS,
    SAMPLE_FORMATS,
    check_format,
    convert_record,
    detect_format,
    turn_field,
)
from medvlm.data.readers.preferences import convert_preference, split_shared_prompt
from medvlm.data.readers.stream import (
    RawRecord,
    RecordFile,
    container_kind,
    index_json_array,
    index_jsonl,
    index_records,
    iter_json_array,
    iter_jsonl_records,
    iter_raw_records,
    read_record_at,
)
from medvlm.data.schema import Message, PreferenceSample, Sample, image_part, text_part
from medvlm.errors import MedvlmError

__all__ = [
    "FORMATS",
    "SAMPLE_FORMATS",
    "PREFERENCE_FORMATS",
    "ImageUrlRow",
    "LazySamples",
    "RawRecord",
    "RecordFile",
    "check_format",
    "container_kind",
    "convert_preference",
    "convert_record",
    "detect_format",
    "fig_caption_samples",
    "images_first",
    "index_json_array",
    "index_jsonl",
    "index_records",
    "iter_json_array",
    "iter_jsonl_records",
    "iter_raw_records",
    "iter_typed_records",
    "read_image_urls",
    "read_preferences",
    "read_record_at",
    "read_samples",
    "resolve_format",
    "sample_to_llava",
    "split_shared_prompt",
    "turn_field",
]

LLAVA_FROM: dict[str, str] = {"user": "human", "assistant": "gpt", "system": "system", "vuser": "vuser"}
"""Internal roles -> LLaVA ``from`` values (for :func:`sample_to_llava`)."""
_DETECT_TRIES = 10  # with skip_bad, how many leading records may fail before the format counts as undecidable


@dataclass(frozen=True)
class ImageUrlRow:
    """One line of ``llava_med_image_urls.jsonl``."""

    pmc_tar_url: str
    """URL of the PMC open-access tarball holding the figure."""
    image_file_path: str
    """Path of the figure inside the extracted tarball (top folder = PMC id)."""
    pair_id: str
    """The image stem used by every other file (``{pair_id}.jpg``)."""
    line: int = 0
    """1-based line number in the source file."""


def _where(path: Path, r: RawRecord) -> str:
    return f"{path}: record {r.index} (line {r.line})"


def resolve_format(path: str | os.PathLike, format: str = "auto") -> str:
    """The format ``read_samples`` would use for ``path`` (explicit names are returned as given)."""
    check_format(format)
    if format != "auto":
        return format
    path = Path(path)
    if container_kind(path) == "object":
        return "fig_captions"
    for r in iter_raw_records(path, skip_bad=True):
        return detect_format(r.value, _where(path, r))
    raise MedvlmError(f"{path}: no records; cannot decide the format")


def iter_typed_records(
    path: str | os.PathLike, format: str = "auto", *, skip_bad: bool = False, bad: list[str] | None = None
) -> Iterator[tuple[str, RawRecord]]:
    """Yield ``(format, raw_record)`` for a list-of-records file, deciding ``auto`` from the first records."""
    path = Path(path)
    check_format(format)
    fmt = None if format == "auto" else format
    tries = 0
    for r in iter_raw_records(path, skip_bad=skip_bad, bad=bad):
        if fmt is None:
            try:
                fmt = detect_format(r.value, _where(path, r))
            except MedvlmError as e:
                tries += 1
                if not skip_bad or tries >= _DETECT_TRIES:
                    raise
                if bad is not None:
                    bad.append(str(e))
                continue
        yield fmt, r


def fig_caption_samples(path: str | os.PathLike) -> Iterator[Sample]:
    """The fig-captions object of lists as Samples: ``[user: image] -> [assistant: caption]``.

    The image is ``{pair_id}.jpg`` (the name every LLaVA-Med file uses); all record fields, the
    domain list the record came from and the mentions normalised to strings go to ``meta``.
    """
    for dom, records in read_fig_captions(path).items():
        for fr in records:
            meta = dict(fr.raw)
            meta.update(domain_list=dom, mentions=fr.mentions)
            yield Sample(
                id=fr.pair_id,
                images=[f"{fr.pair_id}.jpg"],
                messages=[Message("user", [image_part()]), Message("assistant", [text_part(fr.fig_caption)])],
                meta=meta,
            )


def read_samples(
    path: str | os.PathLike, format: str = "auto", *, skip_bad: bool = False, bad: list | None = None
) -> Iterator[Sample]:
    """Stream the conversations of a data file as :class:`Sample` s.

    ``format``: ``"auto"`` (decided by the first record's keys) or one of :data:`SAMPLE_FORMATS`.
    Preference and image-URL files raise (use :func:`read_preferences` / :func:`read_image_urls`).
    A bad format name or a missing/unrecognisable file raises here, before iteration starts.
    """
    path = Path(path)
    check_format(format)
    kind = container_kind(path)
    if kind == "object" and format not in ("auto", "fig_captions"):
        raise MedvlmError(
            f"{path}: one JSON object (an object of lists), but format {format!r} expects a list of records"
        )
    if kind != "object" and format == "fig_captions":
        raise MedvlmError(f"{path}: format 'fig_captions' expects one JSON object of lists, found a list of records")
    if kind == "object":
        return fig_caption_samples(path)
    return _samples(path, format, skip_bad, bad)


def _samples(path: Path, format: str, skip_bad: bool, bad: list | None) -> Iterator[Sample]:
    for fmt, r in iter_typed_records(path, format, skip_bad=skip_bad, bad=bad):
        if fmt not in SAMPLE_FORMATS:
            reader = "read_preferences" if fmt in PREFERENCE_FORMATS else "read_image_urls"
            raise MedvlmError(f"{_where(path, r)}: a {fmt!r} record holds no single conversation; use {reader}")
        try:
            yield convert_record(fmt, r.value, r.index, _where(path, r))
        except MedvlmError as e:
            if not skip_bad:
                raise
            if bad is not None:
                bad.append(str(e))


def read_preferences(
    path: str | os.PathLike, format: str = "auto", *, skip_bad: bool = False, bad: list | None = None
) -> Iterator[PreferenceSample]:
    """Stream preference pairs (``stllava_dpo`` or ``trl_preference``) as :class:`PreferenceSample` s."""
    path = Path(path)
    if format not in ("auto", *PREFERENCE_FORMATS):
        raise MedvlmError(
            f"format {format!r} is not a preference format; choose auto or one of {', '.join(PREFERENCE_FORMATS)}"
        )
    if container_kind(path) == "object":
        raise MedvlmError(f"{path}: one JSON object, not a list of preference records")
    return _preferences(path, format, skip_bad, bad)


def _preferences(path: Path, format: str, skip_bad: bool, bad: list | None) -> Iterator[PreferenceSample]:
    for fmt, r in iter_typed_records(path, format, skip_bad=skip_bad, bad=bad):
        if fmt not in PREFERENCE_FORMATS:
            raise MedvlmError(
                f"{_where(path, r)}: a {fmt!r} record, not a preference pair "
                f"(expected chosen_conversations/reject_conversations or prompt/chosen/rejected)"
            )
        try:
            yield convert_preference(fmt, r.value, r.index, _where(path, r))
        except MedvlmError as e:
            if not skip_bad:
                raise
            if bad is not None:
                bad.append(str(e))


def read_image_urls(
    path: str | os.PathLike, *, skip_bad: bool = False, bad: list | None = None
) -> Iterator[ImageUrlRow]:
    """Stream ``llava_med_image_urls.jsonl`` rows (``pmc_tar_url``, ``image_file_path``, ``pair_id``)."""
    path = Path(path)
    return _image_urls(path, iter_raw_records(path, skip_bad=skip_bad, bad=bad), skip_bad, bad)


def _image_urls(path: Path, records: Iterator[RawRecord], skip_bad: bool, bad: list | None) -> Iterator[ImageUrlRow]:
    for r in records:
        where = _where(path, r)
        try:
            if not isinstance(r.value, dict):
                raise MedvlmError(f"{where}: expected a JSON object, got {type(r.value).__name__}")
            vals = []
            for key in ("pmc_tar_url", "image_file_path", "pair_id"):
                v = r.value.get(key)
                if not isinstance(v, str) or not v:
                    raise MedvlmError(f"{where}: field {key!r}: missing or not a non-empty string")
                vals.append(v)
        except MedvlmError as e:
            if not skip_bad:
                raise
            if bad is not None:
                bad.append(str(e))
            continue
        yield ImageUrlRow(*vals, line=r.line)


def sample_to_llava(sample: Sample) -> dict:
    """Write a Sample back in LLaVA's format: ``id``, ``image`` (path or list), ``conversations``, meta keys.

    Reading the result with :func:`read_samples` gives the same Sample back.
    """
    d: dict = {"id": sample.id}
    if len(sample.images) == 1:
        d["image"] = sample.images[0]
    elif sample.images:
        d["image"] = list(sample.images)
    turns = []
    for i, m in enumerate(sample.messages):
        if m.role not in LLAVA_FROM:
            raise MedvlmError(f"sample {sample.id}: message {i}: role {m.role!r} has no LLaVA equivalent")
        turns.append({"from": LLAVA_FROM[m.role], "value": m.to_text()})
    d["conversations"] = turns
    for k, v in sample.meta.items():
        d.setdefault(k, copy.deepcopy(v))
    return d


def images_first(sample: Sample) -> Sample:
    """LLaVA's ``preprocess_multimodal``: in each turn with images, images go first and the text is stripped.

    (``"question\\n<image>"`` -> ``"<image>\\nquestion"``, as LLaVA/LLaVA-Med training does.)
    """
    out = copy.deepcopy(sample)
    for m in out.messages:
        n = m.num_images
        if n:
            text = m.text.strip()
            m.content = [image_part() for _ in range(n)] + ([text_part(text)] if text else [])
    return out


class LazySamples:
    """Random access to the Samples of a JSON array / JSON-lines file: ``len(ds)``, ``ds[i] -> Sample``.

    Indexes byte offsets once (:class:`RecordFile`) and decodes record ``i`` only when asked, so a
    467k-record file costs ~16 bytes per record in RAM. Wrap it in a torch ``Dataset`` for training.
    """

    def __init__(self, path: str | os.PathLike, format: str = "auto", index: list[tuple[int, int]] | None = None):
        self.path = Path(path)
        self.records = RecordFile(self.path, index)
        self.format = (
            format
            if format != "auto"
            else (detect_format(self.records[0], f"{self.path}: record 0") if len(self.records) else "llava")
        )
        if self.format not in SAMPLE_FORMATS or self.format == "fig_captions":
            raise MedvlmError(f"{self.path}: format {self.format!r} cannot be read lazily as Samples")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        return convert_record(self.format, self.records[i], i, f"{self.path}: record {i}")
