"""``align`` / ``sft`` on a model family (:mod:`medvlm.model.families`) through the HF Trainer.

The family's checkpoint, processor and collator replace the native model's; data indexing (exact
lengths, images that would be cut dropped and counted), the sampler, the training arguments, the run
artifacts and resume are the native recipe's. What trains is declared by the family's parameter
prefixes (:func:`medvlm.model.families.spec.part_of`):

- ``align``: the connector only (Qwen merger, Gemma 3 / LLaVA ``multi_modal_projector``, Idefics3
  connector), unless ``tune_language_model`` / ``tune_vision_tower`` add parts;
- ``sft``: connector + LM fully (``tune: full``), or PEFT LoRA adapters on the LM's linear layers with the
  connector fully trained (``tune: lora``); the vision tower stays frozen unless ``tune_vision_tower``.
  Frozen parameters stay bit-identical.

Options that do not apply to families yet are refused before anything is loaded (stages sq/dpo, QLoRA,
packing, the feature cache, the CPU multi-process loops, native-only model keys). ``labelled_logits_only``
applies the LM head at labelled positions only (:mod:`medvlm.train.family_loss`; same loss).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.model.families.io import family_of, load_family, save_family
from medvlm.model.families.processing import FamilyProcessor
from medvlm.model.families.spec import FamilySpec, part_of
from medvlm.train.config import TrainConfig
from medvlm.utils.io import read_json


def start_family(cfg: TrainConfig) -> str | None:
    """The family of the run's starting checkpoint, or None for the native model (checked against ``family``)."""
    path = cfg.model_name_or_path
    if path is None or not (Path(path) / "config.json").is_file():
        if cfg.family is not None:
            raise MedvlmError(f"family: {cfg.family} needs model_name_or_path to be a checkpoint folder of that family "
                              "(build a tiny one with: medvlm model init --preset tiny-<family> --out DIR)")
        return None
    if read_json(Path(path) / "config.json").get("model_type") == "medvlm":
        if cfg.family is not None:
            raise MedvlmError(f"family: {cfg.family}, but {path} is a native medvlm checkpoint (model_type medvlm)")
        return None
    family = family_of(path)
    if cfg.family is not None and cfg.family != family:
        raise MedvlmError(f"family: {cfg.family}, but {path} is a {family} checkpoint")
    return family


def check_family_config(cfg: TrainConfig, family: str) -> None:
    """Refuse, before any work, the options that do not apply to a model family (each with the fix)."""
    from medvlm.train.stages import check_qlora_platform

    if cfg.stage not in ("align", "sft"):
        raise MedvlmError(f"stage {cfg.stage!r} on model families ({family}) is not supported yet; stages align and sft are")
    if cfg.tune == "qlora":
        check_qlora_platform()
        raise MedvlmError(f"tune: qlora on model families ({family}) is not supported yet; use tune: lora")
    refused = {
        "distributed": (cfg.distributed != "auto", "use distributed: auto (accelerate / torchrun DDP)"),
        "packing": (cfg.packing, "a family's vision tokens and position ids are per sample; set packing: false"),
        "feature_cache": (cfg.feature_cache == "on", "the frozen-tower feature cache is native-model only; use auto or off"),
        "template": (cfg.template is not None, "a family uses its own chat template (llava: the one in the checkpoint)"),
        "pretrain_projector": (cfg.pretrain_projector is not None, "native-model projector files only"),
        "projector_type": (cfg.projector_type is not None, "a family checkpoint keeps its own connector"),
        "model_kwargs": (bool(cfg.model_kwargs), "a family checkpoint is loaded as saved"),
        "tune_im_start_end": (bool(cfg.tune_im_start_end), "native models with <im_start>/<im_end> only"),
        "projector_lr": (cfg.projector_lr is not None, "per-part learning rates are native-model only for now"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise MedvlmError(f"{key} does not apply to model family {family}: {why}")


def _trainable_parts(cfg: TrainConfig) -> tuple[dict[str, bool], bool]:
    """``({part: trains fully}, lora)`` for the run's stage and ``tune_*`` keys."""
    connector = True if cfg.tune_projector is None else cfg.tune_projector
    vision = bool(cfg.tune_vision_tower)
    if cfg.stage == "align":
        return {"connector": True, "vision_tower": vision, "language_model": bool(cfg.tune_language_model)}, False
    lora = cfg.tune == "lora"
    if lora and cfg.tune_language_model is False:
        raise MedvlmError("tune: lora adds adapters to the language model; tune_language_model: false contradicts it")
    lm = (True if cfg.tune_language_model is None else cfg.tune_language_model) and not lora
    if not (connector or lm or lora or vision):
        raise MedvlmError("nothing to train: connector, language model and vision tower are all frozen")
    return {"connector": connector, "vision_tower": vision, "language_model": lm}, lora


def lm_lora_regex(model: torch.nn.Module, spec: FamilySpec, targets: list[str]) -> str:
    """A PEFT ``target_modules`` regex for the named linear layers inside the family's language model only."""
    lm_prefix = spec.language_model[0]
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.startswith(lm_prefix)})
    missing = [t for t in targets if t not in names]
    if missing:
        raise MedvlmError(f"lora_target_modules {missing} match no linear layer of the {spec.name} language model; "
                          f"its linear layers are: {', '.join(names)}")
    return "^" + re.escape(lm_prefix) + r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def apply_family_stage(model: torch.nn.Module, spec: FamilySpec, cfg: TrainConfig) -> tuple[torch.nn.Module, bool]:
    """Freeze / unfreeze by part and add LM LoRA adapters; returns ``(model, lora)``."""
    parts, lora = _trainable_parts(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(parts[part_of(spec, name)])
    if lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
                          target_modules=lm_lora_regex(model, spec, cfg.lora_target_modules))
        model = get_peft_model(model, lcfg)
        # PEFT froze every base weight; the connector (and a tuned tower) train fully, as in the native recipe.
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name and parts[part_of(spec, name)]:
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise MedvlmError(f"stage {cfg.stage!r}: no parameter is trainable")
    return model, lora


def save_family_final(model: torch.nn.Module, processor: FamilyProcessor, output_dir: str | os.PathLike,
                      extra_files: dict[str, str | dict], lora: bool) -> Path:
    """Make ``output_dir`` a loadable family checkpoint (LoRA: merged weights, the LM adapters in ``adapter/``)."""
    out = Path(output_dir)
    staging = out / ".final.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    if lora:
        adapter_tmp = out / ".adapter.tmp"
        if adapter_tmp.exists():
            shutil.rmtree(adapter_tmp)
        model.save_pretrained(str(adapter_tmp))  # PEFT adapter (the connector is in the merged weights)
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        os.replace(adapter_tmp, out / "adapter")
        model = model.merge_and_unload()
    save_family(model, processor, staging, title=out.name, extra_files=extra_files)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
    return out


def run_family(cfg: TrainConfig, family: str, callbacks: list | None = None) -> Any:
    """Train a family checkpoint as configured -> :class:`medvlm.train.run.TrainResult`."""
    from transformers import set_seed

    from medvlm.train.callbacks import CONFIG_FILE, LOSS_PNG, MANIFEST_FILE, RunArtifactsCallback, plot_loss_curve
    from medvlm.train.checkpoint import resolve_resume
    from medvlm.train.data import build_dataset
    from medvlm.train.family_loss import family_collator
    from medvlm.train.run import TrainResult, build_training_args, resolve_accumulation, world_size
    from medvlm.train.trainer import MedVLMTrainer

    check_family_config(cfg, family)
    _trainable_parts(cfg)  # contradictions in the tune_* keys fail before loading
    started = time.time()
    world = world_size()
    accumulation = resolve_accumulation(cfg, world)
    resume = resolve_resume(cfg)
    set_seed(cfg.seed)
    model, processor = load_family(cfg.model_name_or_path)
    dataset, manifest = build_dataset(
        cfg.sources(), processor, image_folder=cfg.image_folder, max_length=cfg.max_length,
        data_format=cfg.data_format, skip_missing_images=cfg.skip_missing_images, seed=cfg.seed,
    )
    model, lora = apply_family_stage(model, processor.spec, cfg)
    find_unused = world > 1 and manifest.text_samples > 0 and manifest.image_samples > 0
    args = build_training_args(cfg, accumulation, find_unused)
    config_yaml = cfg.to_yaml()
    manifest_dict = manifest.to_dict()
    title = f"{cfg.stage} ({family}): {Path(cfg.output_dir).name}"
    trainer = MedVLMTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=family_collator(processor.collator("right"), cfg.labelled_logits_only),
        processing_class=processor.processor,
        callbacks=[RunArtifactsCallback(config_yaml, manifest_dict, title), *(callbacks or [])],
        lengths=dataset.lengths, group_by_modality_length=cfg.group_by_modality_length, labelled_logits_only=False,
    )
    out = trainer.train(resume_from_checkpoint=resume)
    history = list(trainer.state.log_history)
    if trainer.is_world_process_zero():
        final_model = trainer.accelerator.unwrap_model(trainer.model)
        save_family_final(final_model, processor, cfg.output_dir,
                          {CONFIG_FILE: config_yaml, MANIFEST_FILE: manifest_dict}, lora=lora)
        plot_loss_curve(history, Path(cfg.output_dir) / LOSS_PNG, title)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(
        output_dir=str(cfg.output_dir), final_loss=losses[-1] if losses else (out.training_loss if out else None),
        log_history=history, steps=trainer.state.global_step, seconds=time.time() - started, manifest=manifest_dict,
    )
