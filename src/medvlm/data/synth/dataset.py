"""A deterministic, asset-free synthetic biomedical dataset whose answers are decided by the pixels.

``generate_synth(out, n_images, seed, image_size)`` draws ``n_images`` small images in five
modalities (chest x-ray, CT, MRI, H&E histology, gross photograph), each with one to three big,
high-contrast lesions on the left, right or both sides, small or large, bright or dark
(:mod:`medvlm.data.synth.render`), and writes every file a LLaVA-Med-style pipeline consumes
(:mod:`medvlm.data.synth.text` writes the text):

``images/*.png``, ``alignment.json`` (captions for the ``plain`` template), ``instruct.json``
(multi-turn conversations with ``domain``), ``vqa/train.json`` / ``vqa/test.json`` (converted
VQA-RAD format, OPEN/CLOSED), ``vqa/train_open_answers.json`` (candidate answers, ``{"0": [...]}``),
``qa50.jsonl`` (chat-eval questions with reference answers), ``fig_captions.json`` (object of
lists per domain, for instruction generation), ``factors.jsonl`` (every image's ground-truth factors
and split), ``manifest.json`` and ``README.md``.

Test images (a held-out ``test_fraction``) appear only in ``vqa/test.json`` and ``qa50.jsonl``.
Every ``image`` field is relative to ``OUT/images``. Same arguments give byte-identical files.
:func:`blind_baseline` scores what a model that never looks at the image reaches.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlm.data.readers.figures import DOMAINS
from medvlm.data.synth.render import COUNTS, INTENSITIES, MODALITIES, MODALITY_DOMAIN, SIDES, SIZES, render
from medvlm.data.synth.text import (
    CHAT_KINDS,
    CLOSED_KINDS,
    DETAIL_PROMPTS,
    alignment_turns,
    caption,
    chat_answer,
    chat_question,
    closed_items_of_kinds,
    description,
    extra_closed_items,
    instruct_turns,
    mention,
    sample_item,
)
from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE
from medvlm.utils.io import atomic_dir, read_json

GENERATOR = "medvlm-synth"
GENERATOR_VERSION = "1"
"""Bumped whenever the same seed would produce different files."""


@dataclass
class SynthManifest:
    """What :func:`generate_synth` wrote (also saved as ``manifest.json``)."""

    out_dir: str
    """The dataset folder."""
    seed: int
    """Random seed; the same seed and arguments give byte-identical files."""
    n_images: int
    """Images in all."""
    n_train_images: int
    """Images used for alignment, instruct, VQA train and fig captions."""
    n_test_images: int
    """Held-out images used only by VQA test and qa50."""
    image_size: int
    """Side of the square images in pixels."""
    test_fraction: float
    """Share of images held out for testing."""
    train_extra_closed: int = 0
    """Closed questions (of kinds not asked yet) added to each train image beyond the 2 closed + 2 open."""
    train_closed_kinds: list[str] = field(default_factory=list)
    """One more closed question of each of these kinds added to each train image (after ``train_extra_closed``)."""
    files: dict[str, int] = field(default_factory=dict)
    """Records per file (relative path -> count)."""
    factor_distribution: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """``split -> factor -> value -> images``."""
    question_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    """``split -> "ANSWER_TYPE/question_type" -> questions``."""
    blind_baseline: dict[str, Any] = field(default_factory=dict)
    """:func:`blind_baseline` of ``vqa/train.json`` -> ``vqa/test.json``."""
    generator: str = GENERATOR
    generator_version: str = GENERATOR_VERSION
    image_folder: str = "images"
    """Folder (relative to ``out_dir``) that every ``image`` field is relative to."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``out_dir`` omitted so the file does not depend on where it was written)."""
        d = asdict(self)
        d.pop("out_dir")
        return d


def _check_args(out: Path, n_images: int, seed: int, image_size: int, test_fraction: float, overwrite: bool) -> int:
    if not isinstance(n_images, int) or n_images < 10:
        raise MedvlmError(f"n_images: need an integer >= 10, got {n_images!r}")
    if not isinstance(seed, int) or seed < 0:
        raise MedvlmError(f"seed: need a non-negative integer, got {seed!r}")
    if not isinstance(image_size, int) or not 48 <= image_size <= 1024:
        raise MedvlmError(f"image_size: need an integer in [48, 1024] pixels, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise MedvlmError(f"test_fraction: need a number strictly between 0 and 1, got {test_fraction!r}")
    n_test = int(round(n_images * test_fraction))
    if not 1 <= n_test < n_images:
        raise MedvlmError(f"test_fraction {test_fraction} of {n_images} images leaves an empty train or test split")
    if out.exists():
        if not out.is_dir():
            raise MedvlmError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise MedvlmError(f"{out}: directory exists and is not empty; pass --overwrite to replace it")
            manifest = out / "manifest.json"
            if not manifest.is_file() or read_json(manifest).get("generator") != GENERATOR:
                raise MedvlmError(
                    f"{out}: not a synthetic dataset made by medvlm (no {GENERATOR} manifest.json); "
                    "refusing to replace it"
                )
    return n_test


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_synth(
    out: str | os.PathLike,
    n_images: int = 2000,
    seed: int = 0,
    image_size: int = 128,
    test_fraction: float = 0.2,
    qa50_images: int = 50,
    overwrite: bool = False,
    train_extra_closed: int = 0,
    train_closed_kinds: tuple[str, ...] | list[str] = (),
) -> SynthManifest:
    """Write the synthetic dataset to ``out`` atomically (temp dir, then rename) and return its manifest.

    Every image gets 2 closed and 2 open VQA questions. ``train_extra_closed`` (0-3) more closed questions go
    to each *train* image, of the closed kinds it was not asked yet (:func:`extra_closed_items`, drawn from a
    separate random stream: images, test split and the first four questions stay identical).
    ``train_closed_kinds`` adds one closed question of each listed kind to each train image, also when the
    image was already asked about that kind (another predicate or wording of the same property: e.g.
    ``("COUNT", "POS")`` gives every train image yes/no questions about the two comparisons that are hardest
    to learn, see :mod:`medvlm.demo`).
    ``qa50_images`` test images (at most) get four chat-eval questions each (three ``conversation``,
    one ``detailed_description``), like LLaVA-Med's qa50 benchmark. ``overwrite`` replaces an
    existing dataset made by this function, never any other folder.
    """
    out = Path(out)
    n_test = _check_args(out, n_images, seed, image_size, test_fraction, overwrite)
    if not isinstance(train_extra_closed, int) or not 0 <= train_extra_closed <= 3:
        raise MedvlmError(
            f"train_extra_closed: need an integer in [0, 3] (5 closed kinds, 2 already asked), "
            f"got {train_extra_closed!r}"
        )
    if isinstance(train_closed_kinds, str):
        raise MedvlmError(
            f"train_closed_kinds: need a list of kinds, e.g. [{train_closed_kinds!r}], "
            f"not the string {train_closed_kinds!r}"
        )
    bad = [k for k in train_closed_kinds if k not in CLOSED_KINDS]
    if bad:
        raise MedvlmError(f"train_closed_kinds: unknown closed kind(s) {bad!r}; choose from {', '.join(CLOSED_KINDS)}")
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n_images)
    test_ids = {int(i) for i in order[:n_test]}

    alignment, instruct, qa50 = [], [], []
    vqa: dict[str, list[dict]] = {"train": [], "test": []}
    figs: dict[str, list[dict]] = {d: [] for d in DOMAINS}
    factors_by_split: dict[str, list] = {"train": [], "test": []}
    factor_rows: list[dict] = []
    n_qa50_images = 0
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "vqa").mkdir()
        for i in range(n_images):
            rng = np.random.default_rng([seed, i])  # per image: image i does not depend on n_images
            f, qas = sample_item(rng)
            pair_id = f"synth{i:05d}_F1"
            image = f"{pair_id}.png"
            render(f, rng, image_size).save(tmp / "images" / image, format="PNG")
            split = "test" if i in test_ids else "train"
            if split == "train" and (train_extra_closed or train_closed_kinds):
                extra_rng = np.random.default_rng([seed, i, 1])
                asked = {qa.kind for qa in qas if qa.answer_type == "CLOSED"}
                qas = qas + extra_closed_items(f, asked, train_extra_closed, extra_rng)
                qas = qas + closed_items_of_kinds(f, list(train_closed_kinds), extra_rng)
            factors_by_split[split].append(f)
            factor_rows.append(
                {
                    "image": image,
                    "split": split,
                    "modality": f.modality,
                    "count": f.count,
                    "side": f.side,
                    "size": f.size,
                    "intensity": f.intensity,
                }
            )
            cap = caption(f, rng)
            for j, qa in enumerate(qas):
                vqa[split].append(
                    {
                        "id": i * 10 + j,
                        "image": image,
                        "answer_type": qa.answer_type,
                        "question_type": qa.kind,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{qa.question}"},
                            {"from": "gpt", "value": qa.answer},
                        ],
                    }
                )
            if split == "train":
                alignment.append({"id": pair_id, "image": image, "conversations": alignment_turns(f, rng, cap)})
                instruct.append(
                    {"id": pair_id, "image": image, "domain": f.domain, "conversations": instruct_turns(f, rng)}
                )
                figs[MODALITY_DOMAIN[f.modality]].append(
                    {
                        "pair_id": pair_id,
                        "pmid": f"synth{i:05d}",
                        "fig_id": "F1",
                        "fig_label": "Figure 1",
                        "fig_caption": cap,
                        "in_text_mention": [mention(f)],
                        "domain": f.domain,
                    }
                )
            elif n_qa50_images < qa50_images:
                n_qa50_images += 1
                base = {"image": image, "pair_id": pair_id}
                extra = {
                    "fig_caption": cap,
                    "fig_label": "Figure 1",
                    "in_text_mention": [mention(f)],
                    "domain": f.domain,
                }
                for k in rng.choice(len(CHAT_KINDS), size=3, replace=False):
                    kind = CHAT_KINDS[int(k)]
                    qa50.append(
                        {
                            "question_id": len(qa50),
                            **base,
                            "text": f"{chat_question(kind, rng)}\n<image>",
                            "gpt4_answer": chat_answer(kind, f),
                            **extra,
                            "type": "conversation",
                        }
                    )
                prompt = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))]
                qa50.append(
                    {
                        "question_id": len(qa50),
                        **base,
                        "text": f"{prompt}\n<image>",
                        "gpt4_answer": description(f),
                        **extra,
                        "type": "detailed_description",
                    }
                )

        open_answers = sorted({r["conversations"][1]["value"] for r in vqa["train"] if r["answer_type"] == "OPEN"})
        _dump(tmp / "alignment.json", alignment)
        _dump(tmp / "instruct.json", instruct)
        _dump(tmp / "vqa" / "train.json", vqa["train"])
        _dump(tmp / "vqa" / "test.json", vqa["test"])
        _dump(tmp / "vqa" / "train_open_answers.json", {"0": open_answers})
        _dump(tmp / "fig_captions.json", figs)
        for name, rows in (("qa50.jsonl", qa50), ("factors.jsonl", factor_rows)):
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        manifest = SynthManifest(
            out_dir=str(out),
            seed=seed,
            n_images=n_images,
            n_train_images=n_images - n_test,
            n_test_images=n_test,
            image_size=image_size,
            test_fraction=test_fraction,
            train_extra_closed=train_extra_closed,
            train_closed_kinds=list(train_closed_kinds),
            files={
                "images": n_images,
                "alignment.json": len(alignment),
                "instruct.json": len(instruct),
                "vqa/train.json": len(vqa["train"]),
                "vqa/test.json": len(vqa["test"]),
                "vqa/train_open_answers.json": len(open_answers),
                "qa50.jsonl": len(qa50),
                "factors.jsonl": len(factor_rows),
                "fig_captions.json": sum(len(v) for v in figs.values()),
            },
            factor_distribution={s: _factor_counts(fs) for s, fs in factors_by_split.items()},
            question_kinds={
                s: dict(sorted(Counter(f"{r['answer_type']}/{r['question_type']}" for r in rows).items()))
                for s, rows in vqa.items()
            },
            blind_baseline=blind_baseline(tmp / "vqa" / "train.json", tmp / "vqa" / "test.json"),
        )
        _dump(tmp / "manifest.json", manifest.to_dict())
        (tmp / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def _factor_counts(fs: list) -> dict[str, dict[str, int]]:
    values = {"modality": MODALITIES, "count": COUNTS, "side": SIDES, "size": SIZES, "intensity": INTENSITIES}
    return {name: {str(v): sum(1 for f in fs if getattr(f, name) == v) for v in vals} for name, vals in values.items()}


def _readme(m: SynthManifest) -> str:
    b = m.blind_baseline
    return f"""# Synthetic biomedical demo dataset ({GENERATOR} v{GENERATOR_VERSION})

**{NOTICE}** These images are drawn by a program; they are not medical images and show no patient.

Made by `medvlm data synth --n-images {m.n_images} --seed {m.seed} --image-size {m.image_size} --test-fraction {m.test_fraction}`
(the same command gives byte-identical files). {m.n_train_images} train / {m.n_test_images} held-out test images of
{m.image_size}x{m.image_size} px. Test images appear only in `vqa/test.json` and `qa50.jsonl`.

Every answer is decided by the pixels: the modality (chest x-ray, CT, MRI, H&E histology, gross photograph; each
has a distinctive global look), the number of lesions (one/two/three), their side of the *image* (viewer's
left/right/both), their size (small/large) and intensity (bright/dark).

| file | content |
|---|---|
| `images/*.png` | the images; every `image` field is relative to this folder |
| `alignment.json` | one caption per train image (`id`, `image`, `conversations`), for the `plain` template |
| `instruct.json` | multi-turn conversations (2-4 QA pairs) with LLaVA-Med `domain` booleans |
| `vqa/train.json`, `vqa/test.json` | converted VQA-RAD format: `id`, `image`, `answer_type` OPEN/CLOSED, `question_type`, `conversations` |
| `vqa/train_open_answers.json` | the open answers of the train split (`{{"0": [...]}}`) |
| `qa50.jsonl` | chat-eval questions in LLaVA-Med qa50 format with reference answers (`gpt4_answer`) |
| `fig_captions.json` | figure captions and mentions, one list per domain (for instruction generation) |
| `factors.jsonl` | the ground-truth factors and split of every image (for probes and error analysis) |
| `manifest.json` | counts, seed, factor distribution, blind baseline |

Blind baseline (majority answer per question kind, learned on train, scored on test; a model that never
looks at the image reaches this): closed accuracy {b['closed']:.3f}, open recall {b['open_recall']:.3f}.
The stronger per-question-text prior reaches closed {b['by_question']['closed']:.3f}, open {b['by_question']['open_recall']:.3f}.
"""


# --- blind baseline ------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def closed_hit(pred: str, gold: str) -> float:
    """LLaVA-Med's closed rule: 1 if the lower-cased gold answer is a substring of the lower-cased prediction."""
    return float(gold.strip().lower() in pred.lower())


def open_recall(pred: str, gold: str) -> float:
    """Share of the gold answer's word tokens that occur in the prediction (LLaVA-Med's open recall)."""
    gold_t, pred_t = Counter(_tokens(gold)), Counter(_tokens(pred))
    total = sum(gold_t.values())
    return sum(min(c, pred_t[w]) for w, c in gold_t.items()) / total if total else 0.0


def _read_vqa(path: str | os.PathLike) -> list[tuple[str, str, str, str]]:
    """``(answer_type, question_type, question, answer)`` per record of a converted VQA file."""
    data = read_json(path)
    if not isinstance(data, list):
        raise MedvlmError(f"{path}: expected a JSON array of VQA records")
    rows = []
    for i, r in enumerate(data):
        conv = r.get("conversations", r.get("conversatons")) if isinstance(r, dict) else None
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
            raise MedvlmError(f"{path}: record {i}: field 'conversations' needs a question and an answer turn")
        atype = str(r.get("answer_type", "")).upper()
        if atype not in ("OPEN", "CLOSED"):
            raise MedvlmError(
                f"{path}: record {i}: field 'answer_type' must be OPEN or CLOSED, got {r.get('answer_type')!r}"
            )
        q, a = conv[0].get("value"), conv[1].get("value")
        if not isinstance(q, str) or not isinstance(a, str):
            raise MedvlmError(f"{path}: record {i}: conversation turns need a string 'value'")
        q = q.replace("<image>", "").strip().lower()
        rows.append((atype, str(r.get("question_type") or "ALL"), q, a.strip().lower()))
    return rows


def _majority(answers: list[str]) -> str:
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))  # ties broken alphabetically, for determinism


def blind_baseline(
    train_path: str | os.PathLike | list[str | os.PathLike], test_path: str | os.PathLike
) -> dict[str, Any]:
    """Score the image-blind predictor on ``test_path``: majority answer per question kind learned on ``train_path``
    (one converted-VQA file or a list of them).

    Kind = (``answer_type``, ``question_type``). Closed answers score with the substring rule, open ones
    with token recall. ``by_question`` also scores a stronger text-only prior: the majority answer per
    exact question text (falling back to the kind's majority for unseen questions).
    """
    paths = train_path if isinstance(train_path, list) else [train_path]
    train = [row for p in paths for row in _read_vqa(p)]
    test = _read_vqa(test_path)
    by_kind, by_text = defaultdict(list), defaultdict(list)
    for atype, kind, q, a in train:
        by_kind[(atype, kind)].append(a)
        by_text[(atype, q)].append(a)
    kind_major = {k: _majority(v) for k, v in by_kind.items()}
    text_major = {k: _majority(v) for k, v in by_text.items()}
    scores: dict[str, list[float]] = defaultdict(list)
    per_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    for atype, kind, q, gold in test:
        score = closed_hit if atype == "CLOSED" else open_recall
        guess = kind_major.get((atype, kind), "")
        s = score(guess, gold)
        scores[atype].append(s)
        per_kind[(atype, kind)].append(s)
        scores[f"q_{atype}"].append(score(text_major.get((atype, q), guess), gold))

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else float("nan")

    return {
        "closed": mean(scores["CLOSED"]),
        "open_recall": mean(scores["OPEN"]),
        "n_closed": len(scores["CLOSED"]),
        "n_open": len(scores["OPEN"]),
        "by_kind": {
            f"{a}/{k}": {"majority": kind_major.get((a, k), ""), "score": mean(v), "n": len(v)}
            for (a, k), v in sorted(per_kind.items())
        },
        "by_question": {"closed": mean(scores["q_CLOSED"]), "open_recall": mean(scores["q_OPEN"])},
    }


def baseline_table(baseline: dict[str, Any]) -> Any:
    """A ``rich`` table of a :func:`blind_baseline` result, for the CLI."""
    from rich.table import Table

    t = Table(title="Blind baseline (no image): majority answer per question kind, train -> test")
    for col in ("kind", "majority answer", "score", "n"):
        t.add_column(col, justify="right" if col in ("score", "n") else "left")
    for kind, row in baseline["by_kind"].items():
        t.add_row(kind, row["majority"], f"{row['score']:.3f}", str(row["n"]))
    t.add_row("CLOSED (accuracy)", "", f"{baseline['closed']:.3f}", str(baseline["n_closed"]), style="bold")
    t.add_row("OPEN (recall)", "", f"{baseline['open_recall']:.3f}", str(baseline["n_open"]), style="bold")
    t.add_row(
        "per-question prior: closed / open",
        "",
        f"{baseline['by_question']['closed']:.3f} / {baseline['by_question']['open_recall']:.3f}",
        "",
    )
    return t
