"""The engine's family for transformers image-text-to-text models (Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3,
llava-hf, LLaVA-OneVision), driven by the family's :class:`~medvlm.model.families.spec.FamilySpec` row.

Prompts are encoded by the family's :class:`~medvlm.model.families.processing.FamilyProcessor` with the
generation prompt; every tensor the processor returns (``pixel_values`` of any shape, ``image_grid_thw``,
``pixel_attention_mask``, ``token_type_ids``, ``mm_token_type_ids``, ...) travels with the prompt.

Prompt prefixes are shared. A prompt's images and every token before them form one image block (from
its first image marker to its last, with a digest of all the processor's image tensors), so a reused
prefix always covers the whole image prefix or lies after it. A chunk holding images is run alone,
unpadded, from the start of its prompt with the processor's tensors, exactly as the model's own forward
expects it (the model builds its positions: M-RoPE from ``image_grid_thw``, Gemma 3's bidirectional
image attention from ``token_type_ids``, Qwen3-VL's deepstack features); its cache is then left-padded
into the batch. Text after the last image (questions that share an image prefix, later chat turns, the
decoding steps) is batched, with explicit positions: a text token after the last image sits at its
index + ``rope_deltas`` on all three M-RoPE axes (``PreparedPrompt.position_offset``; 0 for the other
families), which is what ``generate`` computes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import DynamicCache

from medvlm.errors import MedvlmError
from medvlm.infer.batching import PreparedPrompt
from medvlm.infer.family import NativeLlavaFamily, cache_layers
from medvlm.infer.kv import KVBuffer, Layers, concat_rows


class TransformersFamily:
    """A transformers ``*ForConditionalGeneration`` model with its :class:`FamilyProcessor`."""

    reuses_prefixes = True
    """Image prefixes and earlier chat turns are served from the engine's prefix cache
    (cut only after the last image)."""

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
                ids[None],
                image_grid_thw=extras["image_grid_thw"],
                attention_mask=torch.ones_like(ids)[None],
                mm_token_type_ids=extras["mm_token_type_ids"],
            )
            offset = int(deltas.reshape(-1)[0])
        spans, digests = self._image_block(ids, extras)
        return PreparedPrompt(
            input_ids=ids, pixel_values=None, spans=spans, digests=digests, extras=extras, position_offset=offset
        )

    def _image_block(
        self, ids: torch.Tensor, extras: dict[str, Any]
    ) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...]]:
        """All of a prompt's images as ONE block (first marker to last) with one digest of every image tensor.

        Families lay image tensors out differently (Qwen's flattened patches, Idefics3's tiles), so they are
        not split per image: a cached prefix is reused only if all its images are identical, and a prompt's
        images are always prefilled together from its start (M-RoPE positions and Gemma 3's bidirectional
        image attention are computed by the model over the whole image prefix).
        """
        markers = torch.tensor(sorted(self.processor.marker_ids), dtype=torch.long)
        where = torch.isin(ids, markers).nonzero().squeeze(1)
        if where.numel() == 0:
            return (), ()
        h = hashlib.blake2b(digest_size=16)
        for key in self.spec.image_tensors:
            if key in extras and isinstance(extras[key], torch.Tensor):
                t = extras[key].detach().to("cpu").contiguous()
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
                h.update(t.numpy().tobytes())
        return ((int(where[0]), int(where[-1]) + 1),), (h.hexdigest(),)

    # -- forward hooks -----------------------------------------------------------------------------
    def prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Layers | None,
        extras: list[dict[str, Any] | None] | None = None,
    ) -> tuple[torch.Tensor, Layers]:
        """Rows with processor outputs (a chunk from the start of its prompt) run alone, unpadded; the other rows
        (text after the last image, on top of ``past``) run batched with the given mask and positions."""
        if pixel_values is not None:
            raise MedvlmError("internal: transformers families take their images from the processor outputs")
        extras = extras or [None] * input_ids.shape[0]
        width = attention_mask.shape[1]
        alone = [b for b, e in enumerate(extras) if e is not None]
        text = [b for b, e in enumerate(extras) if e is None]
        logits: list[torch.Tensor | None] = [None] * input_ids.shape[0]
        parts: list[tuple[Layers, torch.Tensor] | None] = [None] * input_ids.shape[0]
        for b in alone:
            n = int(attention_mask[b].sum())
            if past is not None and bool(attention_mask[b, : width - input_ids.shape[1]].any()):
                raise MedvlmError("internal: a chunk with images must start its prompt (no reused prefix)")
            ids = input_ids[b, input_ids.shape[1] - n :][None]
            feats = {k: (v[:, :n] if k in self.spec.token_tensors else v) for k, v in extras[b].items()}
            cache = DynamicCache()
            out = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **feats,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits[b] = out.logits[:, -1, :]
            parts[b] = (cache_layers(cache), torch.ones(1, n, dtype=torch.bool))
        if text:
            index = torch.tensor(text, dtype=torch.long)
            cols = attention_mask.shape[1] - input_ids.shape[1]
            rows_past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in past] if past else None
            cache = DynamicCache(ddp_cache_data=rows_past) if rows_past and cols else DynamicCache()
            # Explicit 2-D positions: M-RoPE models expand them to all three axes (text after the last image).
            out = self.model(
                input_ids=input_ids.index_select(0, index),
                attention_mask=attention_mask.index_select(0, index),
                position_ids=position_ids.index_select(0, index),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            layers = cache_layers(cache)
            for j, b in enumerate(text):
                logits[b] = out.logits[j : j + 1, -1, :]
                parts[b] = ([(k[j : j + 1], v[j : j + 1]) for k, v in layers], attention_mask[b : b + 1])
        layers, mask = concat_rows(parts)  # type: ignore[arg-type]
        if mask.shape != attention_mask.shape or not bool((mask == attention_mask).all()):
            raise MedvlmError("internal: prefill expects right-aligned prompt chunks")
        return torch.cat(logits), layers  # type: ignore[arg-type]

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: KVBuffer
    ) -> torch.Tensor:
        """One batched step; ``position_ids`` ``[B, 1]`` (M-RoPE models expand them to all three axes, as in
        ``generate``'s decoding steps)."""
        return self._decoder.decode(input_ids, attention_mask, position_ids, past)
