"""Read VQA-RAD / SLAKE / PathVQA as users actually have them: the public release or the Hugging Face hub copy.

Hub copies (what ``huggingface-cli download`` / ``datasets.load_dataset`` fetch):

- ``flaviagiammarino/vqa-rad``: ``data/{train,test}-*.parquet`` with columns ``image`` (struct
  ``{bytes, path}``), ``question``, ``answer`` (1,793 / 451 rows). No ``answer_type``: a question
  is CLOSED when its answer is yes/no, as LLaVA-Med's PathVQA files do. No question ids: the row
  index within the split is the id.
- ``flaviagiammarino/path-vqa``: the same schema, ``data/{train,validation,test}-*.parquet``.
- ``BoKelvin/SLAKE``: the release's JSON files (``train.json``, ``validation.json`` (``validate.json``
  in the release and old revisions), ``test.json``) with the images as ``imgs.zip``; read by
  :mod:`medvlm.data.benchmarks.convert` (which takes ``imgs/`` or ``imgs.zip``).

A source path may be the folder holding the files, a hub cache (``~/.cache/huggingface/hub``, or its
``datasets--OWNER--NAME`` folder: the snapshot ``refs/main`` points at is used), or a ``datasets``
library cache (``~/.cache/huggingface/datasets``, or its ``OWNER___NAME`` folder: the Arrow files
``NAME-SPLIT.arrow`` with the same columns). Which layout was read is recorded (``SourceInfo``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.data.benchmarks.convert import (
    VQA_RAD_IMAGE_DIRS,
    VQA_RAD_PUBLIC,
    ImageSink,
    VQAItem,
    convert_vqa,
    table_items,
)
from medvlm.errors import MedvlmError

HUB_REPOS: dict[str, str] = {
    "vqa-rad": "flaviagiammarino/vqa-rad",
    "slake": "BoKelvin/SLAKE",
    "pathvqa": "flaviagiammarino/path-vqa",
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass
class SourceInfo:
    """Where a benchmark's files were found and in which layout."""

    dataset: str
    """``vqa-rad``, ``slake`` or ``pathvqa``."""
    layout: str
    """``public`` (release files), ``hub-parquet``, ``hub-json-zip`` (SLAKE on the hub) or ``datasets-arrow``."""
    folder: Path
    """The folder holding the files (a hub snapshot when a cache was given)."""
    files: list[Path] = field(default_factory=list)
    """The files that define the questions and images (hashed into ``bench.json``)."""


def _hub_snapshot(repo_dir: Path) -> Path:
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(encoding="utf-8").strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    found = sorted(p for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise MedvlmError(f"{repo_dir}: a hub cache folder without snapshots")
    raise MedvlmError(
        f"{repo_dir}: {len(found)} snapshots and no refs/main; pass one of them as the data folder: "
        + ", ".join(str(p) for p in found)
    )


def _arrow_dir(repo_dir: Path) -> Path:
    dirs = sorted({p.parent for p in repo_dir.rglob("*.arrow")})
    if len(dirs) == 1:
        return dirs[0]
    if not dirs:
        raise MedvlmError(f"{repo_dir}: a datasets cache folder without .arrow files")
    raise MedvlmError(
        f"{repo_dir}: {len(dirs)} cached versions; pass one of them as the data folder: "
        + ", ".join(str(p) for p in dirs)
    )


def resolve_folder(dataset: str, path: str | os.PathLike) -> Path:
    """The folder holding ``dataset``'s files: ``path`` itself, or the snapshot / Arrow folder of a cache in it."""
    if dataset not in HUB_REPOS:
        raise MedvlmError(f"unknown dataset {dataset!r}; choose one of {', '.join(HUB_REPOS)}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MedvlmError(f"{path}: data folder not found")
    owner, name = HUB_REPOS[dataset].split("/")
    hub_name, ds_name = f"datasets--{owner}--{name}", f"{owner}___{name.lower()}"
    for base in (path, path / "hub"):
        if base.name == hub_name or (base / "snapshots").is_dir():
            return _hub_snapshot(base)
        if (base / hub_name).is_dir():
            return _hub_snapshot(base / hub_name)
    for base in (path, path / "datasets"):
        if base.name.lower() == ds_name:
            return _arrow_dir(base)
        if (base / ds_name).is_dir():
            return _arrow_dir(base / ds_name)
    return path


def _table_files(folder: Path, split: str) -> tuple[str, list[Path]]:
    parquet = sorted(folder.rglob(f"{split}-*.parquet"))
    if parquet:
        return "hub-parquet", parquet
    arrow = sorted({*folder.rglob(f"*-{split}.arrow"), *folder.rglob(f"*-{split}-*-of-*.arrow")})
    return ("datasets-arrow", arrow) if arrow else ("", [])


def locate(dataset: str, path: str | os.PathLike) -> SourceInfo:
    """Find ``dataset``'s files under ``path`` and name their layout (MedvlmError when none fits)."""
    folder = resolve_folder(dataset, path)
    if dataset == "slake":
        jsons = [
            folder / f
            for f in ("train.json", "validation.json", "validate.json", "test.json")
            if (folder / f).is_file()
        ]
        if (folder / "imgs").is_dir():
            imgs = sorted(p for p in (folder / "imgs").rglob("*") if p.is_file())
            return SourceInfo(dataset, "public", folder, jsons + imgs)
        if (folder / "imgs.zip").is_file():
            return SourceInfo(dataset, "hub-json-zip", folder, jsons + [folder / "imgs.zip"])
        raise MedvlmError(f"{folder}: no SLAKE files (train.json, test.json and imgs/ or imgs.zip)")
    if dataset == "vqa-rad":
        qfiles = [folder / f for f in ("trainset.json", "testset.json", VQA_RAD_PUBLIC) if (folder / f).is_file()]
        img_dir = next((folder / d for d in VQA_RAD_IMAGE_DIRS if (folder / d).is_dir()), None)
        if qfiles and img_dir is not None:
            return SourceInfo(dataset, "public", folder, qfiles + sorted(p for p in img_dir.rglob("*") if p.is_file()))
    layout, files = "", []
    for split in SPLITS:
        lay, fs = _table_files(folder, split)
        if fs:
            if layout and lay != layout:
                raise MedvlmError(f"{folder}: both parquet and arrow files; pass the folder of one of them")
            layout, files = lay, files + fs
    if not files:
        what = (
            "trainset.json + testset.json or 'VQA_RAD Dataset Public.json' with an image folder, or "
            if dataset == "vqa-rad"
            else ""
        )
        raise MedvlmError(
            f"{folder}: no {dataset} files found ({what}SPLIT-*.parquet from {HUB_REPOS[dataset]}, "
            "or a datasets cache's *-SPLIT.arrow)"
        )
    return SourceInfo(dataset, layout, folder, files)


def read_table_splits(info: SourceInfo, out: Path) -> dict[str, list[VQAItem]]:
    """Questions per split of a parquet / arrow layout (image bytes written under ``out/images``)."""
    sink = ImageSink(out)
    splits: dict[str, list[VQAItem]] = {}
    for split in SPLITS:
        _, files = _table_files(info.folder, split)
        if not files:
            if split == "validation":
                continue
            raise MedvlmError(f"{info.folder}: no {split} split ({split}-*.parquet or *-{split}.arrow)")
        splits[split] = table_items(files, split, sink)
    return splits


def convert_benchmark(
    dataset: str,
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    closed_options: bool = False,
    overwrite: bool = False,
) -> tuple[dict[str, int], SourceInfo]:
    """Convert ``dataset`` from whichever layout ``path`` holds; returns the counts and what was read."""
    info = locate(dataset, path)
    if info.layout in ("hub-parquet", "datasets-arrow"):
        counts = convert_vqa(
            dataset,
            info.folder,
            out,
            closed_options=closed_options,
            overwrite=overwrite,
            reader=lambda _src, tmp: read_table_splits(info, tmp),
        )
    else:
        counts = convert_vqa(dataset, info.folder, out, closed_options=closed_options, overwrite=overwrite)
    return counts, info
