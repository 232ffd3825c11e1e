"""Training benchmarks: (a) stage-2 tokens/s, medvlm vs TRL SFTTrainer; (b) stage-1 epochs 2+ with vs without
the frozen-tower feature cache; (c) peak RSS of each run.

    .venv/bin/python benchmarks/bench_train.py [--samples 512] [--epochs 2] [--work /tmp/medvlm_bench_train]

Bench model (random weights, built offline and composed with ``medvlm.model.build.compose``): a CLIP
tower (224 px, patch 16, 196 patches, hidden 512, 8 layers) + a Llama LM (hidden 512, 8 layers) +
mlp2x_gelu projector, ~55M parameters. Data: the synthetic demo set (``generate_synth``). Every
variant runs in its own process (peak RSS = that process's ``ru_maxrss``), one after the other.

(a) compares, on the same model, encoded samples, collator and settings (fp32, batch 8, lr 2e-5, no
gradient checkpointing, tower frozen), medvlm's ``run_training`` (``stage: sft``, ``tune: full``, its defaults:
length-grouped batches, fused AdamW; plus ``packing: true`` and ``optim: adamw_torch`` ablations) against TRL's
``SFTTrainer`` with its defaults on an equivalent transformers Llava with the same weights, over the synthetic
instruction conversations (variable lengths). ``--sft-steps`` steps per variant; steps 2..N are timed in wall
and CPU seconds. Achieved FLOP/s uses 6 x LM/projector params x non-pad tokens + 2 x tower params x patches per
sample, against torch's fp32 dense matmul rate measured in the same process.
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


def build_bench_model(work: Path) -> Path:
    """Compose and save the bench model once; returns its checkpoint folder."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medvlm.model.build import compose, save_checkpoint
    from medvlm.model.tokenizer import build_tiny_tokenizer

    ckpt = work / "bench_model"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=512, intermediate_size=2048,
                                             num_hidden_layers=8, num_attention_heads=8))
    tower.save_pretrained(work / "tower")
    tok = build_tiny_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    lm.save_pretrained(work / "lm")
    tok.save_pretrained(work / "lm")
    model, processor = compose(work / "tower", work / "lm", projector="mlp2x_gelu", template="vicuna_v1", aspect="pad")
    save_checkpoint(model, processor, ckpt)
    return ckpt


def to_hf_llava(model):
    """The same weights as a transformers ``LlavaForConditionalGeneration`` (TRL's SFTTrainer patches the forward
    of models whose backbone is ``base_model``, which medvlm's composite is not)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = model.config
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=cfg.image_seq_length, multimodal_projector_bias=True))
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision_tower."):
            state["model." + k] = v
        elif k.startswith("projector."):
            state[k.replace("projector.0.", "model.multi_modal_projector.linear_1.")
                  .replace("projector.2.", "model.multi_modal_projector.linear_2.")] = v
        elif k.startswith("language_model.model."):
            state["model.language_model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            state[k[len("language_model."):]] = v
    llava.load_state_dict(state, strict=True)
    return llava


def matmul_rate(seconds: float = 5.0) -> tuple[float, float]:
    """torch fp32 dense matmul rate (2048^3 GEMMs) on this machine, now: FLOP per wall second and per CPU second."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    flops = 2 * 2048**3 * n
    return flops / (time.perf_counter() - t0), flops / (time.process_time() - c0)


def _config(args, out: str, stage: str, data: str, **over):
    from medvlm.train.config import load_config

    keys = dict(stage=stage, model_name_or_path=str(args.ckpt), data_path=data, image_folder=str(args.demo / "images"),
                output_dir=out, per_device_train_batch_size=8, learning_rate=2e-5, num_train_epochs=args.epochs,
                logging_steps=1, save_strategy="no", report_to=[], warmup_ratio=0.0, max_length=1024,
                disable_tqdm=True, feature_cache="off")
    keys.update(over)
    return load_config(None, keys)


def variant(args) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch
    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.starts, self.ends, self.step_ends, self.step_cpu = {}, {}, [], []

        def on_epoch_begin(self, a, state, c, **kw):
            self.starts[len(self.starts)] = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, a, state, c, **kw):
            self.ends[len(self.ends)] = (time.perf_counter(), time.process_time())

        def on_step_end(self, a, state, c, **kw):
            self.step_ends.append(time.perf_counter())
            self.step_cpu.append(time.process_time())

    timer = EpochTimer()
    work = args.work
    result: dict = {"variant": args.variant}
    if args.variant in ("align_cache", "align_nocache"):
        from medvlm.train.run import run_training

        cache = args.variant == "align_cache"
        cfg = _config(args, str(work / args.variant), "align", str(work / "align.json"), learning_rate=2e-3,
                      feature_cache="on" if cache else "off", feature_cache_dir=str(work / "features"))
        r = run_training(cfg, callbacks=[timer])
        result["epoch_seconds"] = [timer.ends[i][0] - timer.starts[i][0] for i in sorted(timer.ends)]
        result["epoch_cpu_seconds"] = [timer.ends[i][1] - timer.starts[i][1] for i in sorted(timer.ends)]
        result["cache"] = {str(k): v for k, v in r.cache_by_epoch.items()}
    else:
        from medvlm.model.build import load_pretrained
        from medvlm.train.data import build_dataset
        from medvlm.train.run import run_training
        from medvlm.train.trainer import TrainCollator

        from medvlm.train.packing import pack_rows
        from medvlm.train.sampler import ModalityLengthGroupedSampler

        over = {"sft_medvlm": {}, "sft_medvlm_packed": {"packing": True},
                "sft_medvlm_adamw": {"optim": "adamw_torch"}, "sft_trl": {}}[args.variant]
        cfg = _config(args, str(work / args.variant), "sft", str(work / "sft.json"), max_steps=args.sft_steps, **over)
        model, processor = load_pretrained(args.ckpt)
        dataset, _ = build_dataset(cfg.sources(), processor, image_folder=cfg.image_folder, max_length=cfg.max_length)
        micro = cfg.per_device_train_batch_size
        if args.variant == "sft_trl":
            order = list(range(len(dataset)))  # TRL streams the file in order
        else:
            order = list(ModalityLengthGroupedSampler(dataset.lengths, micro, 1, cfg.seed))
        steps = [order[k * micro:(k + 1) * micro] for k in range(args.sft_steps)]
        # Timed: steps 2..N (step 1 warms up allocators); tokens = non-padding tokens of those steps.
        tokens = sum(abs(dataset.lengths[i]) for st in steps[1:] for i in st)
        padded = 0  # token slots of the batches (with padding)
        for st in steps[1:]:
            lens = [abs(dataset.lengths[i]) for i in st]
            rows = pack_rows(lens, cfg.max_length) if cfg.packing else [[i] for i in range(len(lens))]
            padded += len(rows) * max(sum(lens[i] for i in row) for row in rows)
        n_img = sum(1 for st in steps[1:] for i in st if dataset.lengths[i] > 0)
        t0 = time.perf_counter()
        if args.variant != "sft_trl":
            r = run_training(cfg, callbacks=[timer])
            losses = [h["loss"] for h in r.log_history if "loss" in h]
        else:
            from trl import SFTConfig, SFTTrainer

            sargs = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=8, learning_rate=2e-5,
                              num_train_epochs=cfg.num_train_epochs, logging_steps=1, save_strategy="no",
                              report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True,
                              remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                              max_length=None, lr_scheduler_type="cosine", disable_tqdm=True, seed=cfg.seed)
            import datasets

            model = to_hf_llava(model)
            model.model.vision_tower.requires_grad_(False)  # same trainable set as medvlm's sft stage
            # TRL only takes `datasets` objects: stream our lazy dataset's items through one (same encoding).
            stream = datasets.IterableDataset.from_generator(lambda: (dataset[i] for i in range(len(dataset))))
            sargs.max_steps = args.sft_steps
            trainer = SFTTrainer(model=model, args=sargs, train_dataset=stream,
                                 data_collator=TrainCollator(processor.pad_token_id),
                                 processing_class=processor.tokenizer, callbacks=[timer])
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        seconds = time.perf_counter() - t0
        train_seconds = timer.step_ends[-1] - timer.step_ends[0]
        cpu_seconds = timer.step_cpu[-1] - timer.step_cpu[0]  # user + sys of all threads: robust to machine load
        n_tower = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
        n_lm = sum(p.numel() for p in model.parameters()) - n_tower
        flops = 6 * n_lm * tokens + 2 * n_tower * n_img * model.config.image_seq_length
        result.update(tokens=tokens, padding_fraction=1 - tokens / padded, timed_steps=len(steps) - 1,
                      train_seconds=train_seconds, wall_seconds=seconds,
                      tokens_per_s=tokens / train_seconds, flops_per_s=flops / train_seconds,
                      cpu_seconds=cpu_seconds, tokens_per_cpu_s=tokens / cpu_seconds, flops_per_cpu_s=flops / cpu_seconds,
                      first_loss=losses[0], last_loss=losses[-1])
    result["matmul_flops_per_s"], result["matmul_flops_per_cpu_s"] = matmul_rate()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512, help="training samples per stage (>= 500 for the record)")
    ap.add_argument("--epochs", type=int, default=2, help="stage-1 epochs (b)")
    ap.add_argument("--align-samples", type=int, default=None, help="stage-1 samples (default: --samples)")
    ap.add_argument("--sft-steps", type=int, default=12, help="stage-2 optimizer steps timed per variant (a)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvlm_bench_train"))
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="sft_trl,sft_medvlm,sft_medvlm_packed,sft_medvlm_adamw,align_nocache,align_cache")
    args = ap.parse_args()
    args.demo = args.work / "demo"
    args.ckpt = args.work / "bench_model"
    if args.variant:
        print("RESULT " + json.dumps(variant(args)), flush=True)
        return
    from medvlm.data.synth import generate_synth

    args.work.mkdir(parents=True, exist_ok=True)
    if not args.demo.exists():
        generate_synth(args.demo, n_images=int(args.samples * 1.3) + 8, seed=0, image_size=128, qa50_images=2)
    align = json.loads((args.demo / "alignment.json").read_text())[: args.align_samples or args.samples]
    # Stage 2 on the synthetic instruction conversations: 1-4 turns, so lengths vary as in LLaVA-Med's data.
    sft = json.loads((args.demo / "instruct.json").read_text())[: args.samples]
    if len(sft) < args.samples:
        raise SystemExit(f"only {len(sft)} instruct samples; remove {args.demo} and re-run")
    (args.work / "align.json").write_text(json.dumps(align))
    (args.work / "sft.json").write_text(json.dumps(sft))
    build_bench_model(args.work)
    results = {}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--variant", name, "--samples", str(args.samples), "--epochs",
               str(args.epochs), "--work", str(args.work), "--sft-steps", str(args.sft_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[0][7:])
        print(name, json.dumps(results[name]), flush=True)
    print("\nsummary")
    if {"align_cache", "align_nocache"} <= results.keys():
        a, b = results["align_nocache"]["epoch_seconds"], results["align_cache"]["epoch_seconds"]
        later_a, later_b = sum(a[1:]) / max(1, len(a) - 1), sum(b[1:]) / max(1, len(b) - 1)
        print(f"(b) stage-1 epoch 1: {a[0]:.1f} s without cache, {b[0]:.1f} s with (filling); epochs 2+: "
              f"{later_a:.1f} s vs {later_b:.1f} s per epoch -> {later_a / later_b:.2f}x")
        a, b = results["align_nocache"]["epoch_cpu_seconds"], results["align_cache"]["epoch_cpu_seconds"]
        later_a, later_b = sum(a[1:]) / max(1, len(a) - 1), sum(b[1:]) / max(1, len(b) - 1)
        print(f"(b) in CPU seconds: epoch 1 {a[0]:.1f} vs {b[0]:.1f}; epochs 2+ {later_a:.1f} vs {later_b:.1f} "
              f"-> {later_a / later_b:.2f}x")
    if "sft_trl" in results:
        t = results["sft_trl"]
        print(f"(a) stage-2 TRL SFTTrainer: {t['tokens_per_s']:.0f} tokens/s, {t['tokens_per_cpu_s']:.0f} tokens/CPU-s, "
              f"padding {t['padding_fraction']:.1%}, FLOP/CPU-s / matmul FLOP/CPU-s "
              f"{t['flops_per_cpu_s'] / t['matmul_flops_per_cpu_s']:.1%}")
        for name in ("sft_medvlm", "sft_medvlm_packed", "sft_medvlm_adamw"):
            if name in results:
                m = results[name]
                print(f"(a) {name}: {m['tokens_per_s']:.0f} tokens/s -> {m['tokens_per_s'] / t['tokens_per_s']:.2f}x TRL; "
                      f"{m['tokens_per_cpu_s']:.0f} tokens/CPU-s -> {m['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x TRL; "
                      f"padding {m['padding_fraction']:.1%}; FLOP/CPU-s / matmul FLOP/CPU-s "
                      f"{m['flops_per_cpu_s'] / m['matmul_flops_per_cpu_s']:.1%}")
    for name, r in results.items():
        print(f"(c) peak RSS {name}: {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
