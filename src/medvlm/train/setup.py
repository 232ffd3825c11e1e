"""What every training recipe does before and after its own part, written once.

Setup (:func:`start_run`): world size -> gradient accumulation -> QLoRA platform check -> resume checkpoint
-> seed -> starting model and processor (native medvlm or a model family) -> the training processor;
:func:`load_sft_data` then builds the indexed, checked training set. Teardown (:func:`finish_run`): rank 0
saves the final checkpoint in ``output_dir`` (LoRA merged, adapters in ``adapter/``) and the loss curve,
every rank waits for it, and the run's :class:`TrainResult` is built. The recipes
(:mod:`medvlm.train.recipes`) call these in order; they never import each other.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import LOSS_CURVE_FILE

log = logging.getLogger(__name__)


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
    """``fsdp2_cpu`` / ``deepspeed_cpu`` only: this rank's local shard shape, global shape and checksum per
    parameter."""


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
    """The processor a run trains with, after applying ``template`` (see :attr:`TrainConfig.template`).

    - no ``template``, or the model's own: the model's processor;
    - ``plain`` in stage ``align``: a copy with ``plain`` (image + caption, LLaVA's stage-1 format); the model
      keeps its chat template for the stages after;
    - any other template: the model is switched to it, in place (``model.config.template`` and the processor,
      so the output checkpoint records it), as STLLaVA-Med's scripts choose ``--version v1_sq`` for a model
      trained with ``v1``.
    """
    from medvlm.data.templates import get_template

    want = cfg.template or model.config.template
    chat_template = get_template(want)  # unknown names: error listing the known ones
    if want == model.config.template:
        return processor
    if want == "plain":
        if cfg.stage != "align":
            raise MedvlmError(
                f"template 'plain' (image + caption, no roles) is LLaVA's stage-1 format: only stage "
                f"'align' trains with it, not {cfg.stage!r}"
            )
        train_proc = copy.copy(processor)
        train_proc.template = "plain"
        train_proc.chat_template = chat_template
        return train_proc
    log.info(
        "switching the model's template from %r to %r (recorded in the output checkpoint)", model.config.template, want
    )
    model.config.template = want
    processor.template = want
    processor.chat_template = chat_template
    return processor


def build_training_args(cfg: TrainConfig, accumulation: int, find_unused: bool):
    """HF ``TrainingArguments`` from the config (extras in ``cfg.training_args`` win)."""
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
            raise MedvlmError(
                "feature_cache: on needs a frozen vision tower (tune_vision_tower or vit_lora trains it); "
                "set feature_cache: auto or off"
            )
        return False
    if cfg.image_augment and cfg.stage in ("align", "sft"):  # every read is a new image: nothing to cache
        if cfg.feature_cache == "on":
            raise MedvlmError(
                "feature_cache: on caches each image's features once; image_augment: true changes the "
                "image at every read. Set one of them off"
            )
        return False
    return True


@dataclass
class RunStart:
    """The state every recipe starts from (:func:`start_run`)."""

    family: str | None
    """The model family of the starting checkpoint (:mod:`medvlm.model.families`), None for the native model."""
    world: int
    """Processes of the launch."""
    accumulation: int
    """Gradient accumulation steps (from ``global_batch_size`` when set)."""
    resume: str | None
    """The Trainer checkpoint to resume from, if any."""
    model: Any
    """The starting model (not yet staged)."""
    processor: Any
    """The starting processor: saved with the final checkpoint."""
    train_proc: Any
    """The processor that encodes the training data (``plain`` copy in native ``align``; a family's own)."""
    started: float
    """``time.time()`` at the start."""


def start_run(cfg: TrainConfig, family: str | None, world: int | None = None, resume: bool = True) -> RunStart:
    """World size, accumulation, QLoRA check, resume, seed, the starting model and processors, in that order.

    ``world`` overrides the launch's ``WORLD_SIZE`` (the CPU loops pass the process group's size);
    ``resume=False`` for the loops that cannot resume mid-run.
    """
    from transformers import set_seed

    from medvlm.train.checkpoint import load_start, resolve_resume
    from medvlm.train.stages import check_qlora_platform

    started = time.time()
    world = world_size() if world is None else world
    accumulation = resolve_accumulation(cfg, world)
    if cfg.tune == "qlora":
        check_qlora_platform()
    checkpoint = resolve_resume(cfg) if resume else None
    set_seed(cfg.seed)
    if family is not None:
        from medvlm.model.families.io import load_family

        model, processor = load_family(cfg.model_name_or_path)
        train_proc = processor
    else:
        model, processor = load_start(cfg)
        train_proc = training_processor(cfg, model, processor)
    return RunStart(family, world, accumulation, checkpoint, model, processor, train_proc, started)


def load_sft_data(cfg: TrainConfig, start: RunStart):
    """The indexed, checked, mixed training set of the run's data files -> ``(dataset, manifest)``.

    Stages ``align``/``sft``: each image's questions merged first (``group_by_image``), ``num_train_epochs`` left
    None resolved from the record count (``scratch_samples``), and ``image_augment`` switched on in the dataset.
    """
    from medvlm.train.data import build_dataset, grouped_sources
    from medvlm.train.stages import SCRATCH, SCRATCH_STAGES, resolve_epochs

    if cfg.isolate_questions and start.family is not None:
        raise MedvlmError(
            f"isolate_questions: the {start.family} family's processor lays out its own image tokens and positions; "
            "set isolate_questions: false"
        )

    dataset, manifest = build_dataset(
        grouped_sources(cfg),
        start.train_proc,
        image_folder=cfg.image_folder,
        max_length=cfg.max_length,
        data_format=cfg.data_format,
        skip_missing_images=cfg.skip_missing_images,
        seed=cfg.seed,
        isolate_questions=bool(cfg.isolate_questions),
    )
    resolve_epochs(cfg, len(dataset))
    if cfg.image_augment and cfg.stage in SCRATCH_STAGES:
        dataset.augment = (SCRATCH.augment_shift, SCRATCH.augment_jitter)
    return dataset, manifest


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries PEFT adapters (merged at the end, kept in ``adapter/``)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def finish_run(
    cfg: TrainConfig,
    start: RunStart,
    *,
    main: bool,
    model: torch.nn.Module | None,
    extra_files: dict[str, Any],
    title: str,
    history: list[dict[str, Any]],
    steps: int,
    fallback_loss: float | None = None,
    manifest: dict[str, Any] | None = None,
    **result: Any,
) -> TrainResult:
    """Rank 0 (``main``) saves ``model`` as the final checkpoint and the loss curve; every rank syncs; the result.

    ``model`` is unwrapped (no DDP); a PEFT model is merged (adapters kept in ``adapter/``). ``result`` holds the
    extra :class:`TrainResult` fields (``cache_stats``, ``cache_by_epoch``, ``shards``).
    """
    from medvlm.train.callbacks import plot_loss_curve

    if main:
        from medvlm.train.checkpoint import save_final

        if start.family is not None:
            from medvlm.model.families.io import save_family

            def write(m, folder, title):
                save_family(m, start.processor, folder, title=title, extra_files=extra_files)
        else:
            from medvlm.model.build import save_checkpoint

            def write(m, folder, title):
                save_checkpoint(m, start.processor, folder, extra_files=extra_files, title=title)

        save_final(model, cfg.output_dir, is_peft(model), write)
        plot_loss_curve(history, Path(cfg.output_dir) / LOSS_CURVE_FILE, title)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(
        output_dir=str(cfg.output_dir),
        final_loss=losses[-1] if losses else fallback_loss,
        log_history=history,
        steps=steps,
        seconds=time.time() - start.started,
        manifest=manifest or {},
        **result,
    )


def train_resumable(trainer: Any, start: RunStart) -> Any:
    """``trainer.train()``, resuming from ``start.resume`` with every trained weight (returns what it returns).

    Adds :class:`~medvlm.train.callbacks.TrainableBaseCallback` (a LoRA run's trained base weights into each
    ``checkpoint-N``) and, on resume, restores those weights before the Trainer restores the adapters,
    optimizer, scheduler and RNG. Under DeepSpeed (GPU, ``accelerate launch``) the engine's checkpoint already holds
    them; under FSDP a resume that would lose them is refused (neither is testable on this CPU-only machine).
    """
    from medvlm.train.callbacks import TrainableBaseCallback
    from medvlm.train.checkpoint import load_trainable_base, trainable_base_state

    if trainer.is_deepspeed_enabled:
        # the engine's checkpoint (in checkpoint-N) saves the module state and the Trainer reloads it
        # (non-strict for PEFT)
        return trainer.train(resume_from_checkpoint=start.resume)
    if trainer.is_fsdp_enabled:
        # sharded parameters: neither written nor restored here, so a resume that would lose them is refused
        if start.resume and trainable_base_state(trainer.model):
            raise MedvlmError(
                f"resume_from_checkpoint {start.resume}: under FSDP a LoRA run's trained base weights "
                "(a family's connector, a fully tuned LM) are neither saved in checkpoint-N nor restored; "
                "start a fresh run in a new output_dir (DDP and DeepSpeed runs resume them)"
            )
        return trainer.train(resume_from_checkpoint=start.resume)
    trainer.add_callback(TrainableBaseCallback())
    if start.resume:
        load_trainable_base(trainer.model, start.resume)
    return trainer.train(resume_from_checkpoint=start.resume)


def finish_trainer(
    cfg: TrainConfig,
    start: RunStart,
    trainer,
    out,
    extra_files: dict[str, Any],
    title: str,
    manifest: dict[str, Any],
    **result: Any,
) -> TrainResult:
    """:func:`finish_run` for an HF Trainer run (``out`` = what ``trainer.train()`` returned)."""
    main = trainer.is_world_process_zero()
    return finish_run(
        cfg,
        start,
        main=main,
        model=trainer.accelerator.unwrap_model(trainer.model) if main else None,
        extra_files=extra_files,
        title=title,
        history=list(trainer.state.log_history),
        steps=trainer.state.global_step,
        fallback_loss=out.training_loss if out else None,
        manifest=manifest,
        **result,
    )
