"""``run_training(config) -> TrainResult``: the whole run, every input checked before the first step.

Order: starting model -> template check -> batch arithmetic -> data (indexed, checked, mixed) ->
stage (freezing / adapters) -> feature cache -> ``MedVLMTrainer`` -> final checkpoint in
``output_dir`` (config, safetensors, processor with its template, resolved config, data manifest,
model card), loss curve. Under ``torchrun``/``accelerate launch`` the same code runs on every rank.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig


@dataclass
class TrainResult:
    """What a finished run reports."""

    output_dir: str
    final_loss: float | None
    """Mean training loss of the last logging step."""
    log_history: list[dict[str, Any]]
    steps: int
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)
    cache_stats: dict[str, int] = field(default_factory=dict)
    """Frozen-tower feature cache ``hits`` / ``misses`` (images) on this process."""
    cache_by_epoch: dict[int, dict[str, int]] = field(default_factory=dict)
    """The same per epoch (0-based)."""
    shards: dict[str, Any] = field(default_factory=dict)
    """``fsdp2_cpu`` only: this rank's local shard shape, global shape and checksum per parameter."""


def world_size() -> int:
    """Processes of the launch (``WORLD_SIZE`` set by torchrun / accelerate), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_accumulation(cfg: TrainConfig, world: int) -> int:
    """``gradient_accumulation_steps``, derived from ``global_batch_size`` when it is set."""
    if cfg.global_batch_size is None:
        return cfg.gradient_accumulation_steps
    per_step = cfg.per_device_train_batch_size * world
    if cfg.global_batch_size % per_step:
        raise MedvlmError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} x {world} process(es) = {per_step}"
        )
    return cfg.global_batch_size // per_step


def training_processor(cfg: TrainConfig, model, processor):
    """The processor used for training: the model's own, or a copy with ``plain`` for stage-1 alignment.

    A template other than the model's is a mismatch (the LM would learn one format and be asked in another),
    except ``plain`` in ``align`` (image + caption, LLaVA's stage-1 format).
    """
    from medvlm.data.templates import get_template

    want = cfg.template or model.config.template
    get_template(want)  # unknown names: error listing the known ones
    if want == model.config.template:
        return processor
    if want == "plain" and cfg.stage == "align":
        train_proc = copy.copy(processor)
        train_proc.template = "plain"
        train_proc.chat_template = get_template("plain")
        return train_proc
    raise MedvlmError(
        f"template {want!r} does not match the model's template {model.config.template!r} "
        f"(config.template of the starting model); only stage 'align' may use 'plain'"
    )


def build_training_args(cfg: TrainConfig, accumulation: int, find_unused: bool):
    """HF ``TrainingArguments`` from the config (extras in ``cfg.training_args`` win)."""
    import torch
    from transformers import TrainingArguments

    use_cpu = cfg.use_cpu if cfg.use_cpu is not None else not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to or "none",
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        dataloader_num_workers=cfg.dataloader_num_workers,
        optim=cfg.optim,
        use_cpu=use_cpu,
        disable_tqdm=cfg.disable_tqdm,
        remove_unused_columns=False,  # the collator's cache fields are consumed by MedVLMTrainer.compute_loss
        ddp_find_unused_parameters=find_unused,
        save_only_model=False,
    )
    if cfg.gradient_checkpointing:  # (passing False trips a rename warning in transformers 5)
        kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs.update(cfg.training_args)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise MedvlmError(f"invalid training arguments: {e}") from e


def use_feature_cache(cfg: TrainConfig, tower_trains: bool) -> bool:
    """Whether this run uses the frozen-tower feature cache."""
    if cfg.feature_cache == "off":
        return False
    if tower_trains:
        if cfg.feature_cache == "on":
            raise MedvlmError("feature_cache: on needs a frozen vision tower (tune_vision_tower is true)")
        return False
    if cfg.image_augment and cfg.stage in ("align", "sft"):  # every read is a new image: nothing to cache
        if cfg.feature_cache == "on":
            raise MedvlmError("feature_cache: on caches each image's features once; image_augment: true changes the "
                              "image at every read. Set one of them off")
        return False
    return True


def run_training(cfg: TrainConfig, callbacks: list | None = None, *, evaluated_by_caller: bool = False) -> TrainResult:
    """Train as configured; returns the output folder, final loss, log history, steps and seconds.

    ``callbacks`` are extra ``transformers.TrainerCallback`` s (progress hooks of a caller such as the demo).
    Defaults left None (tower / LM training, learning rate, epochs) are resolved first
    (:func:`medvlm.train.stages.resolve_stage_defaults`) and written back to ``cfg``. ``eval_data_path`` is
    evaluated by the layer above (``medvlm.eval.train_eval.train_and_evaluate``, which passes
    ``evaluated_by_caller``); called alone with it set, this refuses rather than ignore it.
    """
    from medvlm.train.stages import resolve_stage_defaults

    cfg.validate()
    if cfg.eval_data_path and not evaluated_by_caller:
        raise MedvlmError("eval_data_path is evaluated after training by `medvlm train` or "
                          "medvlm.eval.train_eval.train_and_evaluate(cfg); run_training alone does not evaluate")
    resolve_stage_defaults(cfg)
    if cfg.stage in ("sq", "dpo"):  # STLLaVA-Med's stages have their own data, adapters and loss
        from medvlm.train.dpo import run_dpo
        from medvlm.train.sq import run_sq

        return {"sq": run_sq, "dpo": run_dpo}[cfg.stage](cfg, callbacks)
    if cfg.distributed == "fsdp2_cpu":
        from medvlm.train.distributed import run_fsdp2_cpu

        return run_fsdp2_cpu(cfg)
    if cfg.distributed == "deepspeed_cpu":
        from medvlm.train.deepspeed_cpu import run_deepspeed_cpu

        return run_deepspeed_cpu(cfg)
    import torch
    from transformers import set_seed

    from medvlm.train.callbacks import CONFIG_FILE, LOSS_PNG, MANIFEST_FILE, RunArtifactsCallback, plot_loss_curve
    from medvlm.train.checkpoint import load_start, resolve_resume, save_final
    from medvlm.train.data import build_dataset, grouped_sources
    from medvlm.train.feature_cache import FeatureCache, cache_settings, default_cache_root
    from medvlm.train.stages import apply_stage, check_qlora_platform, plan_stage, resolve_epochs
    from medvlm.train.trainer import MedVLMTrainer, TrainCollator

    started = time.time()
    world = world_size()
    accumulation = resolve_accumulation(cfg, world)
    if cfg.tune == "qlora":
        check_qlora_platform()
    resume = resolve_resume(cfg)
    set_seed(cfg.seed)
    model, processor = load_start(cfg)
    train_proc = training_processor(cfg, model, processor)
    plan = plan_stage(cfg, model.config)  # validate the stage before reading any data
    dataset, manifest = build_dataset(
        grouped_sources(cfg), train_proc, image_folder=cfg.image_folder, max_length=cfg.max_length,
        data_format=cfg.data_format, skip_missing_images=cfg.skip_missing_images, seed=cfg.seed,
    )
    resolve_epochs(cfg, len(dataset))
    dataset.augment = bool(cfg.image_augment) and cfg.stage in ("align", "sft")
    model, plan, row_masked = apply_stage(model, cfg)
    cache = None
    if use_feature_cache(cfg, plan.vision_tower) and manifest.image_samples:
        vlm = model.get_base_model() if plan.lora else model
        dtype = next(vlm.vision_tower.parameters()).dtype
        root = cfg.feature_cache_dir or default_cache_root()
        cache = FeatureCache(root, cache_settings(vlm, train_proc, dtype))
        dataset.feature_cache = cache
    # Text-only batches leave the projector without gradients on that rank: DDP must tolerate it.
    find_unused = world > 1 and manifest.text_samples > 0 and manifest.image_samples > 0
    args = build_training_args(cfg, accumulation, find_unused)
    config_yaml = cfg.to_yaml()
    manifest_dict = manifest.to_dict()
    trainer = MedVLMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=TrainCollator(train_proc.pad_token_id, cfg.max_length if cfg.packing else None),
        processing_class=processor,
        callbacks=[RunArtifactsCallback(config_yaml, manifest_dict, f"{cfg.stage}: {Path(cfg.output_dir).name}"),
                   *(callbacks or [])],
        lengths=dataset.lengths,
        group_by_modality_length=cfg.group_by_modality_length,
        projector_lr=cfg.projector_lr,
        row_masked=row_masked,
        feature_cache=cache,
        labelled_logits_only=cfg.labelled_logits_only,
    )
    out = trainer.train(resume_from_checkpoint=resume)
    history = list(trainer.state.log_history)
    if trainer.is_world_process_zero():
        final_model = trainer.accelerator.unwrap_model(trainer.model)
        save_final(final_model, processor, cfg.output_dir,
                   {CONFIG_FILE: config_yaml, MANIFEST_FILE: manifest_dict}, lora=plan.lora)
        plot_loss_curve(history, Path(cfg.output_dir) / LOSS_PNG, f"{cfg.stage}: {Path(cfg.output_dir).name}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(
        output_dir=str(cfg.output_dir),
        final_loss=losses[-1] if losses else (out.training_loss if out else None),
        log_history=history,
        steps=trainer.state.global_step,
        seconds=time.time() - started,
        manifest=manifest_dict,
        cache_stats=dict(trainer.cache_stats),
        cache_by_epoch=dict(trainer.cache_by_epoch),
    )

