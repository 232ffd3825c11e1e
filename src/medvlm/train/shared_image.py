"""One image, several questions, each trained as if alone: a shared image prefix with per-question attention.

A merged conversation (``group_by_image``) holds one image and its questions. With ``isolate_questions`` it is
split back into single-question samples (:func:`medvlm.data.benchmarks.group.split_merged`), each encoded exactly
as a single-question sample (and as evaluation asks); their common token prefix - template start, image tokens - is
laid out once, followed by every question-and-answer suffix (:func:`shared_prefix_row`). Each suffix attends to the
prefix and to itself only (:func:`segment_attention_mask`), and its positions continue from the prefix as they would
alone, so every answer's logits equal those of its sample trained alone (tested), while the image goes through the
tower and the prefix through the LM once per image instead of once per question.

Unlike a plain merged conversation, no answer can follow from another answer's text: the shortcut that made
merged training fit its images without reading them (``ScratchRecipe.sft_group_by_image``) is gone.
"""

from __future__ import annotations

from typing import Any

import torch

from medvlm.data.collate import IGNORE_INDEX
from medvlm.data.templates import Encoded
from medvlm.errors import MedvlmError

PAD_SEGMENT = -1
"""Segment id of padding: it attends to itself only, and nothing attends to it."""


def shared_prefix_row(encoded: list[Encoded], image_token_id: int, where: str) -> dict[str, list[int]]:
    """Lay single-question encodings of one image out as one row: their common prefix, then each suffix.

    Returns ``input_ids``, ``labels``, ``position_ids`` and ``segment_ids`` (0 = the shared prefix, ``i`` = the
    ``i``-th question). The prefix ends before the first learned token of any encoding, so each suffix starts
    with an unlearned token and no loss term predicts across suffixes; every image token must lie in the prefix.
    """
    if not encoded:
        raise MedvlmError(f"{where}: no question to lay out")
    ids = [e.input_ids for e in encoded]
    learned = [next((t for t, lab in enumerate(e.labels) if lab != IGNORE_INDEX), len(e.labels)) for e in encoded]
    first_learned = min(learned)
    common = 0
    shortest = min(len(x) for x in ids)
    while common < shortest and all(x[common] == ids[0][common] for x in ids):
        common += 1
    prefix = min(common, first_learned - 1, shortest - 1) if len(encoded) > 1 else len(ids[0])
    if prefix < 0 or any(image_token_id in x[prefix:] for x in ids):
        raise MedvlmError(
            f"{where}: isolate_questions needs the image before every question's text (the image tokens must lie in "
            "the part all questions share); set isolate_questions: false"
        )
    row = {
        "input_ids": list(ids[0][:prefix]),
        "labels": list(encoded[0].labels[:prefix]),
        "position_ids": list(range(prefix)),
        "segment_ids": [0] * prefix,
    }
    for i, e in enumerate(encoded):
        n = len(e.input_ids) - prefix
        if n <= 0:
            continue  # a single encoding is all prefix
        row["input_ids"] += e.input_ids[prefix:]
        row["labels"] += [IGNORE_INDEX] + e.labels[prefix + 1 :]  # unlearned already (prefix < first learned)
        row["position_ids"] += list(range(prefix, prefix + n))
        row["segment_ids"] += [i + 1] * n
    return row


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` segment ids -> ``[B, 1, T, T]`` boolean mask (True = attend).

    Query ``q`` sees key ``k`` when ``k <= q`` and ``k`` is in the shared prefix (segment 0) or in ``q``'s own
    segment; padding (:data:`PAD_SEGMENT`) sees only itself, so no softmax row is empty.
    """
    seg_q = segment_ids[:, :, None]  # [B, T, 1]
    seg_k = segment_ids[:, None, :]  # [B, 1, T]
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # [T, T]
    real = (seg_q != PAD_SEGMENT) & (seg_k != PAD_SEGMENT)  # [B, T, T]
    allowed = causal & real & ((seg_k == 0) | (seg_k == seg_q))  # [B, T, T]
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)  # padding rows keep their own key
    return allowed[:, None]  # [B, 1, T, T]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4-D mask as the additive one every attention implementation takes (0 / dtype min).

    transformers uses a 4-D mask as given; eager attention adds it to the scores, so a boolean one would be wrong.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def model_mask(mask: torch.Tensor | None, model: torch.nn.Module) -> torch.Tensor | None:
    """A batch's ``attention_mask`` as the model takes it: a boolean 4-D one (shared-image rows) made additive in the
    model's floating dtype; any other mask unchanged. Used by the Trainer and the manual (FSDP2 / DeepSpeed) loops."""
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return mask
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return additive_mask(mask, dtype)


def collate_segments(features: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """Add right-padded ``position_ids`` and the boolean 4-D ``attention_mask`` of shared-prefix rows to a padded
    batch (the trainer makes it additive in the model's dtype: :func:`additive_mask`)."""
    width = batch["input_ids"].shape[1]
    pos = torch.zeros((len(features), width), dtype=torch.long)  # [B, T]
    seg = torch.full((len(features), width), PAD_SEGMENT, dtype=torch.long)  # [B, T]
    for r, f in enumerate(features):
        n = len(f["segment_ids"])
        pos[r, :n] = torch.as_tensor(f["position_ids"])
        seg[r, :n] = torch.as_tensor(f["segment_ids"])
    return {**batch, "position_ids": pos, "attention_mask": segment_attention_mask(seg)}
