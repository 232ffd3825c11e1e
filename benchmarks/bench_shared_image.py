"""VQA fine-tuning with several questions per image: one sample per question against one shared-image row per image
(``isolate_questions``), side by side on the same model, data and number of questions per step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_shared_image.py [--images 96] [--epochs 1] \
        [--work /tmp/medvlm_bench_shared_image] [--out results.json]

Model: bench_train.py's ``sft`` model (CLIP tower 224 px / patch 16 = 196 image tokens, hidden 512 x 8 layers; Llama
hidden 512 x 6 layers with SmolLM2's real 49,152-token vocabulary; ~97M parameters), tower frozen as in LLaVA-Med's
stage 2 (projector and LM train), feature cache off, fp32. The realistic shape: a long image prompt, short questions
and answers of one to three words (``medvlm data synth``'s VQA split, 4 questions per image; VQA-RAD has ~11 per image,
SLAKE ~20, PathVQA ~6).

Variants, each in its own process (peak RSS = that process's ``VmHWM``):

- ``single``: ``group_by_image: false``, 8 questions per step (LLaVA-Med's VQA fine-tune);
- ``shared``: ``group_by_image: true, isolate_questions: true``, 2 images per step, i.e. the same 8 questions per
  step on average.

Both train every question once per epoch with the same per-question loss (each answer's logits are those of its
single-question sample: ``tests/test_train_shared_image.py``). Reported: wall and CPU seconds per epoch and per
question, optimizer steps, peak RSS, the mean logged loss, and the ratios shared / single.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import bench_config, build_bench_model, peak_rss_mb  # noqa: E402

VARIANTS = {
    "single": {"group_by_image": False, "per_device_train_batch_size": 8},
    "shared": {"group_by_image": True, "isolate_questions": True, "per_device_train_batch_size": 2},
}


def run_variant(args) -> dict:
    """Train one variant in this process; return its measurements."""
    from transformers import TrainerCallback

    from medvlm.train.run import run_training

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_epoch_begin(self, a, state, c, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_epoch_end(self, a, state, c, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

    cfg = bench_config(
        str(args.work / "model_sft"),
        str(args.work / args.variant),
        "sft",
        str(args.work / "demo" / "vqa" / "train.json"),
        str(args.work / "demo" / "images"),
        args.epochs,
        tune_vision_tower=False,
        seed=0,
        **VARIANTS[args.variant],
    )
    timer = EpochTimer()
    r = run_training(cfg, callbacks=[timer])
    walls = [timer.marks[i + 1][0] - timer.marks[i][0] for i in range(0, len(timer.marks) - 1, 2)]
    cpus = [timer.marks[i + 1][1] - timer.marks[i][1] for i in range(0, len(timer.marks) - 1, 2)]
    losses = [h["loss"] for h in r.log_history if "loss" in h]
    return {
        "variant": args.variant,
        "epoch_seconds": walls,
        "epoch_cpu_seconds": cpus,
        "steps": int(r.steps),
        "mean_loss": sum(losses) / len(losses) if losses else r.final_loss,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96, help="training images (4 questions each)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvlm_bench_shared_image"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    from medvlm.data.synth import generate_synth

    args.work.mkdir(parents=True, exist_ok=True)
    build_bench_model(args.work, "sft")
    demo = args.work / "demo"
    if not demo.exists():
        generate_synth(demo, n_images=args.images, seed=0, image_size=224, qa50_images=2)
    questions = len(json.loads((demo / "vqa" / "train.json").read_text()))
    results = {"questions": questions, "threads": os.environ.get("OMP_NUM_THREADS"), "variants": {}}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--work", str(args.work), "--epochs", str(args.epochs)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        res["seconds_per_question"] = sum(res["epoch_seconds"]) / (questions * args.epochs)
        res["cpu_seconds_per_question"] = sum(res["epoch_cpu_seconds"]) / (questions * args.epochs)
        results["variants"][name] = res
        print(json.dumps(res), flush=True)
    single, shared = results["variants"]["single"], results["variants"]["shared"]
    results["ratios_shared_over_single"] = {
        "wall": shared["seconds_per_question"] / single["seconds_per_question"],
        "cpu": shared["cpu_seconds_per_question"] / single["cpu_seconds_per_question"],
        "peak_rss": shared["peak_rss_mb"] / single["peak_rss_mb"],
    }
    print(json.dumps(results["ratios_shared_over_single"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
