"""``MedVLMForConditionalGeneration``: vision tower + projector + causal LM, a transformers model.

Composition, as LLaVA: the tower (any transformers vision model built from ``vision_config``)
encodes pixels; features of one hidden layer (``vision_feature_layer``) go through the projector
named by ``projector_type``; the ``<image>`` positions of ``input_ids`` (one per visual feature,
expanded by the processor) receive the projected features; the LM (any ``*ForCausalLM`` built from
``text_config``) does the rest, including the shifted loss when ``labels`` are given. Training may ask
for ``labelled_logits_only``: the output head then runs only at the positions that have a label (see
:meth:`MedVLMForConditionalGeneration.forward`).

It is a ``PreTrainedModel`` + ``GenerationMixin``: ``save_pretrained``/``from_pretrained``
(safetensors), ``generate`` with KV cache (``pixel_values`` are used at prefill only: transformers'
generic ``prepare_inputs_for_generation`` drops them after the first step when the cache is on),
gradient checkpointing (reaches the tower's encoder and the LM's decoder), attention-implementation
propagation through the sub-configs, PEFT, the HF Trainer and accelerate.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from medvlm.errors import MedvlmError
from medvlm.model.config import MedVLMConfig, expected_image_seq_length, tower_has_cls
from medvlm.model.projectors import ClusterProjector, build_projector


class MedVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A LLaVA-style biomedical VLM: ``vision_tower`` -> ``projector`` -> ``language_model``."""

    config: MedVLMConfig
    config_class = MedVLMConfig
    # The composite itself is the base model: submodules sit at the top level of the state dict.
    base_model_prefix = ""
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]  # the KV cache never moves with device_map
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # No top-level tying: the LM declares its own `_tied_weights_keys` (e.g. SmolLM2 ties its head)
    # and `post_init` / `tie_weights` collect them with the `language_model.` prefix.
    _tied_weights_keys = None

    def __init__(self, config: MedVLMConfig):
        super().__init__(config)
        if config.image_token_id is None:
            raise MedvlmError("MedVLMConfig.image_token_id is not set (the id of the <image> token)")
        self._tower_has_cls = tower_has_cls(config.vision_config)
        expected = expected_image_seq_length(config.vision_config, config.vision_feature_select_strategy)
        if config.image_seq_length != expected:
            raise MedvlmError(
                f"image_seq_length {config.image_seq_length} does not match the vision tower "
                f"({config.vision_config.image_size}px / patch {config.vision_config.patch_size}, "
                f"strategy {config.vision_feature_select_strategy!r} -> {expected} features)"
            )
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = build_projector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # FSDP auto-wrap / device maps must not split a decoder layer or a tower encoder layer:
        # take the layer classes from the sub-models actually built.
        self._no_split_modules = sorted(
            set(self.vision_tower._no_split_modules or []) | set(self.language_model._no_split_modules or [])
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ClusterProjector):
            init.ones_(module.sim_alpha)
            init.zeros_(module.sim_beta)

    # -- embeddings (delegated to the LM, so resize_token_embeddings / tie_weights / PEFT work) --
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    # -- vision ------------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """Pre-projector tower features of the selected layer/strategy, ``[n_img, image_seq_length, vision_hidden]``."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.config.vision_feature_layer]  # [n_img, L_v, D_v]
        if self.config.vision_feature_select_strategy == "patch" and self._tower_has_cls:
            feats = feats[:, 1:]  # [n_img, n_patches, D_v]
        return feats

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected visual features, ``[n_img, image_seq_length, text_hidden]``.

        ``vision_features`` (pre-projector tower output, e.g. from training's frozen-tower feature
        cache) bypass the tower; otherwise the tower encodes ``pixel_values``.
        """
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values)  # [n_img, S, D_v]
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(vision_features.to(proj_dtype))  # [n_img, S, H]

    def _merge_image_features(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.FloatTensor | None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write the projected features into the ``<image>`` positions of ``inputs_embeds``."""
        feats = self.get_image_features(pixel_values, vision_features)  # [n_img, S, H]
        image_mask = input_ids == self.config.image_token_id  # [B, T]
        n_tokens = int(image_mask.sum())
        n_img, seq = feats.shape[0], feats.shape[1]
        if n_tokens != n_img * seq:
            raise MedvlmError(
                f"the batch has {n_tokens} <image> tokens but {n_img} image(s) x {seq} features = "
                f"{n_img * seq}; each image needs exactly image_seq_length={seq} <image> tokens "
                "(was the prompt built by MedVLMProcessor, and was it truncated?)"
            )
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)  # [B, T, H]
        return inputs_embeds.masked_scatter(mask, feats.to(inputs_embeds.dtype))  # [B, T, H]

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_features: torch.Tensor | None = None,
        labelled_logits_only: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Language-model forward with the ``<image>`` embeddings replaced by projected visual features.

        ``pixel_values`` hold all images of the batch in sample order (``[n_img, 3, H, W]``);
        ``vision_features`` (``[n_img, image_seq_length, vision_hidden]``, pre-projector) may be given
        instead to bypass a frozen tower (training's feature cache).
        ``labels`` (``-100`` = ignored) are passed to the LM, which computes the shifted loss.

        ``labelled_logits_only`` (training; needs ``labels``): run the LM's decoder, then apply the output head
        only at the positions whose shifted label is not ``-100`` and compute the LM's own causal-LM loss
        there (same value and gradients as the full path, including ``num_items_in_batch`` normalisation).
        Image, prompt and padding positions then never get a ``[.., vocab]`` row: with a 32k-49k vocabulary
        that head is a large share of a step's compute and memory. The output's ``logits`` are then ``None``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as cache or as past_key_values, not both")
        cache = cache if cache is not None else past_key_values  # transformers >= 5.25 calls it cache
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        if pixel_values is not None and vision_features is not None:
            raise MedvlmError("pass pixel_values or vision_features, not both")
        if pixel_values is not None or vision_features is not None:
            if input_ids is None:
                raise MedvlmError("pixel_values need input_ids to locate the <image> tokens")
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, pixel_values, vision_features)
        elif input_ids is not None and _is_prefill(cache):
            n_tokens = int((input_ids == self.config.image_token_id).sum())
            if n_tokens:
                raise MedvlmError(f"input_ids contain {n_tokens} <image> tokens but no pixel_values were given")
        if labelled_logits_only and labels is not None:
            return self._labelled_loss(inputs_embeds, labels, attention_mask, position_ids, cache, use_cache, **kwargs)
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_cache_kwarg(self.language_model): cache},
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _labelled_loss(
        self,
        inputs_embeds: torch.Tensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache,
        use_cache: bool | None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The LM's forward + causal-LM loss with the output head applied at labelled positions only.

        Mirrors ``*ForCausalLM.forward`` (decoder, head, ``loss_function``) through the generic accessors
        ``get_decoder()`` / ``get_output_embeddings()``, so any causal LM whose head is a plain projection works.
        """
        lm = self.language_model
        _check_plain_head(lm.config)
        head = lm.get_output_embeddings()
        if head is None:
            raise MedvlmError(f"{type(lm).__name__} has no output head; set labelled_logits_only: false")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        decoder = lm.get_decoder()
        out = decoder(
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_cache_kwarg(decoder): cache},
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # [B, T, H]
        # transformers' causal-LM loss: position t predicts labels[t + 1]; the last position predicts nothing.
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(hidden.device)  # [B, T]
        keep = targets != -100  # [B, T]
        logits = head(hidden[keep])  # [N, V], N = learned positions of the micro-batch
        loss = lm.loss_function(
            logits=logits,
            labels=None,
            vocab_size=logits.shape[-1],
            num_items_in_batch=num_items_in_batch,
            shift_labels=targets[keep],
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )


_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
"""Text-config fields of LMs that transform the head's output before the loss (Gemma 2, Cohere, Granite ...)."""


def _check_plain_head(text_config) -> None:
    """``labelled_logits_only`` reproduces a plain head only; refuse LMs that rescale or cap their logits."""
    found = [k for k in _LOGIT_TRANSFORMS if getattr(text_config, k, None) is not None]
    if found:
        raise MedvlmError(
            f"labelled_logits_only: the language model ({text_config.model_type}) transforms its logits "
            f"({', '.join(found)}), which the labelled-positions head does not reproduce; "
            "set labelled_logits_only: false"
        )


def _is_prefill(cache) -> bool:
    """True when no tokens are cached yet (training, or the first generation step)."""
    return cache is None or cache.get_seq_length() == 0


_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The KV-cache field of transformers' model outputs (renamed from ``past_key_values`` in transformers 5.25)."""


def _cache_kwarg(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes the KV cache (``cache`` from transformers 5.25 on)."""
    return _forward_cache_kwarg(type(module))


@functools.cache
def _forward_cache_kwarg(cls: type) -> str:
    # Per class, once: inspecting a signature on every forward call would cost each training step.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` know ``model_type="medvlm"``.

    Local registration (idempotent), so checkpoints load without ``trust_remote_code``.
    """
    AutoConfig.register("medvlm", MedVLMConfig, exist_ok=True)
    AutoModel.register(MedVLMConfig, MedVLMForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(MedVLMConfig, MedVLMForConditionalGeneration, exist_ok=True)


register_auto_classes()
