"""``MedVLMConfig``: the one configuration of a medvlm vision-language model.

A composite transformers config (like ``LlavaConfig``): ``vision_config`` and ``text_config`` are
ordinary transformers configs of the vision tower and the causal LM, resolved by their
``model_type``; every behaviour (projector, feature layer/strategy, aspect, template, image-token
layout) is a named field, never inferred from a folder name. Importing
:mod:`medvlm.model.modeling` registers ``model_type="medvlm"`` with the Auto classes.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from medvlm.data.images import ASPECT_MODES
from medvlm.errors import MedvlmError

PROJECTOR_TYPES: tuple[str, ...] = ("linear", "mlp2x_gelu", "cluster")
SELECT_STRATEGIES: tuple[str, ...] = ("patch", "cls_patch")

# Vision towers medvlm knows how to read features from, and whether their sequence starts with a
# CLS token (SigLIP has none). Checked by model type, an explicit field of the vision config.
TOWER_HAS_CLS: dict[str, bool] = {"clip_vision_model": True, "siglip_vision_model": False}


def check_choice(value: str, choices: tuple[str, ...], field: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a MedvlmError naming the field and choices."""
    if value not in choices:
        raise MedvlmError(f"unknown {field} {value!r}; choose one of {', '.join(choices)}")
    return value


@strict
class MedVLMConfig(PretrainedConfig):
    """Configuration of :class:`medvlm.model.modeling.MedVLMForConditionalGeneration`."""

    model_type = "medvlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            # CLIP ViT-L/14 at 336 px, the tower of LLaVA-Med v1.5.
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    """Config of the vision tower (any transformers vision model config, e.g. ``CLIPVisionConfig``)."""
    text_config: dict | PretrainedConfig | None = None
    """Config of the causal language model (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` ...)."""
    projector_type: str = "mlp2x_gelu"
    """``linear`` (LLaVA-Med v1.0), ``mlp2x_gelu`` (LLaVA-Med v1.5) or ``cluster`` (STLLaVA-Med)."""
    projector_hidden_act: str = "gelu"
    """Activation between the two linears of ``mlp2x_gelu`` (a ``transformers.activations.ACT2FN`` key)."""
    vision_feature_layer: int = -2
    """Index into the tower's hidden states the features are taken from (-2: penultimate layer)."""
    vision_feature_select_strategy: str = "patch"
    """``patch`` keeps the patch tokens (drops CLS when the tower has one); ``cls_patch`` keeps CLS too."""
    image_token_id: int | None = None
    """Token id of ``<image>``; each occurrence in ``input_ids`` receives one projected visual feature."""
    image_seq_length: int = 576
    """Visual features (and ``<image>`` tokens) per image; must match the tower and select strategy."""
    image_aspect: str = "pad"
    """How images are fitted before the image processor: ``square``, ``pad`` or ``resize``."""
    mm_use_im_start_end: bool = False
    """Wrap each image's tokens in ``<im_start>`` / ``<im_end>`` (LLaVA-Med v1.0)."""
    im_start_token_id: int | None = None
    """Token id of ``<im_start>`` when ``mm_use_im_start_end``."""
    im_end_token_id: int | None = None
    """Token id of ``<im_end>`` when ``mm_use_im_start_end``."""
    template: str = "vicuna_v1"
    """Name of the chat template (``medvlm.data.templates``) the model was trained with."""
    cluster_num_centers: int = 256
    """Number of prototype centres of the ``cluster`` projector."""
    cluster_iters: int = 2
    """Centre-refinement iterations of the ``cluster`` projector."""
    tie_word_embeddings: bool = False
    """Mirrors the language model's own setting (the LM ties its head itself)."""
    scratch_parts: list | None = None
    """Parts (``vision_tower``, ``language_model``) that started from random weights rather than a pretrained model
    (set by the ``tiny`` / ``small`` / ``smol`` presets, kept through training). Training defaults follow it: a part
    trained from scratch has no pretrained knowledge to protect, so it trains in every stage
    (:mod:`medvlm.train.stages`)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_choice(self.projector_type, PROJECTOR_TYPES, "projector_type")
        check_choice(self.vision_feature_select_strategy, SELECT_STRATEGIES, "vision_feature_select_strategy")
        check_choice(self.image_aspect, ASPECT_MODES, "image_aspect")
        if self.cluster_num_centers < 1 or self.cluster_iters < 0:
            raise MedvlmError(
                f"cluster_num_centers must be >= 1 and cluster_iters >= 0 "
                f"(got {self.cluster_num_centers}, {self.cluster_iters})"
            )
        # The LM ties its own head; keep the top-level flag in step, as transformers' LLaVA does.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True


def tower_has_cls(vision_config: PretrainedConfig) -> bool:
    """Whether the tower's hidden states start with a CLS token (by the vision config's ``model_type``)."""
    model_type = getattr(vision_config, "model_type", "")
    if model_type not in TOWER_HAS_CLS:
        raise MedvlmError(f"unsupported vision tower type {model_type!r}; supported: {', '.join(TOWER_HAS_CLS)}")
    return TOWER_HAS_CLS[model_type]


def expected_image_seq_length(vision_config: PretrainedConfig, strategy: str) -> int:
    """Visual features per image for a tower config and select strategy (patches, plus CLS for ``cls_patch``)."""
    check_choice(strategy, SELECT_STRATEGIES, "vision_feature_select_strategy")
    has_cls = tower_has_cls(vision_config)
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    if strategy == "cls_patch":
        if not has_cls:
            raise MedvlmError(
                f"vision_feature_select_strategy 'cls_patch' needs a tower with a CLS token; "
                f"{vision_config.model_type} has none (use 'patch')"
            )
        return n_patches + 1
    return n_patches
