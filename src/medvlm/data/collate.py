"""Batch collation for medvlm features (the output of ``MedVLMProcessor.encode``).

A feature is
``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": FloatTensor[n_img, 3, H, W] | None}``
(``labels`` may be absent for generation; ``pixel_values`` absent or ``None`` for text-only samples).
The batch pads ``input_ids`` with ``pad_token_id``, ``labels`` with -100 and ``attention_mask`` with 0,
on the right (training) or the left (generation), and concatenates all images in sample order, so
the i-th image of the batch belongs to the i-th image part in reading order across the samples.

Model families (:mod:`medvlm.model.families`) return more tensors; the collator is told their names:
``token_keys`` are per-token ([L], e.g. Qwen's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) and
are padded like ``input_ids`` with 0 (a feature without one gets zeros); ``image_keys`` are per-image or
per-sample tensors of any shape (``pixel_values`` [patches, D] or [n, crops, 3, H, W], ``image_grid_thw``,
``pixel_attention_mask``, ``image_sizes``, ``batch_num_images``) and are concatenated along dim 0 after
zero-padding every other dim to the batch maximum (the models drop all-zero crops / use the sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medvlm.errors import MedvlmError

IGNORE_INDEX = -100
_KNOWN_KEYS = frozenset({"input_ids", "labels", "attention_mask", "pixel_values"})


@dataclass(frozen=True)
class VLMCollator:
    """Pad and stack features into a batch of tensors."""

    pad_token_id: int
    """Id written into padded ``input_ids`` positions (masked out by ``attention_mask``)."""
    padding_side: str = "right"
    """``right`` for training, ``left`` for batched generation (prompts end at the same position)."""
    pad_to_multiple_of: int | None = None
    """Round the padded length up to a multiple of this (e.g. 8 for tensor-core friendly shapes)."""
    token_keys: tuple[str, ...] = ()
    """Per-token tensors ([L]) padded like ``input_ids`` with 0 (a model family's ``mm_token_type_ids``...)."""
    image_keys: tuple[str, ...] = ()
    """Tensors zero-padded to the batch maximum in every dim but the first, then concatenated along dim 0.
    Empty: ``pixel_values`` must be [n_img, C, H, W] of one size (the native model)."""

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise MedvlmError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise MedvlmError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        clash = set(self.token_keys) & (set(self.image_keys) | {"input_ids", "labels", "attention_mask"})
        if clash:
            raise MedvlmError(f"collator keys {sorted(clash)} are declared twice")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``features`` into ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` and the declared
        ``token_keys`` / ``image_keys``."""
        import torch

        if not features:
            raise MedvlmError("VLMCollator got an empty list of features")
        ids_list, labels_list, masks, images = [], [], [], []
        known = _KNOWN_KEYS | set(self.token_keys) | set(self.image_keys)
        extra: dict[str, list[Any]] = {k: [] for k in (*self.token_keys, *self.image_keys)}
        with_labels = ["labels" in f and f["labels"] is not None for f in features]
        if any(with_labels) and not all(with_labels):
            raise MedvlmError("VLMCollator: some features have labels and some do not; batch them separately")
        for i, f in enumerate(features):
            unknown = set(f) - known
            if unknown:
                raise MedvlmError(f"feature {i}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
            if "input_ids" not in f:
                raise MedvlmError(f"feature {i}: missing 'input_ids'")
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)  # [L]
            if ids.dim() != 1 or ids.numel() == 0:
                raise MedvlmError(
                    f"feature {i}: 'input_ids' must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}"
                )
            ids_list.append(ids)
            mask = f.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)  # [L]
            if mask.shape != ids.shape:
                raise MedvlmError(
                    f"feature {i}: 'attention_mask' has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}"
                )
            masks.append(mask)
            if with_labels[i]:
                labels = torch.as_tensor(f["labels"], dtype=torch.long)  # [L]
                if labels.shape != ids.shape:
                    raise MedvlmError(
                        f"feature {i}: 'labels' has shape {tuple(labels.shape)} but 'input_ids' has {tuple(ids.shape)}"
                    )
                labels_list.append(labels)
            for key in self.token_keys:
                t = f.get(key)
                t = torch.zeros_like(ids) if t is None else torch.as_tensor(t)  # [L]
                if t.shape != ids.shape:
                    raise MedvlmError(f"feature {i}: {key!r} has shape {tuple(t.shape)}, input_ids {tuple(ids.shape)}")
                extra[key].append(t)
            for key in self.image_keys:
                if f.get(key) is not None:
                    extra[key].append(torch.as_tensor(f[key]))
            pv = None if self.image_keys else f.get("pixel_values")
            if pv is not None:
                pv = torch.as_tensor(pv)
                if pv.dim() != 4:
                    raise MedvlmError(f"feature {i}: 'pixel_values' must be [n_img, C, H, W], got {tuple(pv.shape)}")
                if images and pv.shape[1:] != images[0].shape[1:]:
                    raise MedvlmError(
                        f"feature {i}: image size {tuple(pv.shape[1:])} differs from {tuple(images[0].shape[1:])} "
                        "earlier in the batch"
                    )
                images.append(pv)

        length = max(x.numel() for x in ids_list)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids_list, length, self.pad_token_id),  # [B, L]
            "attention_mask": self._pad(masks, length, 0),  # [B, L]
        }
        if labels_list:
            batch["labels"] = self._pad(labels_list, length, IGNORE_INDEX)  # [B, L]
        if images:
            batch["pixel_values"] = torch.cat(images, dim=0)  # [sum n_img, C, H, W]
        for key in self.token_keys:
            batch[key] = self._pad(extra[key], length, 0)  # [B, L]
        for key in self.image_keys:
            if extra[key]:
                batch[key] = _pad_cat(key, extra[key])
        return batch

    def _pad(self, seqs: list[Any], length: int, value: int) -> Any:
        import torch

        out = torch.full((len(seqs), length), value, dtype=torch.long)  # [B, L]
        for row, s in enumerate(seqs):
            if self.padding_side == "right":
                out[row, : s.numel()] = s
            else:
                out[row, length - s.numel() :] = s
        return out


def _pad_cat(key: str, tensors: list[Any]) -> Any:
    """Concatenate along dim 0 after zero-padding every other dim to the maximum over ``tensors``."""
    import torch

    ndim = tensors[0].dim()
    if any(t.dim() != ndim for t in tensors) or ndim == 0:
        raise MedvlmError(f"{key!r}: the samples' tensors have different ranks {sorted({t.dim() for t in tensors})}")
    shape = [max(t.shape[d] for t in tensors) for d in range(1, ndim)]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            out = t.new_zeros((t.shape[0], *shape))
            out[tuple(slice(0, n) for n in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=0)
