"""medvlm ``sft`` on a model family against TRL ``SFTTrainer`` on the same Qwen2.5-VL, data, order and settings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trl_families.py [--images 24] [--steps 6] [--batch 8] \
        [--image-size 336] [--sides trl,medvlm] [--work /tmp/medvlm_bench_trl_families]

Sides (``--sides``, the first is the baseline the others are compared with): ``trl`` (TRL defaults),
``trl_fusedadamw`` (TRL with ``optim: adamw_torch_fused``, medvlm's default optimizer), ``medvlm`` (defaults),
``medvlm_fulllogits`` (``labelled_logits_only: false``). The recorded run uses all four.

Model: a transformers ``Qwen2_5_VLForConditionalGeneration`` built offline with random weights (seed 0): vision
tower hidden 384, depth 4, patch 14, merge 2; LM hidden 384, 4 layers, 6 heads / 2 KV heads, MLP 1024; the
**real Qwen2.5-VL vocabulary size, 151,936**, tied embeddings as in Qwen2.5-VL-3B. The tokenizer is medvlm's tiny
offline BPE with Qwen's special tokens (ids < 1k; the other embedding rows exist but are never the input, as
in the real checkpoints whose embedding matrix is larger than the tokenizer). The parameter count is printed.

Data: ``medvlm data synth`` at ``--image-size`` px, ``vqa/train.json``: 4 questions per image, single-turn,
one-word answers; 336 px -> 576 patches -> 144 image tokens of ~195 per sample (Qwen's default system prompt
included), ~3 learned tokens (answer + ``<|im_end|>``).

Both sides: stage ``sft`` with the LM and the merger trained fully and the vision tower frozen, fp32, batch
``--batch``, lr 2e-5, cosine schedule, no warmup, no weight decay, no gradient checkpointing, the **same batches
in the same order** (medvlm's length-grouped sampler order, written out as TRL's streamed dataset, so TRL reads
the same samples in the same order without shuffling) and the same learned tokens (the family's marked chat
template, which TRL's ``assistant_only_loss`` uses through its ``{% generation %}`` markers). Optimizer:
each side's default AdamW (medvlm ``adamw_torch_fused``, TRL ``adamw_torch``; same betas, eps, lr;
``trl_fusedadamw`` gives TRL medvlm's).

medvlm: ``run_training`` (``medvlm train``) with its defaults (labelled-positions LM head,
:mod:`medvlm.train.family_loss`); ablation ``medvlm_fulllogits``: the same with ``labelled_logits_only: false``.
TRL 1.16: ``SFTTrainer`` with ``DataCollatorForVisionLanguageModeling`` (``messages`` + ``images`` rows,
``assistant_only_loss=True``), its defaults otherwise.

Each side runs in its own subprocess. Measured: the step-1 loss (must agree within 1e-5), tokens (non-pad,
steps 2..N) per CPU-second of the process (user + sys of the process and its children, ``getrusage``) and per
wall second, peak RSS (``ru_maxrss`` and ``VmHWM`` of the process; the parent never imports torch, so fork
carries nothing over).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151_936  # Qwen2.5-VL's embedding rows
SIDES = ("trl", "trl_fusedadamw", "medvlm", "medvlm_fulllogits")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its (waited-for) children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def peak_rss() -> dict:
    """``ru_maxrss`` (MB) and ``VmHWM`` (MB) of this process."""
    hwm = next(
        int(ln.split()[1]) / 1024
        for ln in Path("/proc/self/status").read_text().splitlines()
        if ln.startswith("VmHWM:")
    )
    return {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mb": hwm}


def prepare(args) -> dict:
    """Synthetic data and the bench checkpoint (built once, saved in the family's hub layout)."""
    import torch
    import transformers as tf

    from medvlm.data.synth import generate_synth
    from medvlm.model.families import processors
    from medvlm.model.families.io import save_family
    from medvlm.model.families.processing import FamilyProcessor
    from medvlm.model.families.spec import get_family
    from medvlm.model.families.tiny import build_tiny_family

    demo = args.work / f"demo_{args.image_size}"
    if not demo.exists():
        generate_synth(
            demo, n_images=args.images + 8, seed=0, image_size=args.image_size, test_fraction=0.1, qa50_images=2
        )
    ckpt = args.work / f"qwen2_5_vl_{args.image_size}"
    spec = get_family("qwen2_5_vl")
    if not (ckpt / "config.json").is_file():
        _, tiny_proc, _ = build_tiny_family("qwen2_5_vl", seed=0)
        tok = tiny_proc.tokenizer
        image_processor = tf.Qwen2VLImageProcessorPil(
            patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=args.image_size**2
        )
        processor = getattr(processors, spec.processor_class)(
            image_processor=image_processor, tokenizer=tok, chat_template=tiny_proc.chat_template
        )
        ids = {
            name: tok.convert_tokens_to_ids(t)
            for name, t in (
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            )
        }
        text = dict(
            vocab_size=VOCAB,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 8, 8]},
        )
        vision = dict(
            depth=4,
            hidden_size=384,
            intermediate_size=1024,
            num_heads=6,
            out_hidden_size=384,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[3],
        )
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        torch.manual_seed(0)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        save_family(model, FamilyProcessor(spec, processor, spec.chat_template()), ckpt, title="bench qwen2_5_vl")
    from medvlm.model.families.io import load_family

    model, _ = load_family(ckpt)
    n = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for name, p in model.named_parameters() if name.startswith("model.visual."))
    return {"params": n, "vision_params": n_vision}


def _config(args, out: Path):
    from medvlm.train.config import load_config

    return load_config(
        None,
        dict(
            stage="sft",
            tune="full",
            model_name_or_path=str(args.work / f"qwen2_5_vl_{args.image_size}"),
            data_path=str(args.work / f"demo_{args.image_size}" / "vqa" / "train.json"),
            image_folder=str(args.work / f"demo_{args.image_size}" / "images"),
            output_dir=str(out),
            per_device_train_batch_size=args.batch,
            learning_rate=2e-5,
            max_steps=args.steps,
            lr_scheduler_type="cosine",
            warmup_ratio=0.0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            max_length=1024,
            feature_cache="off",
            seed=0,
        ),
    )


class _Timer:
    """Trainer callback: wall and CPU time at each step end."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.wall, self.cpu = [], []

            def on_step_end(self, a, state, c, **kw):
                self.wall.append(time.perf_counter())
                self.cpu.append(cpu_seconds())

        return Timer()


def side(args) -> dict:
    """Train one side (``args.side``) in this process; returns its measurements."""
    import torch

    from medvlm.model.families.io import load_family
    from medvlm.train.data import build_dataset
    from medvlm.train.sampler import ModalityLengthGroupedSampler

    torch.manual_seed(0)
    cfg = _config(args, args.work / f"run_{args.side}")
    if args.side == "medvlm_fulllogits":  # ablation: the LM head at every position, as transformers does
        cfg.labelled_logits_only = False
    model, proc = load_family(cfg.model_name_or_path)
    dataset, _ = build_dataset(cfg.sources(), proc, image_folder=cfg.image_folder, max_length=cfg.max_length)
    order = list(
        ModalityLengthGroupedSampler(dataset.lengths, args.batch, 1, cfg.seed, group=cfg.group_by_modality_length)
    )
    steps = [order[k * args.batch : (k + 1) * args.batch] for k in range(args.steps)]
    tokens = sum(abs(dataset.lengths[i]) for st in steps[1:] for i in st)  # non-pad tokens of the timed steps
    timer = _Timer()
    if args.side.startswith("medvlm"):
        from medvlm.train.run import run_training

        result = run_training(cfg, callbacks=[timer])
        history = result.log_history
    else:
        import datasets
        from PIL import Image
        from trl import SFTConfig, SFTTrainer

        from medvlm.model.families.spec import part_of

        records = json.loads(Path(cfg.data_path).read_text())

        def rows():  # the same samples in medvlm's order; TRL's own message format
            for i in order:
                r = records[i]
                q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
                yield {
                    "images": [Image.open(Path(cfg.image_folder) / r["image"]).convert("RGB")],
                    "messages": [
                        {"role": "user", "content": q.replace("<image>\n", "").replace("<image>", "")},
                        {"role": "assistant", "content": a},
                    ],
                }

        processor = proc.processor
        processor.chat_template = proc.chat_template  # the marked template: TRL finds its {% generation %} markers
        for name, p in model.named_parameters():  # the same trainable set as medvlm's sft: tower frozen, merger trained
            p.requires_grad_(part_of(proc.spec, name) != "vision_tower")
        sargs = SFTConfig(
            output_dir=str(args.work / "run_trl"),
            per_device_train_batch_size=args.batch,
            learning_rate=2e-5,
            max_steps=args.steps,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            max_length=None,
            assistant_only_loss=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
            **({"optim": "adamw_torch_fused"} if args.side == "trl_fusedadamw" else {}),
        )
        stream = datasets.IterableDataset.from_generator(rows)
        trainer = SFTTrainer(
            model=model, args=sargs, train_dataset=stream, processing_class=processor, callbacks=[timer]
        )
        trainer.train()
        history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    probe = order[:32]  # shape statistics over the first samples
    cpu = timer.cpu[-1] - timer.cpu[0]
    wall = timer.wall[-1] - timer.wall[0]
    return {
        "side": args.side,
        "first_loss": losses[0],
        "losses": losses,
        "tokens_timed": tokens,
        "timed_steps": args.steps - 1,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "tokens_per_cpu_s": tokens / cpu,
        "tokens_per_s": tokens / wall,
        "learned_tokens_per_sample": sum(int((dataset[i]["labels"] != -100).sum()) for i in probe) / len(probe),
        "image_tokens_per_sample": sum(
            int((dataset[i]["input_ids"] == model.config.image_token_id).sum()) for i in probe
        )
        / len(probe),
        "tokens_per_sample": sum(abs(n) for n in dataset.lengths) / len(dataset),
        "threads": torch.get_num_threads(),
        **peak_rss(),
    }


def run(args, what: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        what,
        "--work",
        str(args.work),
        "--images",
        str(args.images),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--image-size",
        str(args.image_size),
    ]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(line[0][7:])
    out["loadavg_before_after"] = [round(load, 1), round(os.getloadavg()[0], 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="synthetic training images (4 questions each)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per side; steps 2..N are timed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=336, help="synthetic image side (px); 336 -> 144 image tokens")
    ap.add_argument(
        "--sides",
        default="trl,medvlm",
        help=f"comma-separated, run in this order; the first is the baseline (all: {','.join(SIDES)})",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvlm_bench_trl_families"))
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        result = prepare(args) if args.side == "prepare" else side(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    info = run(args, "prepare")
    print(
        f"model: Qwen2_5_VLForConditionalGeneration, {info['params'] / 1e6:.1f}M parameters "
        f"(vision tower + merger {info['vision_params'] / 1e6:.1f}M, vocabulary {VOCAB})",
        flush=True,
    )
    results = {}
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown or len(sides) < 2:
        raise SystemExit(f"--sides: unknown {unknown} or fewer than two; choose from {', '.join(SIDES)}")
    for what in sides:
        results[what] = run(args, what)
        print(what, json.dumps(results[what]), flush=True)
    t = results[sides[0]]
    print(f"\nsummary (baseline: {sides[0]})")
    for name in sides[1:]:
        m = results[name]
        diff = abs(t["first_loss"] - m["first_loss"])
        print(
            f"{name}: step-1 loss {m['first_loss']:.7f} vs {sides[0]} {t['first_loss']:.7f}, |diff| {diff:.2e} "
            f"({'OK' if diff < 1e-5 else 'NOT within 1e-5'}); last loss {m['losses'][-1]:.6f} vs "
            f"{t['losses'][-1]:.6f}"
        )
        print(
            f"    tokens / CPU-s: {m['tokens_per_cpu_s']:.1f} vs {t['tokens_per_cpu_s']:.1f} -> "
            f"{m['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x; tokens / s (wall): {m['tokens_per_s']:.1f} vs "
            f"{t['tokens_per_s']:.1f} -> {m['tokens_per_s'] / t['tokens_per_s']:.2f}x"
        )
    for name, r in results.items():
        print(f"peak RSS {name}: ru_maxrss {r['ru_maxrss_mb']:.0f} MB, VmHWM {r['vmhwm_mb']:.0f} MB")


if __name__ == "__main__":
    main()
