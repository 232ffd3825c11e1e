"""What STLLaVA-Med's two stages share (``stage: sq`` self-questioning, ``stage: dpo``), for the recipes
:mod:`medvlm.train.recipes.sq` and :mod:`medvlm.train.recipes.dpo`.

- Data (``sq``): the training files are read as in ``sft``; while a multimodal sample is loaded its later
  user turns become VUSER turns with probability ``sq_r`` (re-drawn each epoch, seeded), see
  :mod:`medvlm.data.sq`. A native model's template must be ``v1_sq`` (VUSER questions are learned); a model
  family's template learns VUSER turns by construction.
- Parameters: LoRA on the LM (``tune: lora``; or the whole LM with ``tune: full``), the projector
  fully trained, and ViT-LoRA on the tower (:mod:`medvlm.model.vit_lora`; families:
  :mod:`medvlm.train.family_stage`). Gradients reach the ViT-LoRA; ``vit_lora_grad: published`` reproduces
  the published code, whose tower runs under ``no_grad`` so its ViT-LoRA never trains (native model only).
  ``tune_vision_tower: true`` with ``vit_lora: false`` trains the whole tower instead (at ``vision_lr``; a
  named deviation for towers that must still learn to see, e.g. a randomly initialised one).
- Optimiser: three learning rates (``learning_rate`` for the LM/LM-LoRA, ``projector_lr``,
  ``vision_lr``), weight decay never on biases / norms.
- Output: LM-LoRA merged into the LM and ViT-LoRA into the tower: a plain checkpoint; the
  adapters are kept in ``adapter/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from medvlm.data.schema import Sample
from medvlm.data.sq import sq_rng, to_self_questioning
from medvlm.errors import MedvlmError
from medvlm.model.vit_lora import LoraSpec, apply_lora_adapters
from medvlm.train.config import TrainConfig
from medvlm.train.data import SupervisedDataset
from medvlm.train.optim import no_weight_decay
from medvlm.train.stages import vit_spec
from medvlm.train.trainer import MedVLMTrainer

VIT_LORA_GRAD_MODES: tuple[str, ...] = ("trained", "published")
SQ_TEMPLATE = "v1_sq"


# ---- data ----------------------------------------------------------------------------------------
class SelfQuestioningDataset(SupervisedDataset):
    """:class:`SupervisedDataset` whose samples get the VUSER conversion of the current epoch."""

    def __init__(self, base: SupervisedDataset, rate: float, seed: int):
        self.__dict__.update(base.__dict__)  # same files, index and processor; only `sample` differs
        self.rate = rate
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the conversions of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def sample(self, i: int) -> Sample:
        return to_self_questioning(super().sample(i), self.rate, sq_rng(self.seed, self.epoch, i))


class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts (the sampler, not the dataset, gets accelerate's ``set_epoch``)."""

    def __init__(self, dataset: SelfQuestioningDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
        return control


# ---- parameters ------------------------------------------------------------------------------------
def check_self_training(cfg: TrainConfig) -> None:
    """Checks shared by ``sq`` and ``dpo`` (a MedvlmError naming the key)."""
    if cfg.tune not in ("lora", "full"):
        raise MedvlmError(f"stage {cfg.stage!r} supports tune: lora (STLLaVA-Med) or full, not {cfg.tune!r}")
    if cfg.vit_lora_grad not in VIT_LORA_GRAD_MODES:
        raise MedvlmError(
            f"vit_lora_grad: unknown value {cfg.vit_lora_grad!r}; choose one of {', '.join(VIT_LORA_GRAD_MODES)}"
        )
    if cfg.tune_vision_tower and cfg.stage != "sq":
        raise MedvlmError(
            f"stage {cfg.stage!r} adapts the tower with ViT-LoRA (vit_lora); tune_vision_tower: true is "
            "only supported in stage 'sq'"
        )
    if cfg.tune_vision_tower and cfg.vit_lora_on():
        raise MedvlmError(
            "stage 'sq': tune_vision_tower: true trains the whole tower, so ViT-LoRA on it is redundant; "
            "set vit_lora: false (STLLaVA-Med's recipe is vit_lora: true, tune_vision_tower: false)"
        )
    if not 0.0 <= cfg.sq_r <= 1.0:
        raise MedvlmError(f"sq_r must be in [0, 1], got {cfg.sq_r}")


def apply_self_training_stage(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Freeze the base, add LM-LoRA (or train the whole LM), ViT-LoRA, and train the projector fully."""
    from medvlm.model.parts import set_trainable

    set_trainable(model, vision_tower=False, projector=False, language_model=False)
    lm = None
    save = ["projector"] if cfg.tune_projector is not False else []
    if cfg.tune_vision_tower:  # stage sq only (check_self_training): the whole tower, a deviation from the paper
        save.append("vision_tower")
    if cfg.tune == "lora":
        lm = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules))
    else:
        save.append("language_model")
    vision = vit_spec(cfg)
    if lm is None and vision is None:
        if not save:
            raise MedvlmError(f"stage {cfg.stage!r}: nothing to train")
        set_trainable(
            model,
            vision_tower="vision_tower" in save,
            projector="projector" in save,
            language_model="language_model" in save,
        )
        return model
    return apply_lora_adapters(model, lm, vision, modules_to_save=save or None)


def part_of(name: str) -> str:
    """``vision``, ``projector`` or ``lm`` for a (possibly PEFT-prefixed) parameter name."""
    dotted = f".{name}"
    if ".vision_tower." in dotted:
        return "vision"
    if ".projector." in dotted:
        return "projector"
    return "lm"


def self_training_groups(
    model: torch.nn.Module,
    weight_decay: float,
    projector_lr: float | None,
    vision_lr: float | None,
    part: Callable[[str], str] = part_of,
) -> list[dict[str, Any]]:
    """Torch param groups: LM (the run's lr), projector (``projector_lr``), vision (``vision_lr``), decay split.

    ``part`` maps a parameter name to ``vision`` / ``projector`` / ``lm`` (a family's: ``family_part_of``)."""
    lrs = {"lm": None, "projector": projector_lr, "vision": vision_lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = weight_decay > 0 and not no_weight_decay(name, p)
        groups.setdefault((part(name), decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        g: dict[str, Any] = {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}_{'decay' if decay else 'no_decay'}",
        }
        if lrs[part] is not None:
            g["lr"] = lrs[part]
        out.append(g)
    return out


class SelfTrainingTrainer(MedVLMTrainer):
    """``MedVLMTrainer`` with three learning rates and the ``published`` (no-grad tower) reproduction switch."""

    def __init__(
        self,
        *args: Any,
        vision_lr: float | None = None,
        vit_lora_grad: str = "trained",
        part: Callable[[str], str] = part_of,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.vision_lr = vision_lr
        self.vit_lora_grad = vit_lora_grad
        self.part = part

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from transformers import Trainer

            target = model if model is not None else self.model
            groups = self_training_groups(target, self.args.weight_decay, self.projector_lr, self.vision_lr, self.part)
            for g in groups:
                g.pop("name")
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def published_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower features computed under ``no_grad``, as the published code does (its ViT-LoRA gets no gradient)."""
        with torch.no_grad():
            return self._vlm(model).get_vision_features(pixel_values)  # [n_img, L, D_v]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (
            self.vit_lora_grad == "published"
            and inputs.get("pixel_values") is not None
            and "image_is_cached" not in inputs
        ):
            inputs = dict(inputs)
            inputs["vision_features"] = self.published_features(model, inputs.pop("pixel_values"))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


# ---- checks of the starting model ----------------------------------------------------------------
def check_sq_template(model, processor, family: str | None) -> None:
    """Stage ``sq`` needs a template that learns VUSER turns: ``v1_sq`` (native, llava family) or a family's own."""
    template = processor.template if family is not None else model.config.template
    if family is not None and template is None:
        return  # the family's marked chat template learns VUSER turns (rendered as user turns)
    if template != SQ_TEMPLATE:
        where = (
            f"set template: {SQ_TEMPLATE} (the run switches the model to it and the output checkpoint keeps it)"
            if family is None
            else f"build the llava checkpoint with template {SQ_TEMPLATE} (medvlm model init --template {SQ_TEMPLATE})"
        )
        raise MedvlmError(
            f"stage 'sq' needs a model with template {SQ_TEMPLATE!r} (VUSER turns); the starting model "
            f"uses {template!r}: {where}"
        )
