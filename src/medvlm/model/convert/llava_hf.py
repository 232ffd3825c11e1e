"""Export a medvlm checkpoint to the transformers ``LlavaForConditionalGeneration`` layout ("llava-hf").

The result loads with plain transformers (``LlavaForConditionalGeneration.from_pretrained`` +
``AutoProcessor.from_pretrained``) and with vLLM, which reads the same layout. Mapping:

- ``vision_tower.*`` -> ``model.vision_tower.vision_model.*`` (the published llava-hf names)
- ``projector.0.*`` / ``projector.2.*`` -> ``model.multi_modal_projector.linear_1.*`` / ``linear_2.*``
- ``language_model.model.*`` -> ``model.language_model.*``; ``language_model.lm_head.*`` -> ``lm_head.*``
- feature strategy ``patch`` on a CLS tower -> ``default`` (drop CLS); ``cls_patch`` -> ``full``;
  ``patch`` on a tower without CLS (SigLIP) -> ``full`` with ``num_additional_image_tokens=0``.
- aspect modes: ``LlavaImageProcessor`` reproduces all three exactly: ``pad`` = its ``do_pad``
  (LLaVA's expand-to-square with the mean colour), ``resize`` = resize to ``height x width`` without
  centre crop, ``square`` = resize shortest edge + centre crop. The export checks this on a test image
  and refuses if the pixels differ.
- the chat template is ``ChatTemplate.to_jinja()`` (one ``<image>`` per image part; the processor
  expands it to ``image_seq_length`` tokens). It writes BOS itself (when the format has one), and the
  exported tokenizer adds no special tokens of its own (:func:`export_tokenizer`), so the three ways
  people call a llava-hf model give medvlm's ids: the model-card usage
  (``processor(images=..., text=processor.apply_chat_template(msgs, add_generation_prompt=True))``, which
  tokenizes with ``add_special_tokens=True``), ``apply_chat_template(tokenize=True)`` and vLLM's chat path
  (template rendered, tokenized with ``add_special_tokens=False``). Published llava-hf checkpoints leave BOS
  to the tokenizer instead, which gives vLLM's chat path no BOS at all; BOS in the template is the one
  arrangement all three paths agree on.

Refused (the layout cannot hold them): ``linear`` and ``cluster`` projectors (llava-hf's projector is
always Linear-act-Linear), and ``<im_start>``/``<im_end>`` models (the llava-hf processor never inserts them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medvlm.data.templates import get_template, stop_token_id_sequences
from medvlm.errors import MedvlmError
from medvlm.model.config import MedVLMConfig, tower_has_cls
from medvlm.model.convert.common import (
    TensorChecker,
    check_distinct,
    expected_shapes,
    generation_config_for,
    log,
    meta_model,
    read_medvlm,
    tied_keys,
    write_tensors,
)
from medvlm.model.convert.shards import DEFAULT_SHARD_BYTES, DTYPE_NAMES, SafetensorsCheckpoint
from medvlm.model.processing import MedVLMProcessor
from medvlm.notice import NOTICE
from medvlm.utils.artifacts import MODEL_CARD_FILE
from medvlm.utils.io import atomic_dir, write_text_atomic

# Image-processor fields copied from medvlm's processor into the LlavaImageProcessor.
_IMAGE_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def llava_hf_refusal(config: MedVLMConfig) -> str | None:
    """Why a model cannot be exported to llava-hf (None when it can)."""
    if config.projector_type != "mlp2x_gelu":
        return (
            f"projector_type {config.projector_type!r} cannot be exported to llava-hf: "
            "LlavaForConditionalGeneration's multi_modal_projector is always Linear -> activation -> Linear "
            "(mlp2x_gelu); keep this model as a medvlm checkpoint (medvlm chat / serve run it)"
        )
    if config.mm_use_im_start_end:
        return (
            "models with mm_use_im_start_end (<im_start>/<im_end> around image tokens) cannot be exported to "
            "llava-hf: LlavaProcessor expands <image> only and never inserts <im_start>/<im_end>"
        )
    if config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        return f"vision tower type {config.vision_config.model_type!r} is not supported by the llava-hf export"
    return None


def export_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that adds no BOS/EOS of its own:
    ``tok(text)`` == ``tok(text, add_special_tokens=False)``.

    medvlm always tokenizes with ``add_special_tokens=False`` and lets the template write BOS; the copy makes
    the default call agree, so the model-card usage cannot put a second BOS before the template's.
    """
    import copy

    probe = "a b"
    if tokenizer(probe)["input_ids"] == tokenizer(probe, add_special_tokens=False)["input_ids"]:
        return tokenizer  # adds nothing already (SmolLM2, Qwen-style tokenizers)
    tok = copy.deepcopy(tokenizer)
    if not hasattr(tok, "update_post_processor"):
        raise MedvlmError(
            f"{type(tokenizer).__name__} adds special tokens and cannot be told not to (a fast "
            "tokenizer is needed for the llava-hf export)"
        )
    tok.add_bos_token = False  # the setters rebuild the post-processor
    tok.add_eos_token = False
    if tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
        raise MedvlmError(
            f"{type(tokenizer).__name__} still adds special tokens after add_bos_token=False; "
            "refusing an export whose model-card usage would differ from medvlm"
        )
    return tok


def llava_strategy(config: MedVLMConfig) -> tuple[str, int]:
    """``(vision_feature_select_strategy, num_additional_image_tokens)`` of llava-hf for a medvlm config."""
    has_cls = tower_has_cls(config.vision_config)
    if config.vision_feature_select_strategy == "cls_patch":
        return "full", 1
    return ("default", 1) if has_cls else ("full", 0)


def llava_hf_key(key: str) -> str:
    """The llava-hf tensor name of a medvlm tensor name."""
    if key.startswith("vision_tower."):
        return "model." + key
    if key.startswith("projector.0."):
        return "model.multi_modal_projector.linear_1." + key[len("projector.0.") :]
    if key.startswith("projector.2."):
        return "model.multi_modal_projector.linear_2." + key[len("projector.2.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    if key.startswith("language_model.lm_head."):
        return "lm_head." + key[len("language_model.lm_head.") :]
    raise MedvlmError(f"tensor {key!r} has no llava-hf counterpart")


def llava_hf_file_key(key: str) -> str:
    """The name stored in the file for a llava-hf model name: the published (and vLLM) layout keeps CLIP's
    ``vision_model.`` level (``model.vision_tower.vision_model.*``), which transformers 5 also reads."""
    prefix = "model.vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix) :]
    return key


def llava_image_processor(processor: MedVLMProcessor) -> Any:
    """A ``LlavaImageProcessor`` (PIL backend) giving the same pixels as medvlm's aspect mode + image processor."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    src = processor.image_processor.to_dict()
    kwargs = {k: src[k] for k in _IMAGE_FIELDS if k in src}
    kwargs.setdefault("do_center_crop", False)  # e.g. SigLIP processors resize to height x width, no crop
    if processor.image_aspect == "pad":
        kwargs["do_pad"] = True
    elif processor.image_aspect == "resize":
        side = processor.image_side
        kwargs.update(do_pad=False, do_resize=True, size={"height": side, "width": side}, do_center_crop=False)
    else:
        kwargs["do_pad"] = False
    image_processor = LlavaImageProcessorPil(**kwargs)
    _check_same_pixels(processor, image_processor)
    return image_processor


def _check_same_pixels(processor: MedVLMProcessor, image_processor: Any) -> None:
    """Refuse the export unless the llava-hf image processor reproduces medvlm's pixels on non-square images."""
    rng = np.random.default_rng(0)
    for w, h in ((53, 31), (29, 47)):
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ours = processor.preprocess_images([img])  # [1, 3, S, S]
        theirs = image_processor(images=[img], return_tensors="pt")["pixel_values"].float()  # [1, 3, S, S]
        if ours.shape != theirs.shape or not torch.equal(ours, theirs):
            raise MedvlmError(
                f"the llava-hf image processor cannot reproduce medvlm's preprocessing (aspect "
                f"{processor.image_aspect!r}, {type(processor.image_processor).__name__}); refusing the export"
            )


def llava_config(config: MedVLMConfig, dtype: torch.dtype) -> Any:
    """The ``LlavaConfig`` of a (compatible) medvlm config."""
    from transformers import LlavaConfig

    strategy, _ = llava_strategy(config)
    out = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
    )
    out.architectures = ["LlavaForConditionalGeneration"]
    out.dtype = DTYPE_NAMES.get(dtype, "float32")
    return out


def _model_card(config: MedVLMConfig, processor: MedVLMProcessor, src: Path, notes: list[str]) -> str:
    strategy, extra = llava_strategy(config)
    resizing = {"pad": "do_pad", "resize": "resize to square"}.get(processor.image_aspect, "resize + centre crop")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [medvlm, llava, vision-language, biomedical, research-only]",
        "---",
        "",
        f"# {src.name} (llava-hf export of a medvlm model)",
        "",
        f"> **Research use only.** {NOTICE}",
        "",
        "Exported by `medvlm model export --to llava-hf` to the transformers `LlavaForConditionalGeneration` "
        "layout; loads with transformers and vLLM without remote code.",
        "",
        "| field | value |",
        "|---|---|",
        f"| vision tower | {config.vision_config.model_type}, {config.vision_config.image_size}px, patch "
        f"{config.vision_config.patch_size} |",
        f"| vision features | layer {config.vision_feature_layer}, strategy {strategy} "
        f"(num_additional_image_tokens {extra}) |",
        f"| projector | mlp2x ({config.projector_hidden_act}) |",
        f"| language model | {config.text_config.model_type}, vocab {config.text_config.vocab_size} |",
        f"| image tokens | {config.image_seq_length} per image, token `<image>` (id {config.image_token_id}) |",
        f"| image aspect | {processor.image_aspect} (done by LlavaImageProcessor: {resizing}) |",
        f"| chat template | {config.template} (chat_template.jinja renders the same text as medvlm) |",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        'model = LlavaForConditionalGeneration.from_pretrained("path/to/this/folder")',
        'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
        'messages = [{"role": "user", "content": [{"type": "image"}, '
        '{"type": "text", "text": "What does the image show?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "```",
        "",
        "The chat template writes the BOS token itself when the format has one, and the tokenizer adds no "
        "special tokens of its own, so this usage, `processor.apply_chat_template(..., tokenize=True)` and "
        "vLLM's chat endpoint all give the token ids medvlm trained with.",
    ]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += [
        "",
        "## Limitations",
        "",
        NOTICE,
        "Outputs can be wrong, incomplete or invented and must be checked by a qualified person.",
    ]
    return "\n".join(lines) + "\n"


def _tensors(ckpt: SafetensorsCheckpoint):
    for key in ckpt.keys():
        yield llava_hf_key(key), ckpt.get(key)


def export_llava_hf(src: str | os.PathLike, dst: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the llava-hf layout of the medvlm checkpoint ``src`` into ``dst`` (atomic); returns ``dst``."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    src, dst = Path(src), Path(dst)
    check_distinct(src, dst)
    config, processor, ckpt = read_medvlm(src)
    refusal = llava_hf_refusal(config)
    if refusal:
        raise MedvlmError(f"{src}: {refusal}")
    dtype = ckpt.main_dtype()
    lconfig = llava_config(config, dtype)
    image_processor = llava_image_processor(processor)
    strategy, extra = llava_strategy(config)
    template = get_template(config.template)
    hf_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=export_tokenizer(processor.tokenizer),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=template.to_jinja(),
        image_token="<image>",
    )
    generation = generation_config_for(processor.tokenizer)
    # Template stop strings that are one token (e.g. <|im_end|>) become extra EOS ids: transformers and
    # vLLM then stop where medvlm stops.
    eos = [generation.eos_token_id] if generation.eos_token_id is not None else []
    eos += [
        seq[0] for seq in stop_token_id_sequences(processor.tokenizer, template) if len(seq) == 1 and seq[0] not in eos
    ]
    generation.eos_token_id = eos if len(eos) > 1 else (eos[0] if eos else None)
    generation.suppress_tokens = [config.image_token_id]  # never emit <image> as text (as medvlm's engine)
    notes = []
    multi = [s for s in stop_token_id_sequences(processor.tokenizer, template) if len(s) > 1]
    if multi:
        notes.append(
            "the template's stop strings "
            + ", ".join(repr(processor.tokenizer.decode(s)) for s in multi)
            + " are several tokens long: pass them as stop strings (transformers `stop_strings`, vLLM `stop`)"
        )
    model = meta_model(lambda: LlavaForConditionalGeneration(lconfig))
    checker = TensorChecker(expected_shapes(model), tied_keys(model), f"exporting {src} to llava-hf")
    with atomic_dir(dst) as tmp:
        write_tensors(tmp, _tensors(ckpt), checker, max_shard_bytes, file_name=llava_hf_file_key)
        lconfig.save_pretrained(str(tmp))
        generation.save_pretrained(str(tmp))
        hf_processor.save_pretrained(str(tmp))
        image_processor.save_pretrained(str(tmp))  # preprocessor_config.json too, for older loaders
        write_text_atomic(tmp / MODEL_CARD_FILE, _model_card(config, processor, src, notes))
    log.info("exported %s to llava-hf layout at %s", src, dst)
    return dst
