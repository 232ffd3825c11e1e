"""Labelled-positions LM head for model families: logits only where a label is learned.

A family model's training forward (``*ForConditionalGeneration.forward``) runs the vision tower, merges the
image features, builds the positions (Qwen's M-RoPE lives in the inner ``model.model`` forward in transformers
5.25), runs the LM, then applies ``lm_head`` to every position and takes the causal-LM loss. With image tokens
dominating a VQA sample and answers of a few tokens, almost every ``[.., vocab]`` row of that head is computed
for nothing. transformers' documented ``logits_to_keep`` argument accepts a boolean ``[batch, seq]`` mask
(``modeling_utils.slice_logits_to_keep``: the kept rows, flattened), and its causal-LM loss accepts
``shift_labels`` (the already shifted targets): together they give the same loss with the head applied only
at the positions whose next token is learned. Everything still goes through the model's own ``forward``
(DDP / PEFT wrappers, M-RoPE, Gemma 3's training attention mask and the loss's ``num_items_in_batch``
normalisation stay the library's).

Used as a collator wrapper (:class:`LabelledPositionsCollator`) so the trainer's loss path is unchanged: the
batch simply carries ``logits_to_keep`` and ``shift_labels`` next to ``labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

IGNORE_INDEX = -100


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)`` for ``labels`` [B, L]: ``keep`` [B, L] bool marks the positions whose *next* token is
    learned; ``targets`` [N] are those next tokens, in ``keep``'s row-major order (N = ``keep.sum()``)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, L]: target of position t
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def add_labelled_positions(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` plus ``logits_to_keep`` (bool [B, L]) and ``shift_labels`` ([N]) for its ``labels``.

    A batch without labels, or whose labels learn nothing, is returned unchanged (full logits: an empty
    selection would make the head's output shapeless, and such a batch has no loss to save work on).
    """
    labels = batch.get("labels")
    if labels is None:
        return batch
    keep, targets = labelled_positions(labels)
    if not bool(keep.any()):
        return batch
    return {**batch, "logits_to_keep": keep, "shift_labels": targets}


class LabelledPositionsCollator:
    """Wrap a family collator so every training batch asks the model for labelled-position logits only."""

    def __init__(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.base = base

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return add_labelled_positions(self.base(features))


def family_collator(base: Callable[[list[dict[str, Any]]], dict[str, Any]], labelled_logits_only: bool) -> Callable:
    """The training collator for a family run: ``base`` wrapped when ``labelled_logits_only`` (the config key)."""
    return LabelledPositionsCollator(base) if labelled_logits_only else base
