"""What trains in a model family (:mod:`medvlm.model.families`), in every stage, and its final checkpoint.

The family's checkpoint, processor and collator replace the native model's; the recipes
(:mod:`medvlm.train.recipes`) are the same. What trains is declared by the family's parameter prefixes
(:func:`medvlm.model.families.spec.part_of`):

- ``align``: the connector only (Qwen merger, Gemma 3 / LLaVA ``multi_modal_projector``, Idefics3
  connector), unless ``tune_language_model`` / ``tune_vision_tower`` add parts;
- ``sft``: connector + LM fully (``tune: full``), or PEFT LoRA adapters on the LM's linear layers with the
  connector fully trained (``tune: lora``); the vision tower stays frozen unless ``tune_vision_tower`` (all of
  it) or ``vit_lora: true`` (LoRA on its linear layers as in ``sq``/``dpo`` below, in the same adapter);
- ``sq`` / ``dpo``: as STLLaVA-Med on the native model: LM-LoRA (or the whole LM with ``tune: full``), the
  connector fully trained (unless ``tune_projector: false``) and, with ``vit_lora`` (their default), LoRA on the
  vision tower's linear layers (``vit_lora_r`` / ``_alpha`` / ``_dropout``; ``vit_lora_target_modules`` at its
  default means every linear layer of the tower, since each family names them differently; an explicit list
  names the layers). ``sq`` may train the whole tower instead (``tune_vision_tower: true``, ``vit_lora: false``).

Frozen parameters stay bit-identical. Options that do not apply to families yet are refused before anything
is loaded (QLoRA, packing, the feature cache, native-only keys, the published
no-grad tower and the policy visual path of the DPO reference). ``labelled_logits_only`` is a native-model
optimisation: a family model computes full logits (same loss).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from medvlm.errors import MedvlmError
from medvlm.model.families.io import family_of
from medvlm.model.families.spec import FamilySpec, part_of
from medvlm.model.vit_lora import LoraSpec
from medvlm.train.config import VIT_LINEAR_NAMES, TrainConfig
from medvlm.train.stages import vit_spec
from medvlm.utils.artifacts import CONFIG_FILE
from medvlm.utils.io import read_json

SELF_TRAINING = ("sq", "dpo")


def start_family(cfg: TrainConfig) -> str | None:
    """The family of the run's starting checkpoint, or None for the native model (checked against ``family``)."""
    path = cfg.model_name_or_path
    if path is None or not (Path(path) / CONFIG_FILE).is_file():
        if cfg.family is not None:
            raise MedvlmError(
                f"family: {cfg.family} needs model_name_or_path to be a checkpoint folder of that family "
                "(build a tiny one with: medvlm model init --preset tiny-<family> --out DIR)"
            )
        return None
    if read_json(Path(path) / CONFIG_FILE).get("model_type") == "medvlm":
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

    if cfg.tune == "qlora":
        check_qlora_platform()
        raise MedvlmError(f"tune: qlora on model families ({family}) is not supported yet; use tune: lora")
    self_training = cfg.stage in SELF_TRAINING
    refused = {
        "packing": (cfg.packing, "a family's vision tokens and position ids are per sample; set packing: false"),
        "feature_cache": (
            cfg.feature_cache == "on",
            "the frozen-tower feature cache is native-model only; use auto or off",
        ),
        "template": (
            cfg.template is not None,
            "a family uses its own chat template (llava: the one in the checkpoint)",
        ),
        "pretrain_projector": (cfg.pretrain_projector is not None, "native-model projector files only"),
        "projector_type": (cfg.projector_type is not None, "a family checkpoint keeps its own connector"),
        "model_kwargs": (bool(cfg.model_kwargs), "a family checkpoint is loaded as saved"),
        "tune_im_start_end": (bool(cfg.tune_im_start_end), "native models with <im_start>/<im_end> only"),
        "projector_lr": (
            cfg.projector_lr is not None and not self_training,
            "per-part learning rates in align/sft are native-model only for now (sq/dpo have them)",
        ),
        "vit_lora_grad": (
            self_training and cfg.vit_lora_grad == "published",
            "the published no-grad tower reproduces STLLaVA-Med's native model; use vit_lora_grad: trained",
        ),
        "ref_visual_path": (
            cfg.stage == "dpo" and cfg.ref_visual_path == "policy",
            "a family's reference sees images through its own frozen tower; use ref_visual_path: frozen",
        ),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise MedvlmError(f"{key} does not apply to model family {family}: {why}")


def family_plan(cfg: TrainConfig) -> tuple[dict[str, bool], LoraSpec | None, LoraSpec | None]:
    """``({part: trains fully}, LM LoRA, tower LoRA)`` for the run's stage and ``tune_*`` / ``vit_lora*`` keys."""
    connector = True if cfg.tune_projector is None else cfg.tune_projector
    vision = bool(cfg.tune_vision_tower)
    if cfg.stage == "align":
        return {"connector": True, "vision_tower": vision, "language_model": bool(cfg.tune_language_model)}, None, None
    lora = cfg.tune == "lora"
    lm_lora = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)) if lora else None
    if cfg.stage in SELF_TRAINING:
        parts = {"connector": cfg.tune_projector is not False, "vision_tower": vision, "language_model": not lora}
        tower = vit_spec(cfg)
        if not (any(parts.values()) or lm_lora or tower):
            raise MedvlmError(f"stage {cfg.stage!r}: nothing to train")
        return parts, lm_lora, tower
    if lora and cfg.tune_language_model is False:
        raise MedvlmError("tune: lora adds adapters to the language model; tune_language_model: false contradicts it")
    lm = (True if cfg.tune_language_model is None else cfg.tune_language_model) and not lora
    tower = vit_spec(cfg)  # sft: off unless vit_lora: true
    if not (connector or lm or lora or vision or tower):
        raise MedvlmError("nothing to train: connector, language model and vision tower are all frozen")
    return {"connector": connector, "vision_tower": vision, "language_model": lm}, lm_lora, tower


def _linear_modules(model: torch.nn.Module, spec: FamilySpec, part: str) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and part_of(spec, n + ".weight") == part
    ]


def lm_lora_regex(model: torch.nn.Module, spec: FamilySpec, targets: list[str]) -> str:
    """A PEFT ``target_modules`` regex for the named linear layers inside the family's language model only."""
    lm_prefix = spec.language_model[0]
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(lm_prefix)
        }
    )
    missing = [t for t in targets if t not in names]
    if missing:
        raise MedvlmError(
            f"lora_target_modules {missing} match no linear layer of the {spec.name} language model; "
            f"its linear layers are: {', '.join(names)}"
        )
    return "^" + re.escape(lm_prefix) + r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"


def tower_lora_regex(model: torch.nn.Module, spec: FamilySpec, targets: list[str]) -> str:
    """A PEFT ``target_modules`` regex for the vision tower's linear layers (the connector excluded).

    ``targets`` at the config default (CLIP's names) means every linear layer of the tower: each family names
    them differently (Qwen ``qkv``/``proj``, SigLIP ``q_proj``..``fc2``); an explicit list must match.
    """
    modules = _linear_modules(model, spec, "vision_tower")
    names = sorted({n.rsplit(".", 1)[-1] for n in modules})
    if list(targets) != list(VIT_LINEAR_NAMES):
        missing = [t for t in targets if t not in names]
        if missing:
            raise MedvlmError(
                f"vit_lora_target_modules {missing} match no linear layer of the {spec.name} vision "
                f"tower; its linear layers are: {', '.join(names)}"
            )
        modules = [n for n in modules if n.rsplit(".", 1)[-1] in targets]
    if not modules:
        raise MedvlmError(f"vit_lora: the {spec.name} vision tower has no linear layer to adapt; set vit_lora: false")
    return "^(?:" + "|".join(re.escape(n) for n in modules) + ")$"


def apply_family_stage(model: torch.nn.Module, spec: FamilySpec, cfg: TrainConfig) -> tuple[torch.nn.Module, bool]:
    """Freeze / unfreeze by part, add LM (and tower) LoRA adapters; returns ``(model, lora)``."""
    parts, lm, tower = family_plan(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(parts[part_of(spec, name)])
    lora = lm is not None or tower is not None
    if lora:
        from peft import LoraConfig, get_peft_model

        patterns = []
        if lm is not None:
            lm.check("LM LoRA")
            patterns.append(lm_lora_regex(model, spec, lm.targets))
        if tower is not None:
            tower.check("ViT-LoRA")
            patterns.append(tower_lora_regex(model, spec, tower.targets))
        base = lm or tower
        both = lm is not None and tower is not None
        tower_key = re.escape(spec.vision_tower[0]) + ".*"  # PEFT matches rank/alpha patterns against module names
        lcfg = LoraConfig(
            r=base.r,
            lora_alpha=base.alpha,
            lora_dropout=base.dropout,
            bias=cfg.lora_bias,
            target_modules="|".join(f"(?:{p})" for p in patterns),
            rank_pattern={tower_key: tower.r} if both else {},
            alpha_pattern={tower_key: tower.alpha} if both else {},
        )
        model = get_peft_model(model, lcfg)
        # PEFT froze every base weight; the connector (and a fully tuned part) train fully, as in the native recipe.
        for name, p in model.get_base_model().named_parameters():
            if "lora_" not in name and parts[part_of(spec, name)]:
                p.requires_grad_(True)
        if both and tower.dropout != lm.dropout:
            _set_tower_dropout(model, spec, tower.dropout)
    if not any(p.requires_grad for p in model.parameters()):
        raise MedvlmError(f"stage {cfg.stage!r}: no parameter is trainable")
    return model, lora


def _set_tower_dropout(peft_model: torch.nn.Module, spec: FamilySpec, p: float) -> None:
    """The tower's LoRA layers get their own dropout (PEFT has one dropout per config)."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and part_of(spec, name + ".weight") == "vision_tower":
            for adapter in list(module.lora_dropout.keys()):
                module.lora_dropout[adapter] = torch.nn.Dropout(p=p) if p > 0 else torch.nn.Identity()


def family_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The Trainer's ``compute_loss_func`` for a family model:
    CE summed over the learned tokens / ``num_items_in_batch``.

    Qwen-VL and Gemma 3 declare ``accepts_loss_kwargs = False``, so the Trainer would average per-micro-batch means
    (a DDP or accumulated step then weights short answers more than one process does). Computing the loss here
    from the logits normalises by the learned tokens of the whole global batch, as the native model does.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    from medvlm.train.family_loss import labelled_positions

    logits = outputs["logits"]  # [B, T, V], or [N, V] from the labelled-positions head (train.family_loss)
    if logits.dim() == 2:
        # the batch carried a boolean ``logits_to_keep``: rows are the positions whose next token is learned,
        # in row-major order; their targets come from the same labels
        _, targets = labelled_positions(labels)
        return ForCausalLMLoss(
            logits, None, logits.shape[-1], num_items_in_batch=num_items_in_batch, shift_labels=targets
        )
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def family_part_of(spec: FamilySpec):
    """``name -> vision | projector | lm`` for a (possibly PEFT-prefixed) family parameter name (per-part lrs)."""
    names = {"connector": "projector", "vision_tower": "vision", "language_model": "lm"}

    def part(name: str) -> str:
        return names[part_of(spec, name.removeprefix("base_model.model."))]

    return part
