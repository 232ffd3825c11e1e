"""Packing (padding-free batches): several encoded samples share one row, each attending only to itself.

A micro-batch's samples are laid, in order, into rows of at most ``pack_length`` tokens (greedy: a
sample that does not fit starts a new row). Within a row, ``position_ids`` restart at 0 for every
sample, and the first label of every sample is ``-100`` so no loss term predicts across a boundary
(the LM shifts labels by one: the last token of sample A would otherwise be trained to predict the
first token of sample B). Rows are right-padded to the longest row with one padding run whose
positions also restart at 0, so the padding is a separate "sample" with no labels.

No ``attention_mask`` is emitted: transformers (``masking_utils.find_packed_sequence_indices``) then
reads the sample boundaries from the position restarts and builds a block-diagonal causal mask for
``sdpa``/``eager``/``flex``; ``flash_attention_2`` derives its varlen ``cu_seqlens`` from the same
``position_ids``. That only happens without a KV cache, so the training forward runs with
``use_cache=False``. Images stay in sample order, so the i-th image still fills the i-th run of
``<image>`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from medvlm.data.collate import IGNORE_INDEX
from medvlm.errors import MedvlmError


def pack_rows(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Greedy, order-keeping split of sample indices into rows of at most ``pack_length`` tokens."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if n > pack_length:
            raise MedvlmError(f"packing: sample {i} has {n} tokens, more than pack_length {pack_length}")
        if rows and used + n <= pack_length:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return rows


def pack_features(features: list[dict[str, Any]], pad_token_id: int, pack_length: int) -> dict[str, Any]:
    """Collate features (collate contract: ``input_ids``, ``labels``, ``pixel_values``) into packed rows.

    Returns ``input_ids``, ``labels``, ``position_ids`` (each ``[rows, T]``) and ``pixel_values``
    (all images in sample order) when any sample has images.
    """
    if not features:
        raise MedvlmError("packing: empty micro-batch")
    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]  # each [L_i]
    labels = []
    for i, f in enumerate(features):
        lab = torch.as_tensor(f["labels"], dtype=torch.long).clone()  # [L_i]
        if lab.shape != ids[i].shape:
            raise MedvlmError(f"packing: feature {i} has labels {tuple(lab.shape)} but input_ids {tuple(ids[i].shape)}")
        lab[0] = IGNORE_INDEX  # no prediction crosses into this sample from the previous one
        labels.append(lab)
    rows = pack_rows([int(x.numel()) for x in ids], pack_length)
    width = max(sum(int(ids[i].numel()) for i in row) for row in rows)
    out_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [R, T]
    out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [R, T]
    out_pos = torch.zeros((len(rows), width), dtype=torch.long)  # [R, T]
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = int(ids[i].numel())
            out_ids[r, at : at + n] = ids[i]
            out_labels[r, at : at + n] = labels[i]
            out_pos[r, at : at + n] = torch.arange(n)
            at += n
        out_pos[r, at:] = torch.arange(width - at)  # the padding run: its own block, no labels
    batch: dict[str, Any] = {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}
    images = [torch.as_tensor(f["pixel_values"]) for f in features if f.get("pixel_values") is not None]
    if images:
        batch["pixel_values"] = torch.cat(images)  # [n_img, 3, H, W]
    return batch
