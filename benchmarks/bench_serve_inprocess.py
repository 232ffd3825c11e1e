"""``bench_serve.py``'s load in process (no HTTP): where a continuous batcher's time goes, beside one at a time.

Closed loop: ``--clients`` clients each send ``--requests-per-client`` questions one after another (the same
questions, in the same order, as ``bench_serve.py``'s clients: the demo's VQA test split interleaved with its qa50
chat questions, several in a row about one image); a client's next request is added to the batcher the moment its
previous one ends, so it joins at the very next step. Prompts are encoded before the clock starts (the server does
that in its request threads). The same engine runs with ``max_batch`` = clients and with ``max_batch`` 1, in
alternating rounds (so other jobs on a shared machine load both), each with its own prefix cache kept across rounds
(as a running server keeps it) after one warm-up request.

Reported per side: requests/s, decoding steps, ms per step, mean live rows per step, seconds in admissions (cache
lookups, image-prefix and question prefills, first tokens) and in decoding steps, admission forwards. (An engine
without these counters, e.g. an older checkout on ``PYTHONPATH``, gets requests/s, steps and wall time per step.)

    .venv/bin/python benchmarks/bench_serve_inprocess.py --model DIR --questions DEMO/data/vqa/test.json \\
        --questions DEMO/data/qa50.jsonl --image-folder DEMO/data/images [--clients 8] [--requests-per-client 6] \\
        [--max-tokens 64] [--threads 1] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench_serve import question_files  # the same questions, in the same order, as the HTTP benchmark


def run(engine, max_batch: int, prompts: list[list], max_tokens: int) -> dict:
    """Serve every client's prompts (closed loop) with one batcher; returns the timings and counters."""
    from medvlm.infer.batching import BatchRequest
    from medvlm.infer.engine import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_tokens)
    b = engine.batcher(max_batch=max_batch, remember_answers=True)
    tokens: list[int] = []

    def submit(k: int, i: int) -> None:
        def done(res, k: int = k, i: int = i) -> None:
            tokens.append(res.completion_tokens)
            if i + 1 < len(prompts[k]):
                submit(k, i + 1)

        b.add(BatchRequest(prompt=prompts[k][i], settings=settings, on_done=done))

    for k in range(len(prompts)):
        submit(k, 0)
    t0 = time.perf_counter()
    b.run()
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "requests": len(tokens),
        "tokens": sum(tokens),
        "steps": b.steps,
        "rows": getattr(b, "rows_decoded", None),
        "admit_s": getattr(b, "admit_seconds", None),
        "decode_s": getattr(b, "decode_seconds", None),
        "prefills": getattr(b, "prefill_forwards", None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--questions", type=Path, action="append", required=True)
    ap.add_argument("--image-folder", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from medvlm.data.schema import Message, Sample
    from medvlm.infer.engine import InferenceEngine
    from medvlm.infer.loading import load_for_inference

    torch.set_num_threads(args.threads)
    model, proc = load_for_inference(str(args.model))
    model.eval()
    questions = question_files(args.questions)
    images: dict[str, Image.Image] = {}

    def prompt(engine, n: int):
        q, img = questions[n % len(questions)]
        if img not in images:
            images[img] = Image.open(args.image_folder / img).convert("RGB")
        sample = Sample(f"q{n}", [Message.from_text("user", "<image>\n" + q)], [img])
        return engine.prepare(sample, images=[images[img]])

    sides = {"continuous": args.clients, "one at a time": 1}
    engines = {name: InferenceEngine(model, proc, batch_size=mb) for name, mb in sides.items()}
    for name, engine in engines.items():  # warm-up, with a question no round asks
        run(engine, sides[name], [[prompt(engine, 10_000)]], 4)
    per = args.requests_per_client
    totals: dict[str, dict] = {name: {} for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        offset = r * args.clients * per  # the same questions for both sides in a round, as bench_serve.py
        for name in order:
            engine = engines[name]
            prompts = [[prompt(engine, offset + k * per + i) for i in range(per)] for k in range(args.clients)]
            res = run(engine, sides[name], prompts, args.max_tokens)
            print(f"  round {r + 1} {name}: {res['requests'] / res['wall']:.2f} req/s", flush=True)
            for key, value in res.items():
                if value is not None:
                    totals[name][key] = totals[name].get(key, 0) + value
    load = os.getloadavg()
    print(
        f"\n{args.clients} clients x {per} requests, {args.rounds} rounds, {args.threads} thread(s); load {load[0]:.1f}"
    )
    for name, t in totals.items():
        line = (
            f"{name:<14} {t['requests'] / t['wall']:7.2f} req/s  {t['requests']} requests, {t['tokens']} tokens, "
            f"{t['steps']} steps, {1000 * t.get('decode_s', t['wall']) / t['steps']:.2f} ms/step"
        )
        if "rows" in t:
            line += (
                f", {t['rows'] / t['steps']:.2f} rows/step; admissions {t['admit_s']:.2f} s "
                f"({t['prefills']} prefill forwards), decoding {t['decode_s']:.2f} s"
            )
        print(line)
    c, o = totals["continuous"], totals["one at a time"]
    print(f"throughput ratio: {(c['requests'] / c['wall']) / (o['requests'] / o['wall']):.2f}x", flush=True)


if __name__ == "__main__":
    main()
