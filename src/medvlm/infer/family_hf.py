"""The engine's family for transformers image-text-to-text models (Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3,
llava-hf, LLaVA-OneVision), driven by the family's :class:`~medvlm.model.families.spec.FamilySpec` row.

Prompts are encoded by the family's :class:`~medvlm.model.families.processing.FamilyProcessor` with the
generation prompt; every tensor the processor returns (``pixel_values`` of any shape, ``image_grid_thw``,
``pixel_attention_mask``, ``token_type_ids``, ``mm_token_type_ids``, ...) travels with the prompt.

Prefill runs each row's whole prompt alone, unpadded, exactly as the model's own forward expects it (the
model builds its positions: M-RoPE from ``image_grid_thw``, Gemma 3's bidirectional image attention from
``token_type_ids``); the rows' caches are then left-padded into the running batch. These families do not
reuse prompt prefixes across questions (no prefix cache): correctness first. Decoding is batched; a
row's position is its prompt's largest position + 1 + tokens generated so far, which is what
``generate`` computes (``text position + rope_deltas`` for M-RoPE families, the unpadded token index
for the others).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from medvlm.errors import MedvlmError
from medvlm.infer.batching import PreparedPrompt
from medvlm.infer.family import NativeLlavaFamily, cache_layers
from medvlm.infer.kv import KVBuffer, Layers, concat_rows


class TransformersFamily:
    """A transformers ``*ForConditionalGeneration`` model with its :class:`FamilyProcessor`."""

    reuses_prefixes = False
    """Prefix KV reuse across questions is not implemented for these families (each prompt is prefilled whole)."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor
        self.spec = processor.spec
        # Decoding shares the native family's buffered-cache step (same transformers cache contract).
        self._decoder = NativeLlavaFamily(model, processor=None)

    # -- prompts -----------------------------------------------------------------------------------
    def stop_sequences(self) -> list[list[int]]:
        """The end-of-turn token and EOS."""
        return [[i] for i in self.processor.stop_token_ids]

    def stop_strings(self) -> list[str]:
        return []

    def suppress_ids(self) -> list[int]:
        """Image-layout tokens (never emitted as text)."""
        return sorted(self.processor.marker_ids)

    def prompt(self, feats: dict[str, Any]) -> PreparedPrompt:
        """A prompt from :meth:`FamilyProcessor.encode` features (generation prompt included)."""
        ids = feats["input_ids"].reshape(-1).long()
        extras = {k: v for k, v in feats.items() if k not in ("input_ids", "attention_mask", "labels")}
        for key in self.spec.token_tensors:  # per-token tensors: batch dim 1, as the processor returns them
            if key in extras:
                extras[key] = extras[key].reshape(1, -1)
        offset = 0
        if self.spec.rope_index and "image_grid_thw" in extras:
            # The same call (and arguments) generate's position preparation makes.
            _, deltas = self.model.model.get_rope_index(
                ids[None], image_grid_thw=extras["image_grid_thw"], attention_mask=torch.ones_like(ids)[None],
                mm_token_type_ids=extras["mm_token_type_ids"])
            offset = int(deltas.reshape(-1)[0])
        return PreparedPrompt(input_ids=ids, pixel_values=None, extras=extras, position_offset=offset)

    # -- forward hooks -----------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: Layers | None,
                extras: list[dict[str, Any] | None] | None = None) -> tuple[torch.Tensor, Layers]:
        """Each row's whole prompt (right-aligned in ``input_ids``) run alone; caches left-padded together."""
        if past is not None or pixel_values is not None:
            raise MedvlmError("internal: transformers families prefill whole prompts only (no reused prefix)")
        if extras is None or len(extras) != input_ids.shape[0]:
            raise MedvlmError("internal: every row needs its processor outputs")
        logits, parts = [], []
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            ids = input_ids[b, input_ids.shape[1] - n:][None]
            cache = DynamicCache()
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **(extras[b] or {}), cache=cache,
                             use_cache=True, logits_to_keep=1)
            logits.append(out.logits[:, -1, :])
            parts.append((cache_layers(cache), torch.ones(1, n, dtype=torch.bool)))
        layers, mask = concat_rows(parts)
        if mask.shape != attention_mask.shape or not bool((mask == attention_mask).all()):
            raise MedvlmError("internal: prefill expects right-aligned prompts without holes")
        return torch.cat(logits), layers

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               past: KVBuffer) -> torch.Tensor:
        """One batched step; ``position_ids`` ``[B, 1]`` (M-RoPE models expand them to all three axes, as in
        ``generate``'s decoding steps)."""
        return self._decoder.decode(input_ids, attention_mask, position_ids, past)
