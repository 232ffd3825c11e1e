"""The family table: what medvlm needs to know about each transformers image-text-to-text family.

A family is chosen by an explicit name (``family`` in medvlm's metadata and the training YAML; for a
plain hub folder, its ``config.json`` ``model_type``, a declared field). Everything family-specific
lives in one :class:`FamilySpec` row; code elsewhere reads the row and never branches on the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from medvlm.errors import MedvlmError


@dataclass(frozen=True)
class FamilySpec:
    """One model family (a transformers ``*ForConditionalGeneration`` with its processor)."""

    name: str
    """Registry name, equal to the family's ``config.json`` ``model_type``."""
    model_class: str
    """transformers model class (``AutoModelForImageTextToText`` maps ``model_type`` to it)."""
    processor_class: str
    """Processor class: a stock one, or medvlm's image-only subclass (:mod:`.processors`) where the stock
    processor insists on a video processor."""
    stock_processor_class: str
    """The transformers processor class real checkpoints name (``processor_config.json``)."""
    image_processor_class: str
    """torchvision-free image processor (``*ImageProcessorPil``)."""
    connector: tuple[str, ...]
    """Parameter-name prefixes of the vision-to-text connector (what ``align`` trains)."""
    vision_tower: tuple[str, ...]
    """Parameter-name prefixes of the vision encoder."""
    language_model: tuple[str, ...]
    """Parameter-name prefixes of the language model (LM head included)."""
    image_tensors: tuple[str, ...]
    """Per-image tensors the processor returns besides ``input_ids``/``attention_mask``: the collator
    zero-pads all but the first dim to the batch maximum and concatenates them along dim 0."""
    token_tensors: tuple[str, ...] = ()
    """Per-token tensors the processor returns (padded like ``input_ids``, with 0); dropping Qwen's
    ``mm_token_type_ids`` silently changes the loss (1-D positions instead of M-RoPE)."""
    end_of_turn: str = ""
    """The token that ends a turn: learned with each answer, and where generation stops."""
    image_markers: tuple[str, ...] = ()
    """Special tokens that make up an expanded image (truncation must never cut one)."""
    question_header: str = ""
    """Text that opens a user turn: the generation prompt of a VUSER (self-questioning) turn."""
    template_file: str | None = None
    """Marked chat template in ``medvlm/resources/family_templates`` (None: the template is a medvlm
    :class:`medvlm.data.templates.ChatTemplate` named in the checkpoint's metadata, ``llava``)."""
    stock_template: bool = True
    """The marked template writes exactly the text of the family's stock chat template, and a checkpoint whose own
    template writes other text is refused at load. False: medvlm's own format is used on purpose (LLaVA-OneVision:
    llava-hf's template trains ``'assistant ' + '\\n' + answer`` but prompts with ``'assistant\\n'``; medvlm writes
    ``'assistant\\n'`` in both, so training and generation see the same tokens)."""
    rope_index: bool = False
    """Positions come from the model's ``get_rope_index`` (M-RoPE: an image takes fewer positions than tokens),
    so the first generated token's position is the prompt's largest position + 1, not its length."""
    notes: dict[str, str] = field(default_factory=dict)
    """Anything a user should know (shown in errors and ``model info``)."""

    def chat_template(self) -> str:
        """The family's marked chat template (Jinja text)."""
        if self.template_file is None:
            raise MedvlmError(f"family {self.name} takes its chat template from a medvlm template name")
        return (
            resources.files("medvlm")
            .joinpath("resources", "family_templates", self.template_file)
            .read_text(encoding="utf-8")
        )


_QWEN_MARKERS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
_LM = ("model.language_model.", "lm_head.")

FAMILIES: dict[str, FamilySpec] = {
    f.name: f
    for f in (
        FamilySpec(
            name="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLImageProcessor",
            stock_processor_class="Qwen2_5_VLProcessor",
            image_processor_class="Qwen2VLImageProcessorPil",
            connector=("model.visual.merger.",),
            vision_tower=("model.visual.",),
            language_model=_LM,
            image_tensors=("pixel_values", "image_grid_thw"),
            token_tensors=("mm_token_type_ids",),
            end_of_turn="<|im_end|>",
            image_markers=_QWEN_MARKERS,
            question_header="<|im_start|>user\n",
            template_file="qwen2_5_vl.jinja",
            rope_index=True,
        ),
        FamilySpec(
            name="qwen3_vl",
            model_class="Qwen3VLForConditionalGeneration",
            processor_class="Qwen3VLImageProcessor",
            stock_processor_class="Qwen3VLProcessor",
            image_processor_class="Qwen2VLImageProcessorPil",
            connector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
            vision_tower=("model.visual.",),
            language_model=_LM,
            image_tensors=("pixel_values", "image_grid_thw"),
            token_tensors=("mm_token_type_ids",),
            end_of_turn="<|im_end|>",
            image_markers=_QWEN_MARKERS,
            question_header="<|im_start|>user\n",
            template_file="qwen3_vl.jinja",
            rope_index=True,
        ),
        FamilySpec(
            name="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            processor_class="Gemma3Processor",
            stock_processor_class="Gemma3Processor",
            image_processor_class="Gemma3ImageProcessorPil",
            connector=("model.multi_modal_projector.",),
            vision_tower=("model.vision_tower.",),
            language_model=_LM,
            image_tensors=("pixel_values",),
            token_tensors=("token_type_ids",),
            end_of_turn="<end_of_turn>",
            image_markers=("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
            question_header="<start_of_turn>user\n",
            template_file="gemma3.jinja",
            notes={"checkpoints": "MedGemma 4B (-it / -pt) is this class"},
        ),
        FamilySpec(
            name="idefics3",
            model_class="Idefics3ForConditionalGeneration",
            processor_class="Idefics3Processor",
            stock_processor_class="Idefics3Processor",
            image_processor_class="Idefics3ImageProcessorPil",
            connector=("model.connector.",),
            vision_tower=("model.vision_model.",),
            language_model=("model.text_model.", "lm_head."),
            image_tensors=("pixel_values", "pixel_attention_mask"),
            end_of_turn="<end_of_utterance>",
            image_markers=(
                "<fake_token_around_image>",
                "<image>",
                "<global-img>",
                *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
            ),
            question_header="User:",
            template_file="idefics3.jinja",
            notes={"checkpoints": "SmolVLM 256M / 500M / 2.2B (v1) and Idefics3-8B are this class"},
        ),
        FamilySpec(
            name="llava",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            stock_processor_class="LlavaProcessor",
            image_processor_class="CLIPImageProcessorPil",
            connector=("model.multi_modal_projector.",),
            vision_tower=("model.vision_tower.",),
            language_model=_LM,
            image_tensors=("pixel_values",),
            end_of_turn="</s>",
            image_markers=("<image>",),
            template_file=None,
            notes={"checkpoints": "llava-hf models and medvlm's own `model export --to llava-hf`"},
        ),
        FamilySpec(
            name="llava_onevision",
            model_class="LlavaOnevisionForConditionalGeneration",
            processor_class="LlavaOnevisionImageProcessor",
            stock_processor_class="LlavaOnevisionProcessor",
            image_processor_class="LlavaOnevisionImageProcessorPil",
            connector=("model.multi_modal_projector.", "model.image_newline"),
            vision_tower=("model.vision_tower.",),
            language_model=_LM,
            image_tensors=("pixel_values", "image_sizes", "batch_num_images"),
            end_of_turn="<|im_end|>",
            image_markers=("<image>",),
            question_header="<|im_start|>user ",
            template_file="llava_onevision.jinja",
            stock_template=False,
        ),
    )
}

# model_type values of checkpoints people will try, with why they are not a family (yet).
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "smolvlm": "SmolVLM2 (model_type smolvlm) needs a video processor, which needs torchvision; SmolVLM v1 "
    "(256M / 500M / 2.2B, model_type idefics3) is supported as family idefics3",
    "qwen2_vl": "Qwen2-VL is not a medvlm family; use Qwen2.5-VL (qwen2_5_vl) or Qwen3-VL (qwen3_vl)",
    "medvlm": "this is a native medvlm checkpoint: load it with medvlm.model.build.load_pretrained",
}


def get_family(name: str) -> FamilySpec:
    """The family registered as ``name`` (a MedvlmError lists the supported families)."""
    if name in FAMILIES:
        return FAMILIES[name]
    why = UNSUPPORTED_MODEL_TYPES.get(name)
    raise MedvlmError(
        f"unsupported model family {name!r}"
        + (f" ({why})" if why else "")
        + f"; supported families: {', '.join(FAMILIES)}"
    )


def part_of(spec: FamilySpec, param_name: str) -> str:
    """``connector``, ``vision_tower`` or ``language_model``: which part of a family model a parameter is in.

    The connector is checked first (Qwen's merger sits inside ``model.visual``). A name matching no part
    is an error: a new transformers release renamed something the table must follow.
    """
    for part, prefixes in (
        ("connector", spec.connector),
        ("vision_tower", spec.vision_tower),
        ("language_model", spec.language_model),
    ):
        if any(param_name.startswith(p) for p in prefixes):
            return part
    raise MedvlmError(f"parameter {param_name!r} belongs to no declared part of family {spec.name}")
