"""Tiny VQA-RAD / SLAKE / PathVQA fixtures in every layout users have: public releases, hub files, HF caches.

Hub schemas (dataset cards / repo trees): flaviagiammarino/vqa-rad and flaviagiammarino/path-vqa are
parquet files ``data/SPLIT-0000K-of-0000N.parquet`` with ``image`` (struct ``{bytes: binary, path:
string}``), ``question`` (string), ``answer`` (string); BoKelvin/SLAKE ships the release's JSON files
(``train.json``, ``validation.json``, ``test.json``) and ``imgs.zip`` (members ``imgs/xmlabN/source.jpg``).
The same questions and image bytes are written in each layout, so every reader must agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

from PIL import Image

# (image key, question, answer, answer_type, question_type, modality) per split; CLOSED answers are yes/no
# so the hub parquet's derived answer types equal the release's.
RAD = {
    "train": [
        (0, "Is there a mass?", "yes", "CLOSED", "PRES", None),
        (1, "Where is the lesion?", "left lung", "OPEN", "POS", None),
        (2, "What organ is shown?", "lung", "OPEN", "ORGAN", None),
        (1, "Is this normal?", "no", "CLOSED", "ABN", None),
    ],
    "test": [
        (3, "Is there an effusion?", "yes", "CLOSED", "PRES", None),
        (4, "What modality is this?", "ct", "OPEN", "MODALITY", None),
        (3, "Is the heart enlarged?", "no", "CLOSED", "SIZE", None),
        (5, "Which side is abnormal?", "right", "OPEN", "POS", None),
        (4, "Is there a fracture?", "no", "CLOSED", "ABN", None),
        (5, "What is abnormal?", "pneumothorax", "OPEN", "ABN", None),
    ],
}
SLAKE = {
    "train": [
        (0, "Which organ is abnormal?", "Lung", "OPEN", "Organ", "CT"),
        (1, "Is this a CT?", "Yes", "CLOSED", "Modality", "CT"),
        (2, "What is the largest organ?", "Liver", "OPEN", "Size", "MRI"),
    ],
    "validation": [(1, "Does it look normal?", "No", "CLOSED", "Abnormality", "CT")],
    "test": [
        (3, "Is the lung healthy?", "No", "CLOSED", "Abnormality", "X-Ray"),
        (4, "What modality is used?", "MRI", "OPEN", "Modality", "MRI"),
        (3, "Where is the lesion?", "Left Lung", "OPEN", "Position", "X-Ray"),
        (5, "Is there a nodule?", "Yes", "CLOSED", "Abnormality", "CT"),
        (4, "Which plane is this?", "Transverse", "OPEN", "Plane", "MRI"),
        (5, "Is this the abdomen?", "No", "CLOSED", "Organ", "CT"),
    ],
}
PATH = {
    "train": [
        (0, "Is this tissue inflamed?", "yes", None, None, None),
        (1, "What is present?", "fibrosis", None, None, None),
        (2, "What stain is used?", "h&e", None, None, None),
    ],
    "validation": [(0, "Is it benign?", "no", None, None, None)],
    "test": [
        (3, "Are the cells atypical?", "yes", None, None, None),
        (4, "What does this show?", "necrosis", None, None, None),
        (3, "Is there a granuloma?", "no", None, None, None),
        (5, "What type of tissue is this?", "liver", None, None, None),
        (4, "Is this malignant?", "no", None, None, None),
        (5, "What is seen?", "steatosis", None, None, None),
    ],
}
COLORS = [(220, 30, 30), (30, 200, 40), (40, 50, 210), (230, 220, 20), (20, 210, 220), (200, 30, 200)]


def jpeg(key: int, size: int = 24) -> bytes:
    """JPEG bytes of image ``key`` (a colour square with a stripe, so images differ)."""
    im = Image.new("RGB", (size, size), COLORS[key % len(COLORS)])
    for x in range(size):
        im.putpixel((x, (key * 3) % size), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _table(rows: list[tuple]) -> object:
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "image": pa.array([{"bytes": jpeg(r[0]), "path": None} for r in rows], type=image_type),
            "question": pa.array([r[1] for r in rows], type=pa.string()),
            "answer": pa.array([r[2] for r in rows], type=pa.string()),
        }
    )


def write_hub_parquet(root: Path, data: dict[str, list[tuple]]) -> Path:
    """The hub repo files of flaviagiammarino/vqa-rad or path-vqa (train split in two shards)."""
    import pyarrow.parquet as pq

    for split, rows in data.items():
        shards = [rows[:2], rows[2:]] if split == "train" else [rows]
        for k, part in enumerate(shards):
            # as on the hub: data/train-00000-of-00002-<16 hex>.parquet
            tag = hashlib.sha256(f"{split}{k}".encode()).hexdigest()[:16]
            path = root / "data" / f"{split}-{k:05d}-of-{len(shards):05d}-{tag}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_table(part), path)
    (root / "README.md").write_text("---\nlicense: cc0-1.0\n---\n", encoding="utf-8")
    return root


def write_datasets_arrow(cache: Path, repo_id: str, data: dict[str, list[tuple]]) -> Path:
    """``datasets``' processed cache: ``OWNER___NAME/default/0.0.0/HASH/NAME-SPLIT.arrow`` (Arrow IPC streams)."""
    import pyarrow as pa

    owner, name = repo_id.split("/")
    folder = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    for split, rows in data.items():
        table = _table(rows)
        with pa.OSFile(str(folder / f"{name}-{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    return cache


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """huggingface_hub's cache: ``datasets--OWNER--NAME/{blobs,snapshots/REV,refs/main}`` with symlinked files."""
    owner, name = repo_id.split("/")
    repo = cache / f"datasets--{owner}--{name}"
    rev = "a" * 40
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev, encoding="utf-8")
    return cache


def write_rad_public(root: Path) -> Path:
    """The VQA-RAD release with the paper's split (trainset.json / testset.json) and its image folder."""
    qid = 100
    for split, rows in RAD.items():
        recs = []
        for key, q, a, at, qt, _ in rows:
            name = f"synpic{key}.jpg"
            (root / "VQA_RAD Image Folder").mkdir(parents=True, exist_ok=True)
            (root / "VQA_RAD Image Folder" / name).write_bytes(jpeg(key))
            recs.append(
                {
                    "qid": qid,
                    "image_name": name,
                    "question": q,
                    "answer": a,
                    "answer_type": at,
                    "question_type": qt,
                    "phrase_type": "freeform",
                    "image_organ": "CHEST",
                }
            )
            qid += 1
        (root / f"{split}set.json").write_text(json.dumps(recs), encoding="utf-8")
    return root


def _slake_records(split: str, start: int) -> list[dict]:
    recs = []
    for i, (key, q, a, at, ct, mod) in enumerate(SLAKE[split]):
        recs.append(
            {
                "img_id": key,
                "img_name": f"xmlab{key}/source.jpg",
                "question": q,
                "answer": a,
                "q_lang": "en",
                "location": "Chest",
                "modality": mod,
                "answer_type": at,
                "base_type": "vqa",
                "content_type": ct,
                "triple": ["vhead", "_", "_"],
                "qid": start + i,
            }
        )
    if split == "test":  # a Chinese question: LLaVA-Med (and medvlm) evaluate the English ones only
        recs.append(
            {
                "img_id": 3,
                "img_name": "xmlab3/source.jpg",
                "question": "这是什么器官?",
                "answer": "肺",
                "q_lang": "zh",
                "location": "Chest",
                "modality": "X-Ray",
                "answer_type": "OPEN",
                "base_type": "vqa",
                "content_type": "Organ",
                "triple": ["vhead", "_", "_"],
                "qid": 9999,
            }
        )
    return recs


def write_slake(root: Path, hub: bool) -> Path:
    """SLAKE as released (``imgs/``, ``validate.json``) or as on the hub (``imgs.zip``, ``validation.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for split in ("train", "validation", "test"):
        name = f"{split}.json" if split != "validation" else ("validation.json" if hub else "validate.json")
        (root / name).write_text(json.dumps(_slake_records(split, start)), encoding="utf-8")
        start += 100
    keys = sorted({r[0] for rows in SLAKE.values() for r in rows})
    if hub:
        with zipfile.ZipFile(root / "imgs.zip", "w") as z:
            for k in keys:
                z.writestr(f"imgs/xmlab{k}/source.jpg", jpeg(k))
                z.writestr(f"imgs/xmlab{k}/mask.png", b"not read")
    else:
        for k in keys:
            (root / "imgs" / f"xmlab{k}").mkdir(parents=True, exist_ok=True)
            (root / "imgs" / f"xmlab{k}" / "source.jpg").write_bytes(jpeg(k))
    return root


def write_all(root: Path) -> dict[str, Path]:
    """One folder per task (``ROOT/vqa-rad``, ``ROOT/slake``, ``ROOT/pathvqa``) in hub layouts."""
    return {
        "vqa-rad": write_hub_parquet(root / "vqa-rad", {k: v for k, v in RAD.items()}),
        "slake": write_slake(root / "slake", hub=True),
        "pathvqa": write_hub_parquet(root / "pathvqa", PATH),
    }


def tiny_model(root: Path) -> Path:
    """A random tiny medvlm model whose answers depend on the image and question (as tests/test_eval_vqa.py)."""
    import torch

    from medvlm.model.build import build_preset, save_checkpoint

    model, processor = build_preset("tiny", seed=7)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return save_checkpoint(model, processor, root / "tiny-model")
