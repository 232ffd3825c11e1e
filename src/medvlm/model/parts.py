"""The three trainable parts of a medvlm model and helpers to freeze / count them.

Training stages are built on these: LLaVA stage 1 trains the projector only, stage 2 the
projector and the language model, STLLaVA-Med's stages add LoRA on the LM, etc.
"""

from __future__ import annotations

from torch import nn

from medvlm.errors import MedvlmError

PARTS: tuple[str, ...] = ("vision_tower", "projector", "language_model")


def _part(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of a medvlm model (a PEFT wrapper forwards attribute access to it)."""
    part = getattr(model, name, None)
    if not isinstance(part, nn.Module):
        raise MedvlmError(f"{type(model).__name__} has no {name!r} part; expected a medvlm model")
    return part


def set_trainable(model: nn.Module, vision_tower: bool, projector: bool, language_model: bool) -> None:
    """Set ``requires_grad`` of every parameter of each part (True = trained, False = frozen)."""
    for name, flag in zip(PARTS, (vision_tower, projector, language_model)):
        for p in _part(model, name).parameters():
            p.requires_grad_(flag)


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per part: ``(trainable parameters, total parameters)`` (tied parameters counted once)."""
    out: dict[str, tuple[int, int]] = {}
    for name in PARTS:
        params = list(_part(model, name).parameters())  # nn.Module.parameters() de-duplicates tied tensors
        out[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Per part total parameter count, plus ``total`` for the whole model."""
    counts = {name: total for name, (_, total) in trainable_summary(model).items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def trainable_parts(model: nn.Module) -> list[str]:
    """Names of the parts with at least one trainable parameter."""
    return [name for name, (trainable, _) in trainable_summary(model).items() if trainable]
