"""``TrainConfig``: one typed config per training run, read from YAML plus ``--key value`` overrides.

Keys are medvlm's own (stage, starting point, data, tuning, speed) and the HF ``TrainingArguments``
names (``output_dir``, ``learning_rate`` ...). The common HF names are fields here, with defaults
suited to VLM training; any other ``TrainingArguments`` field may be given too and is passed through
(``training_args``). The resolved config (after overrides) is written beside every checkpoint as
``train_config.yaml``, so a run can be reproduced from its output folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medvlm.errors import MedvlmError

STAGES: tuple[str, ...] = ("align", "sft", "sq", "dpo", "vision")
TUNES: tuple[str, ...] = ("full", "lora", "qlora")
FEATURE_CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")
DISTRIBUTED_MODES: tuple[str, ...] = ("auto", "fsdp2_cpu", "deepspeed_cpu")
LLAMA_LINEAR_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_LINEAR_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class DataSource:
    """One training file of a mixture."""

    path: str
    """A data file any :mod:`medvlm.data.readers` format reads (LLaVA-Med JSON, converted VQA, JSONL ...)."""
    weight: float = 1.0
    """Share of the epoch: 2.0 repeats every record twice, 0.5 takes a seeded half of the records."""


@dataclass
class TrainConfig:
    """Everything a training run needs; see ``configs/llava_med/*.yaml`` for the paper's recipes."""

    # --- what to train ------------------------------------------------------------------------
    stage: str = "sft"
    """``align`` (stage 1: projector only, tower and LM frozen), ``sft`` (stage 2 / VQA fine-tuning: projector + LM),
    ``sq`` (STLLaVA-Med self-questioning tuning), ``dpo`` (STLLaVA-Med DPO on preference pairs) or ``vision`` (a random
    vision tower learns from the training answers as classes, before ``align``: not in LLaVA-Med, whose tower comes
    pretrained; :mod:`medvlm.train.recipes.vision`). A model whose
    ``config.scratch_parts`` lists parts that started random (the ``tiny`` / ``small`` presets) trains those parts in
    ``align`` and ``sft`` too (a deviation from LLaVA-Med, whose parts come pretrained; see
    :mod:`medvlm.train.stages`)."""
    model_name_or_path: str | None = None
    """A medvlm checkpoint folder (ours, a previous stage's output, or an imported LLaVA-Med checkpoint)."""
    preset: str | None = None
    """Build a fresh model with ``medvlm.model.build.build_preset(preset)`` instead (``tiny``: debug runs)."""
    vision_tower_path: str | None = None
    """Compose a fresh model: folder of a transformers vision tower (with ``language_model_path``)."""
    language_model_path: str | None = None
    """Compose a fresh model: folder of a transformers causal LM and its tokenizer."""
    projector_type: str | None = None
    """Projector of a composed/preset model: ``linear`` | ``mlp2x_gelu`` | ``cluster`` (checkpoints keep their own)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``build_preset`` / ``compose`` (``image_aspect``, ``template`` ...)."""
    pretrain_projector: str | None = None
    """Load the projector from a stage-1 output (a checkpoint folder or a ``*.safetensors`` file) before training."""
    template: str | None = None
    """Chat template the run trains in (default: the model's own). Another template switches the model to it and
    the output checkpoint records it (STLLaVA-Med's ``--version v1_sq``); ``plain`` only in ``align`` (LLaVA's
    stage-1 image + caption format; the checkpoint keeps its chat template)."""
    family: str | None = None
    """Model family of ``model_name_or_path`` when it is a transformers image-text-to-text checkpoint (``qwen2_5_vl``,
    ``qwen3_vl``, ``gemma3``, ``idefics3``, ``llava``, ``llava_onevision``; :mod:`medvlm.model.families`): must equal
    the checkpoint's declared family. None: taken from the checkpoint (``medvlm_family.json`` / ``model_type``)."""

    # --- data ---------------------------------------------------------------------------------
    data_path: str | list[Any] | None = None
    """One data file, a list of files, or a list of ``{path, weight}`` mappings (a weighted mixture)."""
    data_weights: list[float] | None = None
    """Weights for a plain list of ``data_path`` files (same order); default 1.0 each."""
    data_format: str = "auto"
    """Reader format for every data file (``auto`` detects per file)."""
    image_folder: str | None = None
    """Folder the samples' relative image paths resolve against (required when any sample has images)."""
    max_length: int = 2048
    """Maximum tokens per sample (LLaVA's ``model_max_length``); samples whose image tokens would be cut are
    dropped and counted."""
    skip_missing_images: bool = False
    """Drop (and count) samples whose image file is missing instead of stopping with an error."""
    group_by_modality_length: bool = True
    """Length-grouped sampling with image and text-only samples in separate mega-batches (less padding)."""
    group_by_image: bool | None = None
    """Stages ``align``/``sft``: merge the single-question samples of each image into one multi-turn conversation
    before training (:mod:`medvlm.data.benchmarks.group`, LLaVA-1.5's format for VQA data; the merged file is written
    to ``output_dir/grouped/``). Every answer is still learned, but the image is encoded once for all its questions.
    Default: ``ScratchRecipe.align_group_by_image`` / ``sft_group_by_image`` (:mod:`medvlm.train.stages`; on in
    ``align``, off in ``sft``) when parts train from scratch (``config.scratch_parts``) and ``data_format`` is
    ``auto``, off otherwise: LLaVA-Med's published VQA fine-tunes train one question per sample.
    Captions and multi-turn conversations pass through unchanged. Needs ``data_format: auto`` (the merged file is
    LLaVA JSON)."""
    group_yes_no_last: bool | None = None
    """With ``group_by_image``: in each merged conversation, the questions answered "yes" / "no" come after the
    others (:func:`medvlm.data.benchmarks.group.group_by_image`), so that every open answer is learned from the image
    and only the yes/no ones can lean on an earlier answer's text. Default: on whenever questions are merged
    (``ScratchRecipe.group_yes_no_last``); set without ``group_by_image`` it is refused (nothing would be ordered)."""
    isolate_questions: bool | None = None
    """With ``group_by_image``: each merged conversation becomes one row in which every question attends to the
    image and to itself only, with the positions it would have alone (:mod:`medvlm.train.shared_image`). Each answer
    is then trained exactly as its single-question sample (same logits, tested), and no answer can lean on another's
    text, but the image goes through the tower, and its tokens through the LM, once for all its questions. The
    sample budget and the batch then count images, not questions. Conversations ``group_by_image`` did not merge
    (captions, real multi-turn dialogues) train as they are. Native models only; not with ``packing``.
    Default: ``ScratchRecipe.isolate_questions`` whenever questions are merged; set without ``group_by_image`` it is
    refused."""
    eval_data_path: str | None = None
    """A converted-VQA file (``answer_type``, ``question_type``) answered and scored (``llava-med`` protocol) after
    a stage ``align``/``sft`` run by ``medvlm train``: each question kind's score is printed next to the image-blind
    baseline learned from the training files, and written to ``output_dir/eval_scores.json``. Images resolve
    against ``image_folder``. (Library callers use ``medvlm.eval.train_eval.train_and_evaluate``.)"""
    image_augment: bool | None = None
    """Stages ``align``/``sft``: each time a training image is read, shift it by a few pixels and jitter brightness
    and contrast slightly (:func:`medvlm.train.data.augment_image`; no flips, crops or rescaling, so sides, counts
    and sizes hold; magnitudes in :class:`medvlm.train.stages.ScratchRecipe`). Default:
    :attr:`~medvlm.train.stages.ScratchRecipe.image_augment` when the vision tower starts random
    (``config.scratch_parts``), off otherwise: LLaVA-Med does not augment (its tower is pretrained and frozen)."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of up to ``max_length`` tokens instead of padding them: positions
    restart per sample, attention stays inside each sample (block-diagonal mask read from the positions by
    transformers for sdpa/eager/flex; varlen for flash-attention) and no loss crosses a boundary (stages align/sft)."""

    # --- which parameters learn -----------------------------------------------------------------
    tune: str = "full"
    """``full``, ``lora`` (PEFT adapters on the LM, projector fully trained) or ``qlora`` (4-bit base; CUDA only).
    LoRA runs end with merged full weights in ``output_dir`` (loadable like any checkpoint) and the adapter in
    ``adapter/``."""
    tune_vision_tower: bool | None = None
    """Also train the vision tower (frozen in both LLaVA-Med stages). Default: no, except in ``align``/``sft`` when
    the tower started random (``config.scratch_parts``: the ``tiny``/``small``/``smol`` presets' towers; a deviation
    from LLaVA-Med). Stage ``sq``: the whole tower at ``vision_lr`` instead of ViT-LoRA (needs ``vit_lora: false``; a
    deviation from STLLaVA-Med); refused in ``dpo``."""
    tune_projector: bool | None = None
    """Train the projector; default: yes in both stages (a stage-1 run with it frozen is an error)."""
    tune_language_model: bool | None = None
    """Train the LM; default: no in ``align`` (yes when the LM started random, ``config.scratch_parts``: a deviation
    from LLaVA-Med, whose stage 1 trains the projector alone), yes in ``sft``."""
    tune_im_start_end: bool | None = None
    """Train the ``<im_start>``/``<im_end>`` embedding rows (only those rows); default: in ``align`` when the model
    uses them."""
    lora_r: int = 128
    """LoRA rank (LLaVA-Med v1.5 LoRA recipe: 128)."""
    lora_alpha: int = 256
    """LoRA scaling numerator (LLaVA-Med v1.5 LoRA recipe: 256)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_NAMES))
    """Module names (suffixes) inside the language model that get adapters; each must exist."""
    lora_bias: str = "none"
    """PEFT ``bias``: ``none`` | ``all`` | ``lora_only``."""

    # --- speed / scale --------------------------------------------------------------------------
    feature_cache: str = "auto"
    """Frozen-tower feature cache: ``auto`` (on when the tower is frozen), ``on`` or ``off``."""
    feature_cache_dir: str | None = None
    """Where cached vision features live (default ``$MEDVLM_CACHE/features`` or ``~/.cache/medvlm/features``)."""
    distributed: str = "auto"
    """``auto`` = whatever ``accelerate launch``/``torchrun`` set up (DDP, or FSDP/DeepSpeed on GPUs via the accelerate
    config); ``fsdp2_cpu`` = medvlm's PyTorch-FSDP2 loop for CPU clusters (accelerate cannot shard on CPU);
    ``deepspeed_cpu`` = medvlm's loop over the DeepSpeed engine (ZeRO stage ``deepspeed_zero_stage``) on CPU, where
    the HF Trainer's DeepSpeed integration does not run."""
    deepspeed_zero_stage: int = 2
    """``distributed: deepspeed_cpu``: ZeRO stage 2 (optimizer state + gradients partitioned) or 3 (parameters too)."""
    labelled_logits_only: bool = True
    """Apply the LM's output head only where a label is learned (stages align/sft, every distributed mode): the
    loss and gradients equal the full-logits path, but image, prompt and padding positions never get a
    ``[.., vocab]`` row, a large share of a step with a 32k-49k vocabulary. ``false`` computes the logits of every
    position as transformers' ``*ForCausalLM`` does. Evaluation, DPO and inference always use full logits."""
    projector_lr: float | None = None
    """Learning rate of the projector if different from ``learning_rate`` (LLaVA's ``mm_projector_lr``)."""
    global_batch_size: int | None = None
    """If set, ``gradient_accumulation_steps`` = global / (per-device batch x processes); must divide exactly."""

    # --- STLLaVA-Med: stages sq (self-questioning) and dpo; see medvlm.train.recipes.sq / .dpo ----
    sq_r: float = 0.5
    """Stage ``sq``: probability that a user turn after the first becomes a VUSER question (re-drawn each epoch,
    seeded)."""
    vit_lora: bool | None = None
    """LoRA on the vision tower's linear layers (STLLaVA-Med's ViT-LoRA), trained with the LM (or its LoRA) and the
    projector. None = the stage's default: on in ``sq``/``dpo`` (STLLaVA-Med), off in ``sft`` (LLaVA-Med); an
    explicit value always applies (``sft``: with ``tune: lora`` or alone beside a fully trained LM); refused in
    ``align`` (projector only). Read through :meth:`vit_lora_on`."""
    vit_lora_r: int = 32
    """ViT-LoRA rank."""
    vit_lora_alpha: int = 64
    """ViT-LoRA scaling numerator."""
    vit_lora_dropout: float | None = None
    """ViT-LoRA dropout; default 0.2 in ``sq``, 0.1 in ``dpo`` (STLLaVA-Med) and ``lora_dropout`` in ``sft``."""
    vit_lora_target_modules: list[str] = field(default_factory=lambda: list(VIT_LINEAR_NAMES))
    """Tower linear layers that get ViT-LoRA (in every encoder layer that feeds the features)."""
    vit_lora_grad: str = "trained"
    """``trained``: gradients reach the ViT-LoRA. ``published``: reproduce the published code, whose tower runs
    under ``no_grad`` so its ViT-LoRA never trains."""
    vision_lr: float | None = None
    """Learning rate of the vision parameters (ViT-LoRA, or the whole tower with ``tune_vision_tower`` in ``sq``)
    if different from ``learning_rate``."""
    dpo_beta: float = 0.1
    """Stage ``dpo``: the DPO temperature beta (sigmoid loss)."""
    dpo_rpo_alpha: float | None = None
    """Stage ``dpo``: if set, add ``alpha x`` the chosen answers' mean token NLL to the DPO loss (RPO, Pang et al.
    2024; TRL's ``rpo_alpha``): keeps the chosen answers likely while the margin grows. Null = plain DPO (the paper)."""
    ref_visual_path: str = "frozen"
    """Stage ``dpo``: the reference sees images through its own frozen tower and projector (``frozen``) or, as
    the published trainer did, through the policy's trainable ones (``policy``)."""
    ref_logps: str | None = None
    """Stage ``dpo``: reference log-probs computed once and stored: ``auto`` (``output_dir/ref_logps.safetensors``),
    a ``.safetensors`` path (created when missing), or null (the reference runs on the fly every step)."""

    # --- HF TrainingArguments (same names) --------------------------------------------------------
    output_dir: str | None = None
    """Run folder: checkpoints, logs, the loss curve; at the end a loadable medvlm checkpoint."""
    num_train_epochs: float | None = None
    """Epochs over the (mixed, grouped) training set. Default: 1 (LLaVA-Med's stages), except in ``align``/``sft`` with
    parts trained from scratch: enough epochs for ``scratch_samples`` samples (a small dataset is seen many times;
    a deviation from LLaVA-Med's 1 epoch of 600k captions and 3 of 60k conversations)."""
    scratch_samples: int | None = None
    """Stages ``align``/``sft``: train on this many samples (records after grouping), i.e.
    ``ceil(scratch_samples / records)`` epochs, instead of ``num_train_epochs`` (give one of the two). Default: with
    parts trained from scratch, :attr:`medvlm.train.stages.ScratchRecipe.samples`; otherwise unset (1 epoch)."""
    max_steps: int = -1
    """If > 0, stop after this many optimizer steps (overrides epochs)."""
    learning_rate: float | None = None
    """Peak learning rate. Default: ``align`` 2e-3 (LLaVA-Med v1.5 stage 1, projector only), other stages 2e-5
    (LLaVA-Med stage 2); with parts trained from scratch (``config.scratch_parts``) the rates of
    :class:`medvlm.train.stages.ScratchRecipe` (deviations from LLaVA-Med, whose parts come pretrained)."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases, norms or the im_start/end rows)."""
    per_device_train_batch_size: int | None = None
    """Samples per process per forward pass. Default: :data:`medvlm.train.stages.DEFAULT_BATCH` (4), or
    :attr:`medvlm.train.stages.ScratchRecipe.batch_size` in ``align``/``sft`` with parts trained from scratch."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step (derived from ``global_batch_size`` when that is set)."""
    lr_scheduler_type: str = "cosine"
    """``cosine``, ``linear``, ``constant`` ... (transformers ``SchedulerType``)."""
    warmup_ratio: float = 0.03
    """Linear warm-up as a fraction of all optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed of initialisation, data order and dropout."""
    logging_steps: int = 1
    """Log (one line, TensorBoard, the loss curve) every N optimizer steps."""
    save_strategy: str = "steps"
    """``steps``, ``epoch`` or ``no``."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (``save_strategy: steps``)."""
    save_total_limit: int | None = 2
    """Keep at most this many ``checkpoint-*`` folders (oldest removed)."""
    resume_from_checkpoint: str | bool | None = "auto"
    """``auto`` resumes from the last ``checkpoint-*`` in ``output_dir`` if any; a path resumes from it; false
    starts fresh."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Logging integrations (``tensorboard``, ``wandb`` ...); ``[]`` for none."""
    bf16: bool = False
    """bfloat16 mixed precision (use on Ampere+ GPUs)."""
    fp16: bool = False
    """float16 mixed precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (tower encoder and LM decoder) to save memory."""
    dataloader_num_workers: int = 0
    """Data-loading worker processes."""
    optim: str = "adamw_torch_fused"
    """Optimizer name (transformers ``OptimizerNames``). The default, torch's fused AdamW, runs on CPU and CUDA and
    is ~4x faster per step than ``adamw_torch`` on CPU (one kernel over all tensors instead of a per-tensor loop)."""
    use_cpu: bool | None = None
    """Force CPU; default: CPU when no CUDA device is present."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """Any other ``TrainingArguments`` field (given as a top-level key; collected here)."""

    def sources(self) -> list[DataSource]:
        """``data_path`` / ``data_weights`` as a list of weighted sources."""
        raw = self.data_path
        if raw is None:
            return []
        items = raw if isinstance(raw, list) else [raw]
        weights = self.data_weights
        if weights is not None and len(weights) != len(items):
            raise MedvlmError(f"data_weights has {len(weights)} entries but data_path has {len(items)} files")
        out: list[DataSource] = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                unknown = set(item) - {"path", "weight"}
                if "path" not in item or unknown:
                    raise MedvlmError(f"data_path[{i}]: expected {{path, weight}}, got keys {sorted(item)}")
                src = DataSource(str(item["path"]), float(item.get("weight", 1.0)))
            else:
                src = DataSource(str(item), 1.0)
            if weights is not None:
                src.weight = float(weights[i])
            if src.weight <= 0:
                raise MedvlmError(f"data_path[{i}] ({src.path}): weight must be > 0, got {src.weight}")
            out.append(src)
        return out

    def vit_lora_on(self) -> bool:
        """Whether this run adds ViT-LoRA: ``vit_lora`` if set, else the stage's default (``sq``/``dpo`` yes,
        else no)."""
        return self.vit_lora if self.vit_lora is not None else self.stage in _SELF_TRAINING

    def validate(self) -> TrainConfig:
        """Check choices and required keys; raise a MedvlmError naming the key."""
        _choice(self.stage, STAGES, "stage")
        _choice(self.tune, TUNES, "tune")
        _choice(self.feature_cache, FEATURE_CACHE_MODES, "feature_cache")
        _choice(self.distributed, DISTRIBUTED_MODES, "distributed")
        _choice(self.lora_bias, ("none", "all", "lora_only"), "lora_bias")
        if not self.output_dir:
            raise MedvlmError("output_dir is required")
        if not self.sources():
            raise MedvlmError("data_path is required (one file, a list, or a list of {path, weight})")
        starts = [k for k in ("model_name_or_path", "preset", "language_model_path") if getattr(self, k)]
        if len(starts) != 1:
            raise MedvlmError(
                "give exactly one starting point: model_name_or_path (a medvlm checkpoint), preset, or "
                f"vision_tower_path + language_model_path (got {starts or 'none'})"
            )
        if bool(self.vision_tower_path) != bool(self.language_model_path):
            raise MedvlmError("composing a model needs both vision_tower_path and language_model_path")
        if self.stage == "align":
            if self.tune_projector is False:
                raise MedvlmError("stage 'align' trains the projector: tune_projector: false leaves nothing to align")
            if self.tune != "full":
                raise MedvlmError(f"stage 'align' trains the projector fully; tune: {self.tune} applies to sft")
            if self.vit_lora is not None:
                raise MedvlmError(
                    "vit_lora: stage 'align' trains only the projector (tower and LM frozen); remove "
                    "vit_lora, or adapt the tower in stage sft (vit_lora: true, with tune: lora or full)"
                )
        if self.stage == "sft" and self.vit_lora and self.tune_vision_tower:
            raise MedvlmError(
                "stage 'sft': tune_vision_tower: true trains the whole tower, so ViT-LoRA on it is "
                "redundant; set vit_lora: false (or tune_vision_tower: false to adapt it with LoRA)"
            )
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:  # None: resolved per stage
                raise MedvlmError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise MedvlmError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise MedvlmError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.packing and self.stage not in ("align", "sft"):
            raise MedvlmError(f"packing applies to stages align and sft, not {self.stage!r}")
        if self.packing and self.isolate_questions:
            raise MedvlmError(
                "packing and isolate_questions both lay several questions into one row; set isolate_questions: false "
                "to pack, or packing: false to share each image across its questions"
            )
        if self.tune in ("lora", "qlora") and (self.lora_r < 1 or not self.lora_target_modules):
            raise MedvlmError("LoRA needs lora_r >= 1 and a non-empty lora_target_modules")
        check_stage_keys(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-able), ``training_args`` extras flattened back to top-level keys."""
        d = dataclasses.asdict(self)
        extras = d.pop("training_args")
        d.update(extras)
        return d

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``train_config.yaml`` holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


_ALL = STAGES
_TRAINER = ("align", "sft", "sq", "dpo")  # the stages that run a transformers Trainer (or medvlm's loop like it)
_ALIGN_SFT = ("align", "sft")
_SELF_TRAINING = ("sq", "dpo")
_LORA = ("sft", "sq", "dpo")
FIELD_STAGES: dict[str, tuple[str, ...]] = {
    # what to train
    "stage": _ALL,
    "model_name_or_path": _ALL,
    "preset": _ALL,
    "vision_tower_path": _ALL,
    "language_model_path": _ALL,
    "projector_type": _ALL,
    "model_kwargs": _ALL,
    "pretrain_projector": _ALL,
    "template": _TRAINER,
    "family": _TRAINER,
    # data
    "data_path": _ALL,
    "data_weights": _TRAINER,
    "data_format": _ALL,
    "image_folder": _ALL,
    "max_length": _TRAINER,
    "skip_missing_images": ("align", "sft", "sq"),
    "group_by_modality_length": _TRAINER,
    "packing": _ALIGN_SFT,
    "group_by_image": _ALIGN_SFT,
    "group_yes_no_last": _ALIGN_SFT,
    "isolate_questions": _ALIGN_SFT,
    "eval_data_path": _ALIGN_SFT,
    "image_augment": _ALIGN_SFT,
    "scratch_samples": _ALIGN_SFT,
    # which parameters learn
    "tune": _TRAINER,
    "tune_vision_tower": ("align", "sft", "sq"),
    "tune_projector": _TRAINER,
    "tune_language_model": _ALIGN_SFT,
    "tune_im_start_end": ("align",),
    # LoRA on the LM (tune: lora/qlora): stage align trains the projector fully, so only sft and STLLaVA-Med's stages
    "lora_r": _LORA,
    "lora_alpha": _LORA,
    "lora_dropout": _LORA,
    "lora_target_modules": _LORA,
    "lora_bias": ("sft",),
    # speed / scale
    "feature_cache": _ALIGN_SFT,
    "feature_cache_dir": _ALIGN_SFT,
    "distributed": _ALIGN_SFT,
    "deepspeed_zero_stage": _ALIGN_SFT,
    "labelled_logits_only": _ALIGN_SFT,
    "projector_lr": _TRAINER,
    "global_batch_size": _TRAINER,
    # STLLaVA-Med
    # ViT-LoRA: on by default in sq/dpo, optional in sft (TrainConfig.vit_lora); align trains the projector only
    "sq_r": ("sq",),
    "vit_lora": _LORA,
    "vit_lora_r": _LORA,
    "vit_lora_alpha": _LORA,
    "vit_lora_dropout": _LORA,
    "vit_lora_target_modules": _LORA,
    "vit_lora_grad": _SELF_TRAINING,
    "vision_lr": _SELF_TRAINING,
    "dpo_beta": ("dpo",),
    "dpo_rpo_alpha": ("dpo",),
    "ref_visual_path": ("dpo",),
    "ref_logps": ("dpo",),
    # HF TrainingArguments: the Trainer stages run a transformers Trainer (or medvlm's loop with the same meaning);
    # stage vision's own loop reads the schedule, batch, clipping, seed and logging keys with the same meaning
    "output_dir": _ALL,
    "num_train_epochs": _ALL,
    "max_steps": _ALL,
    "learning_rate": _ALL,
    "weight_decay": _ALL,
    "per_device_train_batch_size": _ALL,
    "gradient_accumulation_steps": _TRAINER,
    "lr_scheduler_type": _ALL,
    "warmup_ratio": _ALL,
    "max_grad_norm": _ALL,
    "seed": _ALL,
    "logging_steps": _ALL,
    "save_strategy": _TRAINER,
    "save_steps": _TRAINER,
    "save_total_limit": _TRAINER,
    "resume_from_checkpoint": _TRAINER,
    "report_to": _TRAINER,
    "bf16": _TRAINER,
    "fp16": _TRAINER,
    "gradient_checkpointing": _TRAINER,
    "dataloader_num_workers": _TRAINER,
    "optim": _TRAINER,
    "use_cpu": _TRAINER,
    "disable_tqdm": _ALL,
    "training_args": _TRAINER,
}
"""The stages that read each :class:`TrainConfig` field (every field is listed; a test checks it). A field set
to anything but its default for a stage not listed is refused by :func:`check_stage_keys`: an accepted key
must take effect."""


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def check_stage_keys(cfg: TrainConfig) -> None:
    """Refuse a key set (to a non-default value) that ``cfg.stage`` does not use, naming the stages that do."""
    for f in dataclasses.fields(TrainConfig):
        stages = FIELD_STAGES.get(f.name)
        if stages is None:  # a new field without a row would escape this check: fail loudly instead
            raise MedvlmError(f"internal: TrainConfig.{f.name} has no entry in FIELD_STAGES")
        if cfg.stage in stages or getattr(cfg, f.name) == _field_default(f):
            continue
        which = "stage " + stages[0] if len(stages) == 1 else "stages " + ", ".join(stages)
        raise MedvlmError(
            f"{f.name} is not used by stage {cfg.stage!r} (it applies to {which}); remove it "
            f"(or set stage to one that uses it)"
        )


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise MedvlmError(f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}")


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "training_args"}


def _hf_field_types() -> dict[str, Any]:
    from transformers import TrainingArguments  # heavy; only needed for pass-through keys

    return {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}


def _parse_scalar(text: str) -> Any:
    """A CLI value: YAML syntax (lists, bools, null), with numbers like ``1e-4`` read as floats."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to a field's annotated type; clear error on mismatch."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    options = args if origin in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options or tp is Any:
            return None
        raise MedvlmError(f"{key}: null is not allowed")
    if isinstance(value, str) and any(o in (int, float, bool) for o in options) and str not in options:
        value = _parse_scalar(value)
    elif isinstance(value, str) and bool in options and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is list:
            if isinstance(value, list):
                return value
            if isinstance(value, str) and str not in options:
                return [v.strip() for v in value.split(",") if v.strip()] if value else []
        if base is dict and isinstance(value, dict):
            return value
        if opt is Any:
            return value
    # A plain string for a list-typed key (``--report_to wandb``) becomes a one-item list.
    if isinstance(value, str) and any((typing.get_origin(o) or o) is list for o in options):
        return [v.strip() for v in value.split(",") if v.strip()]
    raise MedvlmError(f"{key}: expected {tp}, got {value!r}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--learning_rate", "1e-4", "--tune=lora"]`` -> ``{"learning_rate": "1e-4", "tune": "lora"}`` (raw strings)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise MedvlmError(f"unexpected argument {tok!r}; overrides look like --key value")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            out[key] = val
            i += 1
            continue
        if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
            out[key] = "true"  # a bare flag: --bf16
            i += 1
        else:
            out[key] = args[i + 1]
            i += 2
    return out


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a flat mapping; unknown keys that are ``TrainingArguments`` fields pass through."""
    ours = _field_types()
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = dict(data.pop("training_args", None) or {}) if "training_args" in data else {}
    hf_types: dict[str, Any] | None = None
    for key, value in data.items():
        if key in ours:
            kwargs[key] = _coerce(key, value, ours[key])
            continue
        if hf_types is None:
            hf_types = _hf_field_types()
        if key in hf_types:
            extras[key] = _parse_scalar(value) if isinstance(value, str) else value
            continue
        close = difflib.get_close_matches(key, list(ours) + list(hf_types), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MedvlmError(f"{source}: unknown key {key!r}{hint}")
    return TrainConfig(**kwargs, training_args=extras)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe (optional), apply ``--key value`` overrides, validate.

    Without a YAML, the overrides alone must give ``stage``, a starting point, ``data_path`` and ``output_dir``.
    Stage/model-dependent defaults left None are resolved (:func:`medvlm.train.stages.resolve_stage_defaults`).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MedvlmError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MedvlmError(f"{p}: invalid YAML ({e})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise MedvlmError(f"{p}: a training config must be a mapping of keys, got {type(loaded).__name__}")
        data.update(loaded)
        # Relative data/model paths in a recipe are relative to the current directory (as on the command line).
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data.update(overrides or {})
    from medvlm.train.stages import resolve_stage_defaults  # (stages imports this module)

    # Defaults that depend on the stage and the starting model are filled in here (and again, idempotently, by
    # run_training for configs built directly), so every later reader sees concrete values.
    return resolve_stage_defaults(config_from_dict(data, source=str(path) if path else "command line").validate())
