"""Convert the public VQA-RAD, SLAKE and PathVQA releases to LLaVA-Med's VQA fine-tune/test format.

Output folder (written to a temp dir, then renamed into place):

- ``train.json``, ``test.json`` (and ``validation.json`` when the source has one): JSON arrays of
  ``{"id", "image", "answer_type": "OPEN"|"CLOSED", ["question_type"], "conversations":
  [{"from": "human", "value": "<image>\\n" + question}, {"from": "gpt", "value": answer}]}``;
  ``image`` is relative to ``images/``.
- ``images/``: the image files (copied, read from SLAKE's hub ``imgs.zip``, or written from PathVQA's
  parquet bytes, deduplicated).
- ``train_open_answers.json``: ``{"0": [distinct OPEN answers of train]}``, the candidate list
  LLaVA-Med's single-dataset scorer needs.

``closed_options=True`` appends `` Please choose from the following two options: [yes, no]`` to
questions whose answer is yes/no (LLaVA-Med's closed-question prompt).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.data.benchmarks.zip_images import ZipImages
from medvlm.data.images import open_image
from medvlm.errors import MedvlmError
from medvlm.utils.io import atomic_dir, read_json, write_json_atomic

DATASETS: tuple[str, ...] = ("vqa-rad", "slake", "pathvqa")
CLOSED_OPTIONS_SUFFIX = " Please choose from the following two options: [yes, no]"
VQA_RAD_PUBLIC = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGE_DIRS: tuple[str, ...] = ("VQA_RAD Image Folder", "images")


@dataclass
class VQAItem:
    """One converted question."""

    id: Any
    image: str
    """Path relative to the output ``images/`` folder."""
    question: str
    answer: str
    answer_type: str
    """``OPEN`` or ``CLOSED``."""
    question_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other source fields kept in the output record (e.g. SLAKE ``modality``, ``location``)."""

    def to_record(self, closed_options: bool) -> dict[str, Any]:
        q = self.question.strip()
        if closed_options and self.answer.strip().lower() in ("yes", "no"):
            q += CLOSED_OPTIONS_SUFFIX
        rec: dict[str, Any] = {"id": self.id, "image": self.image, "answer_type": self.answer_type}
        if self.question_type:
            rec["question_type"] = self.question_type
        rec.update(self.extra)
        rec["conversations"] = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": self.answer}]
        return rec


def _answer_type(value: Any, where: str) -> str:
    at = str(value or "").strip().upper()
    if at not in ("OPEN", "CLOSED"):
        raise MedvlmError(f"{where}: field 'answer_type': expected OPEN or CLOSED, got {value!r}")
    return at


def _text(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if v is None or isinstance(v, (dict, list, bool)) or str(v).strip() == "":
        raise MedvlmError(f"{where}: field {key!r} is missing or empty")
    return str(v).strip()


def _records(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise MedvlmError(f"{path}: expected a JSON array of question records")
    return data


class ImageSink:
    """Copies/writes images into ``out/images`` once each; returns the path relative to ``images/``."""

    def __init__(self, out: Path):
        self.root = out / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, str] = {}

    def copy(self, src: Path, rel: str, where: str) -> str:
        if rel not in self.done:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise MedvlmError(f"{where}: image name {rel!r} must be a relative path inside the image folder")
            if not src.is_file():
                raise MedvlmError(f"{where}: image file {src} not found")
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            self.done[rel] = rel
        return rel

    def put(self, data: bytes, rel: str, where: str) -> str:
        """Write ``data`` (an image member read from an archive) as ``images/rel`` once."""
        if rel not in self.done:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise MedvlmError(f"{where}: image name {rel!r} must be a relative path inside the image folder")
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            self.done[rel] = rel
        return rel

    def write(self, data: bytes, stem: str, where: str) -> str:
        key = hashlib.sha1(data).hexdigest()
        if key not in self.done:
            with open_image(io.BytesIO(data), f"{where}: image bytes") as im:  # the formats medvlm reads only
                ext = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}[
                    im.format
                ]
            rel = f"{stem}.{ext}"
            (self.root / rel).write_bytes(data)
            self.done[key] = rel
        return self.done[key]


def _check_unique(items: list[VQAItem], where: str) -> None:
    seen: set = set()
    for it in items:
        if it.id in seen:
            raise MedvlmError(f"{where}: duplicate question id {it.id!r}")
        seen.add(it.id)


def _vqa_rad(src: Path, out: Path) -> dict[str, list[VQAItem]]:
    img_dir = next((src / d for d in VQA_RAD_IMAGE_DIRS if (src / d).is_dir()), None)
    if img_dir is None:
        raise MedvlmError(f"{src}: no image folder ({' or '.join(repr(d) for d in VQA_RAD_IMAGE_DIRS)})")
    sink = ImageSink(out)
    # The paper's split (trainset.json / testset.json: 3,064 / 451) when present, else phrase_type.
    if (src / "trainset.json").is_file() and (src / "testset.json").is_file():
        splits = {"train": _records(src / "trainset.json"), "test": _records(src / "testset.json")}
        names = {"train": "trainset.json", "test": "testset.json"}
    elif (src / VQA_RAD_PUBLIC).is_file():
        recs = _records(src / VQA_RAD_PUBLIC)
        splits = {"train": [], "test": []}
        for r in recs:
            split = "test" if isinstance(r, dict) and str(r.get("phrase_type", "")).startswith("test") else "train"
            splits[split].append(r)
        names = {"train": VQA_RAD_PUBLIC, "test": VQA_RAD_PUBLIC}
    else:
        raise MedvlmError(f"{src}: neither trainset.json + testset.json nor {VQA_RAD_PUBLIC!r} found")
    out_items: dict[str, list[VQAItem]] = {}
    for split, recs in splits.items():
        items = []
        for i, r in enumerate(recs):
            where = f"{src / names[split]}: record {i}"
            if not isinstance(r, dict):
                raise MedvlmError(f"{where}: expected an object")
            name = _text(r, "image_name", where)
            items.append(
                VQAItem(
                    id=r.get("qid", i),
                    image=sink.copy(img_dir / name, name, where),
                    question=_text(r, "question", where),
                    answer=_text(r, "answer", where),
                    answer_type=_answer_type(r.get("answer_type"), where),
                    question_type=str(r["question_type"]).strip() if r.get("question_type") else None,
                )
            )
        _check_unique(items, f"{src / names[split]} ({split})")
        out_items[split] = items
    return out_items


def _slake(src: Path, out: Path) -> dict[str, list[VQAItem]]:
    img_dir = src / "imgs"
    sink = ImageSink(out)
    if img_dir.is_dir():  # the release zip from the SLAKE site, unpacked

        def image(name: str, where: str) -> str:
            return sink.copy(img_dir / name, name, where)

        archive = None
    elif (src / "imgs.zip").is_file():  # the Hugging Face hub copy (BoKelvin/SLAKE): imgs.zip beside the JSON files
        archive = ZipImages(src / "imgs.zip", prefix="imgs")

        def image(name: str, where: str) -> str:  # ~20 questions per image: read each member once
            return name if name in sink.done else sink.put(archive.read(name, where), name, where)
    else:
        raise MedvlmError(f"{src}: no 'imgs' folder and no 'imgs.zip'")
    try:
        return _slake_splits(src, image)
    finally:
        if archive is not None:
            archive.close()


def _slake_splits(src: Path, image: Callable[[str, str], str]) -> dict[str, list[VQAItem]]:
    out_items: dict[str, list[VQAItem]] = {}
    # The release names the validation split validate.json; the hub copy renamed it validation.json.
    for split, fnames in (
        ("train", ("train.json",)),
        ("validation", ("validation.json", "validate.json")),
        ("test", ("test.json",)),
    ):
        path = next((src / f for f in fnames if (src / f).is_file()), None)
        if path is None:
            if split == "validation":
                continue
            raise MedvlmError(f"{src}: {fnames[0]} not found")
        items = []
        for i, r in enumerate(_records(path)):
            where = f"{path}: record {i}"
            if not isinstance(r, dict):
                raise MedvlmError(f"{where}: expected an object")
            if r.get("q_lang", "en") != "en":
                continue  # LLaVA-Med evaluates the English questions only
            name = _text(r, "img_name", where)
            extra = {k: r[k] for k in ("modality", "location") if r.get(k)}
            items.append(
                VQAItem(
                    id=r.get("qid", i),
                    image=image(name, where),
                    question=_text(r, "question", where),
                    answer=_text(r, "answer", where),
                    answer_type=_answer_type(r.get("answer_type"), where),
                    question_type=str(r["content_type"]).strip() if r.get("content_type") else None,
                    extra=extra,
                )
            )
        _check_unique(items, f"{path}")
        out_items[split] = items
    return out_items


TABLE_COLUMNS: tuple[str, ...] = ("image", "question", "answer")


def iter_table_rows(files: list[Path]) -> Iterator[tuple[Path, int, dict]]:
    """``(file, row, record)`` of every row of hub parquet files or a ``datasets`` cache's Arrow IPC streams.

    Only :data:`TABLE_COLUMNS` are read, in batches (a large split is never decoded whole); a file without them, or
    one pyarrow cannot read, raises :class:`MedvlmError` naming it.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MedvlmError("reading the hub's parquet / arrow files needs pyarrow: pip install 'medvlm[parquet]'") from e
    for f in files:
        try:
            if f.suffix == ".parquet":
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
            else:  # the datasets library writes Arrow IPC streams
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))
                names = set(reader.schema.names)
            missing = set(TABLE_COLUMNS) - names
            if missing:
                raise MedvlmError(f"{f}: missing columns {sorted(missing)} (expected {', '.join(TABLE_COLUMNS)})")
            batches = (
                pf.iter_batches(batch_size=256, columns=list(TABLE_COLUMNS))
                if f.suffix == ".parquet"
                else (b.select(list(TABLE_COLUMNS)) for b in reader)
            )
            row = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    yield f, row, rec
                    row += 1
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a corrupt file
            raise MedvlmError(f"{f}: unreadable {f.suffix[1:]} file ({e})") from e


def table_items(files: list[Path], split: str, sink: ImageSink) -> list[VQAItem]:
    """The questions of one split's table files (``image{bytes}``, ``question``, ``answer``); images go to ``sink``."""
    items: list[VQAItem] = []
    for f, row, r in iter_table_rows(files):
        where = f"{f}: row {row}"
        img = r.get("image")
        data = img.get("bytes") if isinstance(img, dict) else None
        if not data:
            raise MedvlmError(f"{where}: field 'image.bytes' is missing or empty")
        answer = _text(r, "answer", where)
        n = len(items)
        items.append(
            VQAItem(
                id=n,
                image=sink.write(data, f"{split}_{n:06d}", where),
                question=_text(r, "question", where),
                answer=answer,
                answer_type="CLOSED" if answer.lower() in ("yes", "no") else "OPEN",
            )
        )
    return items


def _pathvqa(src: Path, out: Path) -> dict[str, list[VQAItem]]:
    sink = ImageSink(out)
    out_items: dict[str, list[VQAItem]] = {}
    for split in ("train", "validation", "test"):
        files = sorted(src.rglob(f"{split}-*.parquet"))
        if not files:
            if split == "validation":
                continue
            raise MedvlmError(f"{src}: no {split}-*.parquet files")
        out_items[split] = table_items(files, split, sink)
    return out_items


CONVERTERS = {"vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa}


def convert_vqa(
    dataset: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    closed_options: bool = False,
    overwrite: bool = False,
    reader: Callable[[Path, Path], dict[str, list[VQAItem]]] | None = None,
) -> dict[str, int]:
    """Convert a VQA dataset's public release in ``src`` to LLaVA-Med's format in ``out``.

    ``reader(src, tmp_out)`` replaces the public-release reader of ``dataset`` (the hub-parquet
    readers of :mod:`medvlm.data.benchmarks.hub` pass theirs); it returns the items per split and writes the
    images under ``tmp_out/images`` (an :class:`ImageSink`).

    Returns the question count per split (plus ``images`` and ``open_answers``). Nothing is left
    under ``out`` on failure; an existing non-empty ``out`` needs ``overwrite=True``.
    """
    if dataset not in CONVERTERS:
        raise MedvlmError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MedvlmError(f"{src}: source folder not found")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedvlmError(f"{out}: exists and is not empty (pass overwrite to replace it)")
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        splits = (reader or CONVERTERS[dataset])(src, tmp)
        for split, items in splits.items():
            write_json_atomic(tmp / f"{split}.json", [it.to_record(closed_options) for it in items])
            counts[split] = len(items)
        open_answers = sorted({it.answer for it in splits["train"] if it.answer_type == "OPEN"})
        write_json_atomic(tmp / "train_open_answers.json", {"0": open_answers}, indent=1)
        counts["images"] = sum(1 for p in (tmp / "images").rglob("*") if p.is_file())
        counts["open_answers"] = len(open_answers)
    return counts
