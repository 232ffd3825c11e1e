"""Training data: a lazy dataset over the medvlm readers, weighted mixtures, and the data manifest.

Building the dataset makes one streaming pass over each file: every record is converted to a
:class:`~medvlm.data.schema.Sample`, its text is tokenised with the run's template (no image is
decoded) to get its exact length, and records that cannot be trained on are dropped and counted:
those whose ``max_length`` would cut image tokens (never silently truncated), those with no learned
token left, and (with ``skip_missing_images``) those whose image file is missing. Only byte offsets
and lengths are kept; ``__getitem__`` re-reads one record, loads its images through the processor
(the same aspect handling as inference) and returns the collate contract's feature dict.
"""

from __future__ import annotations

import hashlib
import os
import random
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageEnhance

from medvlm.data.benchmarks.group import split_merged
from medvlm.data.readers.formats import convert_record, detect_format
from medvlm.data.readers.stream import RecordFile, iter_raw_records
from medvlm.data.schema import Sample
from medvlm.data.templates import Encoded, ImageTruncationError
from medvlm.errors import MedvlmError
from medvlm.model.families.processing import FamilyProcessor
from medvlm.model.processing import MedVLMProcessor
from medvlm.train.config import DataSource
from medvlm.train.shared_image import shared_prefix_row


@dataclass
class FileReport:
    """What one data file contributed (part of the run's data manifest)."""

    path: str
    sha256: str
    format: str
    records: int
    kept: int
    weight: float
    drawn: int
    """Records drawn into one epoch after weighting (``kept`` x weight, seeded)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped records by reason: ``image_truncated``, ``no_target``, ``missing_image``."""


@dataclass
class DataManifest:
    """The training set of a run: files, hashes, counts (saved as ``data_manifest.json``)."""

    files: list[FileReport]
    samples: int
    image_samples: int
    text_samples: int
    max_length: int
    template: str
    image_folder: str | None

    def dropped_total(self) -> dict[str, int]:
        """Dropped records by reason over all files."""
        out: dict[str, int] = {}
        for f in self.files:
            for k, v in f.dropped.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = self.dropped_total()
        return d


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_image(rel: str, image_folder: str | None) -> Path:
    """Absolute path of a sample image (relative paths resolve against ``image_folder``)."""
    p = Path(rel)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p


def text_encode(
    sample: Sample, processor: MedVLMProcessor | FamilyProcessor, max_length: int, image_folder: str | None = None
) -> Encoded:
    """Tokenise a sample's conversation exactly as ``processor.encode`` does, without decoding images.

    A model family's image token count depends on each image's size, which its processor reads from
    the image file headers (hence ``image_folder``); the native model's count is fixed.
    """
    if isinstance(processor, FamilyProcessor):
        return processor.encode_text(sample, max_length=max_length, image_folder=image_folder)
    return processor.encode_text(sample, max_length=max_length)


def isolated_row(
    singles: list[Sample], processor: MedVLMProcessor, max_length: int, where: str
) -> dict[str, list[int]]:
    """One image's single-question samples as one shared-image row (:func:`shared_prefix_row`); each question is
    encoded as it would be alone, so ``max_length`` bounds each question, not the row."""
    encoded = [text_encode(s, processor, max_length) for s in singles]
    return shared_prefix_row(encoded, processor.image_token_id, where)


class SupervisedDataset(torch.utils.data.Dataset):
    """Lazy random access to the kept records of a mixture; items are feature dicts for the collator.

    ``lengths[i]`` is the exact token length of item ``i``, positive for samples with images and
    negative for text-only ones (the modality-grouped sampler's convention).
    """

    def __init__(
        self,
        files: list[RecordFile],
        formats: list[str],
        items: list[tuple[int, int]],
        lengths: list[int],
        processor: MedVLMProcessor,
        image_folder: str | None,
        max_length: int,
    ):
        self.files = files
        self.formats = formats
        self._file_of = array("i", (f for f, _ in items))
        self._rec_of = array("q", (r for _, r in items))
        self.lengths = lengths
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length
        self.feature_cache = None  # set by the trainer when the frozen-tower cache is on
        # (shift, jitter) when image_augment is on (set by the recipe): every read draws a new shift / jitter
        self.augment: tuple[float, float] | None = None
        self.isolate_questions = False
        """Set by the recipe (``isolate_questions``): a merged record becomes one shared-image row."""

    def __len__(self) -> int:
        return len(self._file_of)

    def sample(self, i: int) -> Sample:
        """The :class:`Sample` behind item ``i``."""
        f, r = self._file_of[i], self._rec_of[i]
        rf = self.files[f]
        return convert_record(self.formats[f], rf[r], r, f"{rf.path} record {r}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.sample(i)
        if not self.isolate_questions:
            return self._features(sample)
        # one image, several questions: one row, each question attending to the image and itself (shared_image)
        singles = split_merged(sample)
        feats = self._features(singles[0])
        if len(singles) > 1:
            where = f"{self.files[self._file_of[i]].path} record {self._rec_of[i]}"
            row = isolated_row(singles, self.processor, self.max_length, where)
            feats.update({k: torch.tensor(v, dtype=torch.long) for k, v in row.items()})
        else:
            n = int(feats["input_ids"].shape[0])
            feats.update(segment_ids=torch.zeros(n, dtype=torch.long), position_ids=torch.arange(n))
        return feats

    def _features(self, sample: Sample) -> dict[str, Any]:
        images = None
        cached = None
        keys: list[str] = []
        if sample.images:
            paths = [resolve_image(p, self.image_folder) for p in sample.images]
            if self.feature_cache is not None:
                keys = [self.feature_cache.image_key(p) for p in paths]
                cached = self.feature_cache.get_many(keys)
            if cached is not None:
                images = []  # features come from the cache: skip decoding the images
        if cached is not None:
            enc = text_encode(sample, self.processor, self.max_length)
            return {
                "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                "pixel_values": None,
                "vision_features": cached,  # [n_img, L, D]
            }
        if self.augment and sample.images and images is None:
            images = [augment_image(im, *self.augment) for im in self.processor.load_images(sample, self.image_folder)]
        feats = self.processor.encode(sample, image_folder=self.image_folder, max_length=self.max_length, images=images)
        if keys:
            feats["image_keys"] = keys
        return feats


def augment_image(img: Image.Image, shift: float, jitter: float) -> Image.Image:
    """A random small shift (up to ``shift`` of each side; the uncovered border takes the corner pixel's colour) and
    brightness / contrast jitter (up to ``jitter``, relative), drawn from torch's RNG (seeded by the trainer).

    Label-preserving for VQA: nothing is flipped, rotated, cropped away or rescaled, so left stays left, counts,
    sizes and colours hold (the content stays inside the image for lesions not touching its border).
    """
    r = torch.rand(4).tolist()
    w, h = img.size
    dx, dy = round((2 * r[0] - 1) * shift * w), round((2 * r[1] - 1) * shift * h)
    rgb = img.convert("RGB")
    out = rgb.transform(rgb.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=rgb.getpixel((0, 0)))
    out = ImageEnhance.Brightness(out).enhance(1 + (2 * r[2] - 1) * jitter)
    return ImageEnhance.Contrast(out).enhance(1 + (2 * r[3] - 1) * jitter)


def _draw(n: int, weight: float, rng: random.Random) -> list[int]:
    """Indices ``0..n-1`` repeated ``int(weight)`` times plus a seeded ``frac(weight)`` share, shuffled later."""
    whole, frac = int(weight), weight - int(weight)
    out = list(range(n)) * whole
    extra = round(n * frac)
    if extra:
        out.extend(sorted(rng.sample(range(n), extra)))
    return out


def build_dataset(
    sources: list[DataSource],
    processor: MedVLMProcessor | FamilyProcessor,
    *,
    image_folder: str | None,
    max_length: int,
    data_format: str = "auto",
    skip_missing_images: bool = False,
    seed: int = 42,
    isolate_questions: bool = False,
) -> tuple[SupervisedDataset, DataManifest]:
    """Index, check and mix the data files; raise a MedvlmError before any training on bad input.

    With ``isolate_questions`` each record's length is that of its shared-image row (:func:`isolated_row`)."""
    if image_folder is not None and not Path(image_folder).is_dir():
        raise MedvlmError(f"image_folder {image_folder}: folder not found")
    rng = random.Random(seed)
    files: list[RecordFile] = []
    formats: list[str] = []
    reports: list[FileReport] = []
    items: list[tuple[int, int]] = []
    lengths: list[int] = []
    n_img = n_txt = 0
    for fi, src in enumerate(sources):
        path = Path(src.path)
        if not path.is_file():
            raise MedvlmError(f"data_path {path}: file not found")
        spans: list[tuple[int, int]] = []
        kept_len: list[int] = []
        dropped = {"image_truncated": 0, "no_target": 0, "missing_image": 0}
        fmt = None if data_format == "auto" else data_format
        n_records = 0
        missing_examples: list[str] = []
        for rec in iter_raw_records(path):
            n_records += 1
            where = f"{path} record {rec.index}"
            if fmt is None:
                fmt = detect_format(rec.value, where)
            sample = convert_record(fmt, rec.value, rec.index, where)
            if sample.images:
                if image_folder is None and not all(Path(p).is_absolute() for p in sample.images):
                    raise MedvlmError(f"{where}: the sample has images ({sample.images[0]}) but no image_folder is set")
                absent = [p for p in sample.images if not resolve_image(p, image_folder).is_file()]
                if absent:
                    dropped["missing_image"] += 1
                    if len(missing_examples) < 3:
                        missing_examples.append(f"{where}: {resolve_image(absent[0], image_folder)}")
                    continue
            try:
                singles = split_merged(sample) if isolate_questions else [sample]
                if len(singles) > 1:  # max_length bounds each question, not the merged conversation
                    row = isolated_row(singles, processor, max_length, where)  # type: ignore[arg-type]
                    enc = Encoded(row["input_ids"], row["labels"], sample.num_image_parts)
                else:
                    enc = text_encode(sample, processor, max_length, image_folder)
            except ImageTruncationError:
                dropped["image_truncated"] += 1
                continue
            if all(label == -100 for label in enc.labels):
                dropped["no_target"] += 1
                continue
            spans.append((rec.offset, rec.length))
            kept_len.append(len(enc.input_ids) if sample.images else -len(enc.input_ids))
        if dropped["missing_image"] and not skip_missing_images:
            raise MedvlmError(
                f"data_path {path}: {dropped['missing_image']} record(s) name an image file that does not exist "
                f"(first: {'; '.join(missing_examples)}); fix image_folder, or set skip_missing_images: true"
            )
        if not spans:
            raise MedvlmError(f"data_path {path}: no trainable record among {n_records} (dropped: {dropped})")
        files.append(RecordFile(path, index=spans))
        formats.append(fmt or "llava")
        drawn = _draw(len(spans), src.weight, rng)
        for r in drawn:
            items.append((fi, r))
            lengths.append(kept_len[r])
            if kept_len[r] > 0:
                n_img += 1
            else:
                n_txt += 1
        reports.append(
            FileReport(
                str(path),
                file_sha256(path),
                fmt or "",
                n_records,
                len(spans),
                src.weight,
                len(drawn),
                {k: v for k, v in dropped.items() if v},
            )
        )
    dataset = SupervisedDataset(files, formats, items, lengths, processor, image_folder, max_length)
    dataset.isolate_questions = isolate_questions
    manifest = DataManifest(reports, len(items), n_img, n_txt, max_length, processor.template, image_folder)
    return dataset, manifest


def grouped_sources(cfg: Any) -> list[DataSource]:
    """``cfg.sources()``, each file's single-question samples merged per image when ``cfg.group_by_image`` is on.

    Only stages ``align``/``sft`` with ``data_format: auto`` (the merged file is LLaVA JSON). A file where no image
    has two questions is used as it is; otherwise the merged conversations are written (atomically) to
    ``output_dir/grouped/<index>_<name>.json`` and that file is trained on.
    """
    from medvlm.data.benchmarks.group import GroupStats, group_by_image
    from medvlm.data.readers import read_samples, sample_to_llava
    from medvlm.utils.artifacts import GROUPED_DIR
    from medvlm.utils.io import write_json_atomic

    sources = cfg.sources()
    if not cfg.group_by_image or cfg.stage not in ("align", "sft"):
        return sources
    if cfg.data_format != "auto":
        raise MedvlmError(
            f"group_by_image: true writes LLaVA JSON, so it needs data_format: auto (got "
            f"{cfg.data_format!r}); set group_by_image: false"
        )
    out: list[DataSource] = []
    for i, src in enumerate(sources):
        path = Path(src.path)
        if not path.is_file():
            raise MedvlmError(f"data_path {path}: file not found")
        stats = GroupStats()
        grouped = group_by_image(
            list(read_samples(path)), seed=cfg.seed, stats=stats, yes_no_last=bool(cfg.group_yes_no_last)
        )
        if stats.conversations == stats.merged:  # no image had two questions: nothing merged
            out.append(src)
            continue
        dest = Path(cfg.output_dir) / GROUPED_DIR / f"{i}_{path.stem}.json"
        write_json_atomic(dest, [sample_to_llava(s) for s in grouped], indent=None)
        out.append(DataSource(str(dest), src.weight))
    return out
