"""Model families: how the engine runs one forward chunk of a model with a KV cache.

The engine's scheduler (:mod:`medvlm.infer.batching`) only needs two hooks from a family:
``prefill`` (a chunk of prompt tokens, possibly holding images, on top of cached keys/values) and
``decode`` (one new token per row). Both take an explicit 2-D column mask and per-token position ids,
and return the logits of each row's last column with the grown cache as plain per-layer tensors
(:data:`medvlm.infer.kv.Layers`). A family is chosen by the model config's ``model_type`` (a named
field); medvlm's own LLaVA family is the only one today.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from medvlm.data.templates import stop_token_id_sequences
from medvlm.errors import MedvlmError
from medvlm.infer.batching import PreparedPrompt, make_prompt
from medvlm.infer.kv import KVBuffer, Layers


class ModelFamily(Protocol):
    """The hooks a model family supplies to the engine."""

    reuses_prefixes: bool
    """Whether prompts may start from a cached prefix (False: every prompt is prefilled whole, no prefix cache; every
    family reuses prefixes today)."""

    def stop_sequences(self) -> list[list[int]]:
        """Token-id sequences that end an answer."""
        ...

    def stop_strings(self) -> list[str]:
        """Strings that end an answer (cut from it)."""
        ...

    def suppress_ids(self) -> list[int]:
        """Token ids never generated (image layout)."""
        ...

    def prompt(self, feats: dict[str, Any]) -> PreparedPrompt:
        """A batchable prompt from the processor's ``encode(..., add_generation_prompt=True)`` features."""
        ...

    def prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Layers | None,
        extras: list[dict[str, Any] | None] | None = None,
    ) -> tuple[torch.Tensor, Layers]:
        """Run prompt tokens ``[B, C]`` (images in row order) after ``past`` (``[B, H, P, D]`` per layer).

        ``extras[b]`` holds row ``b``'s other processor outputs (:attr:`PreparedPrompt.extras`), if any.

        ``attention_mask`` is ``[B, P + C]`` (False = a hole), ``position_ids`` ``[B, C]``.
        Returns the last column's logits ``[B, V]`` and the cache ``[B, H, P + C, D]`` per layer.
        """
        ...

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past: KVBuffer
    ) -> torch.Tensor:
        """One token per row (``input_ids`` ``[B, 1]``, no images) after ``past``, which grows by one column in place.

        ``attention_mask`` is ``[B, past.length + 1]``. Returns the logits ``[B, V]``.
        """
        ...


class NativeLlavaFamily:
    """medvlm's own LLaVA family (``model_type`` ``medvlm``): image tokens are replaced by projected features
    inside ``MedVLMForConditionalGeneration.forward``; the language model keeps a ``DynamicCache``."""

    reuses_prefixes = True
    """Prompt prefixes (image prefix, earlier chat turns) are served from the engine's prefix cache."""

    def __init__(self, model: Any, processor: Any = None):
        self.model = model
        self.processor = processor

    def stop_sequences(self) -> list[list[int]]:
        """Token-id sequences that end an answer (EOS and the template's stops)."""
        return stop_token_id_sequences(self.processor.tokenizer, self.processor.chat_template)

    def stop_strings(self) -> list[str]:
        """The template's stop strings."""
        return [s for s in self.processor.chat_template.stop_strings if s]

    def suppress_ids(self) -> list[int]:
        """Image-layout tokens (the model must never emit them as text)."""
        p = self.processor
        return [i for i in (p.image_token_id, p.im_start_token_id, p.im_end_token_id) if i is not None]

    def prompt(self, feats: dict[str, Any]) -> PreparedPrompt:
        """A prompt from the processor's features (``input_ids``, ``pixel_values``)."""
        return make_prompt(self.processor, feats["input_ids"], feats["pixel_values"])

    def prefill(self, input_ids, pixel_values, attention_mask, position_ids, past, extras=None):
        # A cache object is always passed: without one transformers would read position ids that jump
        # (a prefix reused after a hole) as packed sequences.
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :], cache_layers(cache)

    def decode(self, input_ids, attention_mask, position_ids, past):
        start = past.length
        cache = Cache(layers=[_BufferLayer(past, i, start) for i in range(len(past.keys))])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        past.length = start + input_ids.shape[1]
        return out.logits[:, -1, :]


def cache_layers(cache: DynamicCache) -> Layers:
    """The ``(keys, values)`` of each layer of a prefill's cache; a sliding-window or other layer is refused."""
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise MedvlmError(
                f"the engine supports full-attention caches only; this model's cache has a {type(layer).__name__}"
            )
        layers.append((layer.keys, layer.values))
    return layers


class _BufferLayer(DynamicLayer):
    """A transformers cache layer whose keys/values live in a :class:`KVBuffer` (appends write in place).

    Subclassing the layer type is transformers' own extension point for cache storage (``Cache(layers=...)``).
    """

    def __init__(self, buf: KVBuffer, index: int, start: int):
        super().__init__()
        self.buf, self.index, self.start = buf, index, start
        self.keys, self.values = buf.view(index, start)
        self.device = self.keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = self.buf.append(self.index, key_states, value_states, self.start)
        return self.keys, self.values


def family_for(model: Any, processor: Any) -> ModelFamily:
    """The family serving ``model``, by its config's ``model_type`` (``medvlm``: native; a registered transformers
    family: :class:`~medvlm.infer.family_hf.TransformersFamily`, which needs the family's processor)."""
    from medvlm.infer.family_hf import TransformersFamily
    from medvlm.model.families.processing import FamilyProcessor
    from medvlm.model.families.spec import FAMILIES

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "medvlm":
        return NativeLlavaFamily(model, processor)
    if model_type in FAMILIES:
        if not isinstance(processor, FamilyProcessor) or processor.spec.name != model_type:
            raise MedvlmError(
                f"a {model_type} model needs its family's processor (load both with "
                "medvlm.model.families.io.load_family)"
            )
        return TransformersFamily(model, processor)
    raise MedvlmError(f"no inference family for model_type {model_type!r} (known: medvlm, {', '.join(FAMILIES)})")
