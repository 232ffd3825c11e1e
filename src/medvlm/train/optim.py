"""Optimizer parameter groups: weight decay only where it belongs, an optional projector learning rate.

HF Trainer's own grouping excludes biases and norm weights from decay; medvlm adds two rules:
the ``<im_start>``/``<im_end>`` embedding rows trained in stage 1 live in a full embedding matrix
whose other rows must stay bit-identical, so that matrix never gets decay (AdamW decay would shrink
the frozen rows); and the projector may use its own learning rate (``projector_lr``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ParamGroupSpec:
    """How one class of parameters is optimised."""

    name: str
    """Group label (for logs and tests)."""
    params: list[nn.Parameter]
    """The parameters (trainable only)."""
    weight_decay: float
    """Decoupled weight decay of the group."""
    lr: float | None = None
    """Learning rate if different from the run's."""


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters kept out of weight decay: biases, norm scales and every other 1-D parameter."""
    # 1-D includes the cluster projector's sim_alpha/beta; the name test catches norm weights stored 2-D.
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    projector_lr: float | None = None,
    row_masked: set[int] | None = None,
) -> list[ParamGroupSpec]:
    """Group the trainable parameters of ``model``.

    ``row_masked`` holds ``id()`` s of parameters whose gradient is row-masked (only some rows learn);
    they are kept out of weight decay so the other rows stay exactly as they were.
    """
    row_masked = row_masked or set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_proj = projector_lr is not None and (name.startswith("projector.") or ".projector." in name)
        decay = weight_decay > 0 and not no_weight_decay(name, p) and id(p) not in row_masked
        groups.setdefault((is_proj, decay), []).append(p)
    out = []
    for (is_proj, decay), params in sorted(groups.items()):
        label = ("projector" if is_proj else "model") + ("_decay" if decay else "_no_decay")
        out.append(ParamGroupSpec(label, params, weight_decay if decay else 0.0, projector_lr if is_proj else None))
    return out


def to_torch_groups(specs: list[ParamGroupSpec]) -> list[dict]:
    """Param-group dicts for a torch optimizer."""
    groups = []
    for s in specs:
        g: dict = {"params": s.params, "weight_decay": s.weight_decay}
        if s.lr is not None:
            g["lr"] = s.lr
        groups.append(g)
    return groups
