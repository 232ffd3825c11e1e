"""LoRA on the language model and on the vision tower (STLLaVA-Med's ViT-LoRA), as one PEFT model.

STLLaVA-Med trains LoRA adapters on every attention and MLP projection of the LM (r 128, alpha 256,
dropout 0.05) *and* on ``q/k/v/out_proj`` and ``fc1/fc2`` of the CLIP encoder layers (r 32, alpha 64,
dropout 0.2 in stage 1 and 0.1 in DPO), with the projector fully trained. Both adapter sets live in
one PEFT ``LoraConfig`` (one adapter named ``default``): the vision layers get their own rank and
alpha through ``rank_pattern`` / ``alpha_pattern``, and their own dropout module right after
injection (PEFT has no per-module dropout option). ``merge_and_unload`` therefore merges the LM
adapters into the LM and the ViT adapters into the tower, and the result is a plain medvlm model.

Only encoder layers that feed the selected feature layer (``vision_feature_layer``) get ViT adapters:
layers after it never receive a gradient, so adapters there would stay zero (the published code adds
them and they merge to nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from medvlm.errors import MedvlmError

LM_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass
class LoraSpec:
    """One adapter set: rank, scaling, dropout and the linear-layer names it targets."""

    r: int
    """LoRA rank."""
    alpha: int
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float
    """Dropout on the LoRA branch input."""
    targets: list[str] = field(default_factory=list)
    """Linear-layer names (last component of the module path) that get adapters."""

    def check(self, what: str) -> None:
        """Raise a MedvlmError naming ``what`` for an invalid spec."""
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.targets:
            raise MedvlmError(
                f"{what}: need r >= 1, alpha > 0, 0 <= dropout < 1 and targets "
                f"(got r={self.r}, alpha={self.alpha}, dropout={self.dropout}, targets={self.targets})"
            )


def used_tower_layers(model: nn.Module) -> int:
    """How many encoder layers feed the selected feature layer (``hidden_states[k]`` = output of k layers)."""
    layer = model.config.vision_feature_layer
    n_layers = model.config.vision_config.num_hidden_layers
    return layer + n_layers + 1 if layer < 0 else layer


def _linear_names(module: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def _check_targets(module: nn.Module, targets: list[str], what: str) -> None:
    names = _linear_names(module)
    missing = [t for t in targets if t not in names]
    if missing:
        raise MedvlmError(
            f"{what} targets {missing} match no linear layer; its linear layers are: {', '.join(sorted(names))}"
        )


def lm_target_regex(targets: list[str]) -> str:
    """Regex (PEFT full match) of the LM linear layers named ``targets``."""
    return r"language_model\..*\.(" + "|".join(re.escape(t) for t in targets) + r")"


def vit_target_regex(model: nn.Module, targets: list[str]) -> str:
    """Regex of the tower linear layers named ``targets`` in the encoder layers that feed the features."""
    used = used_tower_layers(model)
    if used < 1:
        raise MedvlmError(
            f"vision_feature_layer {model.config.vision_feature_layer} uses no encoder layer: "
            "ViT-LoRA has nothing to adapt"
        )
    layers = "|".join(str(i) for i in range(used))
    return r"vision_tower\..*encoder\.layers\.(" + layers + r")\..*\.(" + "|".join(re.escape(t) for t in targets) + r")"


def apply_lora_adapters(
    model: nn.Module,
    lm: LoraSpec | None,
    vision: LoraSpec | None,
    modules_to_save: list[str] | None = None,
    bias: str = "none",
) -> nn.Module:
    """Wrap a medvlm model in PEFT with LoRA on the LM (``lm``) and/or the tower (``vision``).

    ``modules_to_save`` (e.g. ``["projector"]``) are trained fully and saved with the adapter; ``bias`` is
    PEFT's (``none`` | ``all`` | ``lora_only``).
    Returns the ``PeftModel``; only adapters and ``modules_to_save`` are trainable.
    """
    from peft import LoraConfig, get_peft_model

    if lm is None and vision is None:
        raise MedvlmError("apply_lora_adapters: neither LM nor vision LoRA requested")
    patterns: list[str] = []
    if lm is not None:
        lm.check("LM LoRA")
        _check_targets(model.language_model, lm.targets, "lora_target_modules (language model)")
        patterns.append(lm_target_regex(lm.targets))
    if vision is not None:
        vision.check("ViT-LoRA")
        _check_targets(model.vision_tower, vision.targets, "vit_lora_target_modules (vision tower)")
        patterns.append(vit_target_regex(model, vision.targets))
    base = lm or vision
    vit_key = r"vision_tower\..*"
    cfg = LoraConfig(
        r=base.r,
        lora_alpha=base.alpha,
        lora_dropout=base.dropout,
        target_modules="^(?:" + "|".join(patterns) + ")$",
        rank_pattern={vit_key: vision.r} if vision is not None and lm is not None else {},
        alpha_pattern={vit_key: vision.alpha} if vision is not None and lm is not None else {},
        modules_to_save=modules_to_save or None,
        bias=bias,
    )
    peft_model = get_peft_model(model, cfg)
    if vision is not None and lm is not None and vision.dropout != lm.dropout:
        set_tower_lora_dropout(peft_model, vision.dropout)
    return peft_model


def set_tower_lora_dropout(peft_model: nn.Module, p: float) -> int:
    """Give every LoRA layer inside the vision tower dropout ``p`` (PEFT has one dropout per config);
    returns the count."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ".vision_tower." in f".{name}":
            for adapter in list(module.lora_dropout.keys()):
                module.lora_dropout[adapter] = nn.Dropout(p=p) if p > 0 else nn.Identity()
            n += 1
    return n


def lora_parameter_names(peft_model: nn.Module, part: str) -> list[str]:
    """Names of the LoRA parameters inside ``part`` (``vision_tower`` or ``language_model``)."""
    return [n for n, _ in peft_model.named_parameters() if "lora_" in n and f".{part}." in f".{n}"]
