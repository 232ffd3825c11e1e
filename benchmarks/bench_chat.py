"""Benchmark a 10-turn chat about one image (``medvlm chat``'s :class:`~medvlm.serve.chat.ChatSession`).

Every turn re-sends the whole history with its image. With the engine's prefix cache the finished
conversation of each turn is kept, so a turn computes only its new tokens; without it (budget 0) every
turn prefills the image and the whole history again. Both sessions run in the same process, turn by
turn alternately (side by side), greedy, on the ``smol`` preset (SmolLM2-135M, 196 image tokens).
The answers of the two sessions are checked to be identical.

    .venv/bin/python benchmarks/bench_chat.py [--turns 10] [--max-new-tokens 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

TURNS = [
    "What kind of image is this?",
    "Which organ is shown?",
    "Is there anything abnormal?",
    "Where exactly is it located?",
    "How large is it compared with the surrounding structures?",
    "Could it be an artefact of the acquisition?",
    "What would you check next?",
    "Is the other side normal?",
    "Summarise the findings in one sentence.",
    "Thank you. Anything else to add?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from PIL import Image, ImageDraw

    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.model.build import build_preset
    from medvlm.serve.chat import ChatSession

    torch.set_num_threads(args.threads)
    model, processor = build_preset("smol")
    model.eval()
    image = Image.new("RGB", (256, 256), (20, 20, 30))
    ImageDraw.Draw(image).ellipse([90, 80, 170, 160], fill=(200, 180, 160))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    sessions = {
        "prefix cache": ChatSession(InferenceEngine(model, processor), settings, [image]),
        "no cache": ChatSession(InferenceEngine(model, processor, prefix_cache_bytes=0), settings, [image]),
    }
    sessions["no cache"].ask("warm-up")  # allocations, lazy inits
    sessions["no cache"].reset()
    times: dict[str, list[float]] = {k: [] for k in sessions}
    answers: dict[str, list[str]] = {k: [] for k in sessions}
    for t in range(args.turns):
        order = list(sessions) if t % 2 == 0 else list(reversed(sessions))
        for name in order:
            t0 = time.perf_counter()
            answers[name].append(sessions[name].ask(TURNS[t % len(TURNS)]))
            times[name].append(time.perf_counter() - t0)
    print(
        f"{args.turns}-turn chat about one image, smol preset (196 image tokens), max_new_tokens "
        f"{args.max_new_tokens}, {args.threads} threads, greedy; sessions alternate turn by turn"
    )
    print(f"{'turn':>5}{'prefix cache s':>16}{'no cache s':>12}")
    for t in range(args.turns):
        print(f"{t + 1:>5}{times['prefix cache'][t]:>16.2f}{times['no cache'][t]:>12.2f}")
    for name in sessions:
        print(
            f"{name}: turn {args.turns} / turn 1 latency = {times[name][-1] / times[name][0]:.2f}x, "
            f"total {sum(times[name]):.1f} s"
        )
    info = sessions["prefix cache"].engine.prefix_cache.info()
    print(
        f"prefix cache: {info['hits']} hits, {info['misses']} misses, {info['hit_tokens']} prompt tokens reused, "
        f"{info['bytes'] / 2**20:.1f} MiB held; process peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    same = answers["prefix cache"] == answers["no cache"]
    print(f"identical answers with and without the cache: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
