"""Which parameters learn in each stage: freezing, the im_start/end row mask, LoRA / QLoRA.

- ``align`` (stage 1): tower and LM frozen; the projector learns, and - when the model wraps images
  in ``<im_start>``/``<im_end>`` - only those two rows of the input embedding (a gradient mask keeps
  every other row bit-identical; the matrix gets no weight decay, see :mod:`medvlm.train.optim`).
- ``sft`` (stage 2 / VQA fine-tuning): projector + LM, fully (``full``) or with PEFT adapters on
  the LM (``lora``; the projector fully trained through ``modules_to_save``); ``qlora`` adds a 4-bit
  base and needs CUDA + bitsandbytes. The tower stays frozen unless ``tune_vision_tower`` (all of it) or
  ``vit_lora: true`` (LoRA on its linear layers, :mod:`medvlm.model.vit_lora`, in the same PEFT adapter as
  the LM's; off by default, as in LLaVA-Med). The adapters are merged into the final checkpoint.

Stage ``vision`` (before ``align``, for a random tower) trains the tower alone, through a classifier of the training
answers (:mod:`medvlm.train.recipes.vision`); its defaults are :class:`ScratchRecipe`'s ``vision_*`` fields.

Parts trained from scratch (``config.scratch_parts``, set by the ``tiny`` / ``small`` / ``smol`` presets) change
the defaults of ``align`` and ``sft`` (:func:`resolve_stage_defaults`): :class:`ScratchRecipe` holds them all, each
with its deviation from LLaVA-Med (whose tower and LM come pretrained), and every one can be overridden.

A tower that trains never learns the parts after the feature layer (the last layer(s) and CLIP's
``post_layernorm`` feed only the pooled output); they are frozen explicitly so DDP does not wait for
gradients that never come.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medvlm.errors import MedvlmError
from medvlm.model.parts import set_trainable
from medvlm.model.vit_lora import LoraSpec, apply_lora_adapters
from medvlm.train.config import TrainConfig

DEFAULT_VIT_DROPOUT: dict[str, float] = {"sq": 0.2, "dpo": 0.1}
"""STLLaVA-Med's ViT-LoRA dropout per self-training stage (``sft`` uses ``lora_dropout``)."""
PUBLISHED_LR: dict[str, float] = {"align": 2e-3, "sft": 2e-5, "sq": 2e-5, "dpo": 2e-5}
"""Default peak learning rates for pretrained parts (LLaVA-Med v1.5 stage 1 / stage 2; STLLaVA-Med's stages)."""
SCRATCH_STAGES: tuple[str, ...] = ("align", "sft")
DEFAULT_BATCH = 4
"""``per_device_train_batch_size`` when the stage has no other default (pretrained parts, ``sq``, ``dpo``)."""


@dataclass(frozen=True)
class ScratchRecipe:
    """The defaults of stages ``align``/``sft`` when parts of the starting model are random (``config.scratch_parts``:
    the ``tiny``/``small`` presets' tower and LM, the ``smol`` preset's tower).

    The one place these values live (:data:`SCRATCH`). Every field says where it deviates from LLaVA-Med's published
    recipe, whose tower (CLIP ViT-L/14) and LM (Vicuna / Mistral) come pretrained; ``configs/llava_med/`` keeps the
    published values, and a checkpoint without ``scratch_parts`` gets them. Each is overridden by the
    :class:`TrainConfig` key named in its docstring. The schedule is LLaVA-Med's own (cosine, 3 % warmup:
    ``lr_scheduler_type``, ``warmup_ratio``); the tower's shape, its sin-cos positions and the LM's initial scale are
    the preset's (:data:`medvlm.model.build.PRESET_SIZES`).
    """

    train_random_parts: bool = True
    """A random part trains in both stages (``tune_vision_tower``; ``tune_language_model`` in ``align``). LLaVA-Med
    freezes the tower in both stages and the LM in stage 1. Measured by the demo (:mod:`medvlm.demo`): a random
    part frozen in stage 1 leaves the projector aligning to noise; a random tower frozen in stage 2 never learns
    to see the lesions."""
    align_lr: float = 1e-3
    """``learning_rate`` of ``align`` with random parts (LLaVA-Med v1.5: 2e-3, for the projector alone)."""
    sft_lr: float = 5e-4
    """``learning_rate`` of ``sft`` when the LM is random (LLaVA-Med: 2e-5 for a pretrained LM; a pretrained LM, as in
    the ``smol`` preset, keeps 2e-5)."""
    align_samples: int = 8000
    """``scratch_samples`` of ``align``: training samples, i.e. ``num_train_epochs`` = ceil(samples / records), a record
    being one image's merged conversation under :attr:`align_group_by_image` (LLaVA-Med: 1 epoch of 558k captions in
    stage 1; a user's first dataset has hundreds of images, so it is seen many times). 8000 + 24000 samples at batch
    8 = 4000 steps for 400 images: under 5 minutes on 2 CPU cores, 5-7 on one thread
    (``benchmarks/bench_defaults.py``)."""
    sft_samples: int = 24000
    """``scratch_samples`` of ``sft`` (LLaVA-Med: 3 epochs of 60k instructions in stage 2)."""
    batch_size: int = 8
    """``per_device_train_batch_size`` of ``align``/``sft`` with random parts (otherwise :data:`DEFAULT_BATCH`;
    LLaVA-Med: 32 per device x 8 GPUs in stage 1, 16 x 8 in stage 2)."""
    align_group_by_image: bool = True
    """``group_by_image`` of ``align``: on. Each image's questions are merged into one conversation, so one encoding
    of the image is supervised by all its answers at once: the dense view a caption gives in LLaVA's stage 1, which
    is where the demo's random tower learns to see (:mod:`medvlm.demo`). LLaVA-Med aligns on captions and fine-tunes
    one question per sample. Measured with the documented CLI sequence on ``benchmarks/synth2.py`` (seed 0, 400
    images): 99.3 closed / 92.7 open with it, 81.7 / 79.0 without (closed side 99 against 72.5); on ``medvlm data
    synth`` 71.0 / 71.5 against 72.5 / 70.0 (benchmarks/README.md, "What moved the figures")."""
    sft_group_by_image: bool = False
    """``group_by_image`` of ``sft``: off, as in LLaVA-Med's published VQA fine-tunes (one question per sample), and as
    evaluation asks. Merged for the whole run, the model fitted its training images (loss 0.001 after 2000 steps) with
    the lesion side near its image-blind figure (57 against 53; one-stage probes, ``benchmarks/synth2.py`` seed 0):
    in a merged conversation the later answers can follow from the earlier answers' text, a shortcut that a
    single-question stage after it removes. (``medvlm demo`` merges its own stage-2 file, with extra balanced yes/no
    questions per image, and pins its value.)"""
    group_yes_no_last: bool = True
    """``group_yes_no_last`` whenever questions are merged: each image's open questions first, its yes/no questions
    after them, so that no open answer can follow from an earlier answer's text (LLaVA-1.5 merges an image's questions
    in their file order). Measured with the documented CLI sequence, 3 seeds, 400 images (benchmarks/README.md):
    ``benchmarks/synth2.py`` 98.3-100 closed / 98.7-99.3 open against 94.7-99.3 / 92.3-96.3 in random order (open
    count 79-89 -> 96-98); ``medvlm data synth`` open 74.5-76.0 against 61.5-71.5 (open side +28 to +41 over blind,
    against +6 to +19), closed 61.0-66.5 against 64.0-71.0 (its yes/no answers lean on the open ones' text in
    ``align``, so they learn from the image only in ``sft``)."""
    image_augment: bool = False
    """``image_augment`` (each read of a training image shifted and jittered slightly) stays off, as in LLaVA-Med.
    Measured on ``medvlm data synth`` (400 images, 4000 steps of 8, sin-cos positions, one question per sample):
    on 66.0 closed / 58.5 open, off 71.0 / 70.0; ``benchmarks/synth2.py`` seed 1 without it: 100 / 98. Turn it on
    per run (``image_augment: true``) for a random tower that memorises its training images."""
    augment_shift: float = 0.06
    """Largest shift of the image content under ``image_augment``, as a fraction of each side."""
    augment_jitter: float = 0.1
    """Largest relative change of brightness and of contrast under ``image_augment``."""
    isolate_questions: bool = False
    """``isolate_questions`` stays off: one question per sample in ``sft`` (LLaVA-Med's VQA fine-tune) and merged
    conversations in ``align``. Measured with the documented CLI sequence, seed 0, 400 images (benchmarks/README.md,
    17g): in ``align`` (same images per step, same cost) ``medvlm data synth`` 81.5 / 88.5 against 81.0 / 90.0 and
    ``benchmarks/synth2.py`` 100 / 99.0 against 100 / 99.7, no change; in ``sft`` it trains the same questions 2.6x
    faster, but a step then holds fewer images, and with the random tower training there ``medvlm data synth`` fell
    to 74.0 / 82.5 at the same questions per step (2 images x 4) and 76.5 / 89.0 at twice the questions."""
    vision_epochs: float = 40.0
    """``num_train_epochs`` of stage ``vision``: the random tower learns the training answers as classes through a
    small classifier before ``align`` (:mod:`medvlm.train.recipes.vision`; LLaVA-Med has no such stage, its tower
    comes pretrained). 40 epochs of 400 images: ~20 s on 2 CPU cores. Measured with the documented CLI sequence, seed
    0, 400 images (benchmarks/README.md): ``medvlm data synth`` 66.5 closed / 76.0 open without it, 81.0 / 90.0 with
    it (open count 37.5 -> 69.6, open side 84.2 -> 98.2, closed side 50.0 -> 71.1); ``benchmarks/synth2.py`` 100 /
    99.3 without, 100 / 99.7 with."""
    vision_lr: float = 1e-3
    """``learning_rate`` of stage ``vision`` (tower and classifier, AdamW)."""
    vision_batch_size: int = 16
    """``per_device_train_batch_size`` of stage ``vision``: images per step, each with all its questions."""


SCRATCH = ScratchRecipe()
"""The from-scratch defaults in force."""


def scratch_parts_of(cfg: TrainConfig) -> list[str]:
    """The parts of the starting model that are random (``config.scratch_parts``), read without loading weights."""
    if cfg.preset:
        from medvlm.model.build import PRESET_SCRATCH_PARTS

        return list(PRESET_SCRATCH_PARTS.get(cfg.preset, ()))
    if cfg.model_name_or_path:
        from medvlm.utils.io import read_json

        path = Path(cfg.model_name_or_path) / "config.json"
        if not path.is_file():
            return []  # the checkpoint loader reports the missing checkpoint with its own message
        parts = read_json(path).get("scratch_parts") or []
        if not isinstance(parts, list):
            raise MedvlmError(f"{path}: scratch_parts must be a list of part names, got {parts!r}")
        return [str(p) for p in parts]
    return []  # composed from local parts: taken as pretrained (set the tune_* keys for random ones)


def resolve_stage_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the stage- and model-dependent defaults left None (tower, LM, rate, batch, grouping, augmentation, sample
    budget) in place, from :data:`SCRATCH` for random parts and LLaVA-Med's published values otherwise.

    Epochs that depend on the data size are resolved by :func:`resolve_epochs` once the data is indexed.
    """
    if cfg.stage == "vision":  # its own loop: a batch of images, a rate and a length (ScratchRecipe.vision_*)
        if cfg.per_device_train_batch_size is None:
            cfg.per_device_train_batch_size = SCRATCH.vision_batch_size
        if cfg.learning_rate is None:
            cfg.learning_rate = SCRATCH.vision_lr
        if cfg.num_train_epochs is None:
            cfg.num_train_epochs = SCRATCH.vision_epochs
        return cfg
    scratch = scratch_parts_of(cfg) if cfg.stage in SCRATCH_STAGES else []
    if cfg.num_train_epochs is not None and cfg.scratch_samples is not None:
        raise MedvlmError(
            f"num_train_epochs ({cfg.num_train_epochs}) and scratch_samples ({cfg.scratch_samples}) both set the "
            "training length; give one of them"
        )
    # Only keys the stage reads are filled: a resolved value on a key another stage owns would be refused when the
    # config is validated again (TrainConfig.validate: an accepted key must take effect).
    train_random = SCRATCH.train_random_parts
    if cfg.tune_vision_tower is None and cfg.stage != "dpo":
        cfg.tune_vision_tower = train_random and "vision_tower" in scratch
    if cfg.tune_language_model is None and cfg.stage == "align" and train_random and "language_model" in scratch:
        cfg.tune_language_model = True
    if cfg.stage in SCRATCH_STAGES:
        if cfg.image_augment is None:
            cfg.image_augment = SCRATCH.image_augment and "vision_tower" in scratch
        if cfg.group_by_image is None:
            group = SCRATCH.align_group_by_image if cfg.stage == "align" else SCRATCH.sft_group_by_image
            # Merging writes LLaVA JSON: a default must not turn an explicit data_format into an error (set
            # group_by_image: true to be told why it cannot apply).
            cfg.group_by_image = group and bool(scratch) and cfg.data_format == "auto"
        if cfg.group_yes_no_last is None:
            cfg.group_yes_no_last = SCRATCH.group_yes_no_last if cfg.group_by_image else None
        elif not cfg.group_by_image:
            raise MedvlmError(
                f"group_yes_no_last: {str(cfg.group_yes_no_last).lower()} orders merged conversations, but "
                "group_by_image is off in this run; set group_by_image: true or remove group_yes_no_last"
            )
        if cfg.isolate_questions is None:
            cfg.isolate_questions = SCRATCH.isolate_questions if cfg.group_by_image else None
        elif cfg.isolate_questions and not cfg.group_by_image:
            raise MedvlmError(
                "isolate_questions: true shares each image across its merged questions, but group_by_image is off "
                "in this run; set group_by_image: true or remove isolate_questions"
            )
        if cfg.scratch_samples is None and cfg.num_train_epochs is None and scratch:
            cfg.scratch_samples = SCRATCH.align_samples if cfg.stage == "align" else SCRATCH.sft_samples
    if cfg.per_device_train_batch_size is None:
        cfg.per_device_train_batch_size = SCRATCH.batch_size if scratch else DEFAULT_BATCH
    if cfg.learning_rate is None:
        if cfg.stage == "align" and scratch:
            cfg.learning_rate = SCRATCH.align_lr
        elif cfg.stage == "sft" and "language_model" in scratch:
            cfg.learning_rate = SCRATCH.sft_lr
        else:
            cfg.learning_rate = PUBLISHED_LR[cfg.stage]
    if cfg.num_train_epochs is None and cfg.scratch_samples is None:
        cfg.num_train_epochs = 1.0
    return cfg


def resolve_epochs(cfg: TrainConfig, records: int) -> TrainConfig:
    """``num_train_epochs`` left None (a sample budget): ``ceil(scratch_samples / records)`` epochs.

    The budget is then cleared (``scratch_samples`` None): the epochs are its resolved form, so the saved
    ``train_config.yaml`` loads again without naming the training length twice.
    """
    if cfg.num_train_epochs is None:
        if cfg.scratch_samples is None or cfg.scratch_samples < 1:
            raise MedvlmError(f"scratch_samples must be >= 1, got {cfg.scratch_samples}")
        cfg.num_train_epochs = float(max(1, math.ceil(cfg.scratch_samples / max(1, records))))
        cfg.scratch_samples = None
    return cfg


@dataclass
class StagePlan:
    """The resolved trainable parts of a run."""

    vision_tower: bool
    projector: bool
    language_model: bool
    """Full LM training (False under LoRA: only the adapters learn)."""
    lora: bool
    im_rows: list[int] = field(default_factory=list)
    """Embedding rows trained while the rest of the LM is frozen (``<im_start>``/``<im_end>`` in stage 1)."""
    vit_lora: bool = False
    """LoRA adapters on the vision tower's linear layers (``vit_lora``), trained with the rest."""


def plan_stage(cfg: TrainConfig, model_config) -> StagePlan:
    """Resolve the stage defaults and the ``tune_*`` keys into a :class:`StagePlan`."""
    projector = True if cfg.tune_projector is None else cfg.tune_projector
    if cfg.stage == "align":
        if not projector:
            raise MedvlmError("stage 'align' with the projector frozen trains nothing; remove tune_projector: false")
        lm = bool(cfg.tune_language_model)
        use_rows = model_config.mm_use_im_start_end if cfg.tune_im_start_end is None else cfg.tune_im_start_end
        if use_rows and not model_config.mm_use_im_start_end:
            raise MedvlmError(
                "tune_im_start_end: true, but the model does not use <im_start>/<im_end> (mm_use_im_start_end)"
            )
        rows = [model_config.im_start_token_id, model_config.im_end_token_id] if use_rows and not lm else []
        return StagePlan(bool(cfg.tune_vision_tower), True, lm, False, im_rows=rows)
    lora = cfg.tune in ("lora", "qlora")
    lm = (True if cfg.tune_language_model is None else cfg.tune_language_model) and not lora
    if lora and cfg.tune_language_model is False:
        raise MedvlmError(
            f"tune: {cfg.tune} adds adapters to the language model; tune_language_model: false contradicts it"
        )
    vit = cfg.vit_lora_on()
    if not (projector or lm or lora or cfg.tune_vision_tower or vit):
        raise MedvlmError("nothing to train: projector, language model and vision tower are all frozen")
    return StagePlan(bool(cfg.tune_vision_tower), projector, lm, lora, vit_lora=vit)


def vit_spec(cfg: TrainConfig) -> LoraSpec | None:
    """The run's ViT-LoRA, or None when off (:meth:`TrainConfig.vit_lora_on`).

    Dropout default: 0.2 in ``sq`` and 0.1 in ``dpo`` (STLLaVA-Med's), the LM's ``lora_dropout`` in ``sft``."""
    if not cfg.vit_lora_on():
        return None
    dropout = cfg.vit_lora_dropout
    if dropout is None:
        dropout = DEFAULT_VIT_DROPOUT.get(cfg.stage, cfg.lora_dropout)
    return LoraSpec(cfg.vit_lora_r, cfg.vit_lora_alpha, dropout, list(cfg.vit_lora_target_modules))


def freeze_unused_tower_parts(model: nn.Module) -> list[str]:
    """Freeze tower parameters that cannot receive gradients (after the feature layer); return their names."""
    tower = model.vision_tower
    layer = model.config.vision_feature_layer
    n_layers = model.config.vision_config.num_hidden_layers
    used = layer + n_layers + 1 if layer < 0 else layer  # hidden_states[k] is the output of the first k layers
    frozen = []
    for name, p in tower.named_parameters():
        m = re.search(r"encoder\.layers\.(\d+)\.", name)
        unused = (m is not None and int(m.group(1)) >= used) or "post_layernorm" in name or name.startswith("head.")
        if unused and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def mask_embedding_rows(model: nn.Module, rows: list[int]) -> nn.Parameter:
    """Make only ``rows`` of the input embedding learn: the weight trains, a hook zeroes other rows' grads."""
    weight = model.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # [V, 1]
    mask[rows] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda g: g * mask.to(g.dtype))  # [V, H]: rows outside `rows` get exactly 0
    return weight


def lora_target_regex(model: nn.Module, targets: list[str]) -> str:
    """A PEFT ``target_modules`` regex matching the named linear layers inside ``language_model`` only.

    Raises a MedvlmError naming any target that matches no linear layer of the LM, with the names it has.
    """
    linear_names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if isinstance(m, nn.Linear)}
    )
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise MedvlmError(
            f"lora_target_modules {missing} match no linear layer of the language model; "
            f"its linear layers are: {', '.join(linear_names)}"
        )
    return r"^language_model\..*\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def apply_lora(model: nn.Module, cfg: TrainConfig, plan: StagePlan) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on the LM and/or the tower; the projector (and a tuned tower or
    a fully trained LM) trained fully through ``modules_to_save``."""
    from peft import LoraConfig, get_peft_model

    save = (["projector"] if plan.projector else []) + (["vision_tower"] if plan.vision_tower else [])
    if plan.vit_lora:  # one adapter for both (own rank / alpha / dropout on the tower): merged together at the end
        lm = (
            LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)) if plan.lora else None
        )
        if plan.language_model:
            save.append("language_model")
        return apply_lora_adapters(model, lm, vit_spec(cfg), modules_to_save=save or None, bias=cfg.lora_bias)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias,
        target_modules=lora_target_regex(model, cfg.lora_target_modules),
        modules_to_save=save or None,
    )
    return get_peft_model(model, lcfg)


def check_qlora_platform() -> None:
    """QLoRA needs a CUDA device and bitsandbytes; say so clearly before loading anything."""
    if not torch.cuda.is_available():
        raise MedvlmError("tune: qlora needs a CUDA GPU (4-bit bitsandbytes kernels); on this machine use tune: lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MedvlmError("tune: qlora needs bitsandbytes: pip install bitsandbytes")


def apply_stage(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, StagePlan, set[int]]:
    """Freeze/unfreeze per stage, add adapters; returns ``(model, plan, row_masked_param_ids)``."""
    plan = plan_stage(cfg, model.config)
    set_trainable(model, vision_tower=plan.vision_tower, projector=plan.projector, language_model=plan.language_model)
    if plan.vision_tower:
        freeze_unused_tower_parts(model)
    row_masked: set[int] = set()
    if plan.im_rows:
        row_masked.add(id(mask_embedding_rows(model, plan.im_rows)))
    if plan.lora or plan.vit_lora:
        if cfg.tune == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = apply_lora(model, cfg, plan)
        if plan.vision_tower:
            freeze_unused_tower_parts(model.base_model.model)
    if not any(p.requires_grad for p in model.parameters()):
        raise MedvlmError(f"stage {cfg.stage!r}: no parameter is trainable")
    return model, plan, row_masked
