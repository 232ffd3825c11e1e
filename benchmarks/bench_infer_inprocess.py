"""A quick side-by-side check of ``bench_infer.py``'s comparison in one process (1 thread), image by image.

For each image: the per-question loop (LLaVA-Med's ``model_vqa``, ``bench_infer.per_question``) answers the
first ``--baseline-per-image`` of its 11 questions, then the engine answers all 11 (prefix reuse, continuous
batching); the two alternate, so load from other jobs falls on both. Reports seconds per question of each,
the speed-up, whether the shared answers are identical, and the process's peak RSS (both methods share the
process). ``smol`` preset (SmolLM2-135M, 196 image tokens), 8 new tokens, greedy.

    .venv/bin/python benchmarks/bench_infer_inprocess.py [--images 2] [--baseline-per-image 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import QUESTIONS, per_question  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--baseline-per-image", type=int, default=2)
    args = ap.parse_args()

    import torch
    from PIL import Image, ImageDraw

    from medvlm.data.schema import Message, Sample
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.model.build import build_preset

    torch.set_num_threads(1)
    model, proc = build_preset("smol")
    model.eval()
    engine = InferenceEngine(model, proc, batch_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = []
        for k in range(args.images + 1):
            im = Image.new("RGB", (256, 256), (20 + 30 * k % 200, 20, 30))
            ImageDraw.Draw(im).ellipse([60 + 20 * k % 80, 80, 170, 160], fill=(200, 180, 160))
            im.save(folder / f"q{k}.png")
            names.append(f"q{k}.png")

        def sample(k: int, i: int) -> Sample:
            q = QUESTIONS[(i + 3 * k) % len(QUESTIONS)]
            return Sample(f"{k}-{i}", [Message.from_text("user", "<image>\n" + q)], [names[k]])

        warm = sample(args.images, 0)  # the spare image: warm-up only
        per_question(model, proc, [warm], 2, folder)
        engine.generate([warm], GenerationSettings(max_new_tokens=2), image_folder=folder)
        engine.prefix_cache.clear()
        settings = GenerationSettings(max_new_tokens=8)
        tb = te = 0.0
        nb = ne = same = 0
        for k in range(args.images):
            qs = [sample(k, i) for i in range(11)]
            t = time.perf_counter()
            base = per_question(model, proc, qs[: args.baseline_per_image], 8, folder)
            tb += time.perf_counter() - t
            t = time.perf_counter()
            answers = engine.generate(qs, settings, image_folder=folder)
            te += time.perf_counter() - t
            nb, ne = nb + len(base), ne + len(qs)
            same += sum(a == b for a, b in zip(base, answers))
            print(f"image {k + 1}: per-question {tb:.1f} s / {nb} q, engine {te:.1f} s / {ne} q", flush=True)
    print(
        f"per-question: {tb / nb:.2f} s/question; engine: {te / ne:.2f} s/question; speed-up "
        f"{(tb / nb) / (te / ne):.2f}x; identical {same}/{nb}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if same != nb:
        sys.exit(1)


if __name__ == "__main__":
    main()
