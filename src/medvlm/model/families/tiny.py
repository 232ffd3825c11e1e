"""Tiny offline builds of every family (100k-300k parameters), for tests and ``model init --preset tiny-<family>``.

Each build trains a byte-level BPE tokenizer on medvlm's embedded corpus in milliseconds, carrying
the family's special tokens and its marked chat template, and pairs it with the family's stock
torchvision-free image processor at a tiny image size and a randomly initialised model of the
family's own transformers class. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.model.families.spec import FamilySpec, get_family
from medvlm.model.tokenizer import default_corpus

TINY_VOCAB = 600


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def family_tokenizer(
    specials: list[str],
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    named: dict[str, str] | None = None,
    chat_template: str | None = None,
    vocab_size: int = TINY_VOCAB,
) -> Any:
    """A byte-level BPE trained offline on the embedded corpus, with ``specials`` as atomic special tokens.

    ``named`` maps attribute names to tokens (``{"image_token": "<|image_pad|>"}``) so processors find
    ``tokenizer.image_token`` / ``tokenizer.image_token_id``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(specials) + 300),
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(default_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        unk_token=unk,
        extra_special_tokens=dict(named or {}),
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    rest = [t for t in specials if t not in hf.all_special_tokens]
    if rest:
        hf.add_special_tokens({"extra_special_tokens": rest}, replace_extra_special_tokens=False)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def _qwen_tokenizer(**size: Any) -> Any:
    """Qwen2.5-VL / Qwen3-VL's special tokens (the tiny and the demo-size builds share them)."""
    return family_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        **size,
        named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _idefics3_tokenizer(**size: Any) -> Any:
    """Idefics3 (SmolVLM)'s special tokens, tile rows included (the tiny and the demo-size builds share them)."""
    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    return family_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            *rows,
        ],
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        unk="<|endoftext|>",
        **size,
    )


def _llama_text(tokenizer: Any, **extra: Any) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _qwen(spec: FamilySpec, tokenizer: Any) -> tuple[Any, Any]:
    import transformers as tf

    v3 = spec.name == "qwen3_vl"
    patch = 16 if v3 else 14
    side = patch * 2
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=side * side * 4, max_pixels=side * side * 16
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(t)
        for name, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = _llama_text(
        tokenizer,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": [2, 3, 3],
            **({"mrope_interleaved": True} if v3 else {}),
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if v3:
        text["head_dim"] = 16
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        vision.update(window_size=56, fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return config, image_processor


def _build_qwen(spec: FamilySpec) -> tuple[Any, Any, dict]:
    from medvlm.model.families import processors

    tokenizer = _qwen_tokenizer()
    config, image_processor = _qwen(spec, tokenizer)
    cls = getattr(processors, spec.processor_class)
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template())
    return config, processor, {}


def _build_gemma3(spec: FamilySpec) -> tuple[Any, Any, dict]:
    import transformers as tf

    tokenizer = family_tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": 64, "width": 64}, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template(), image_seq_length=4
    )
    text = _llama_text(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
        ),
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    # Gemma 3 chat models stop at <end_of_turn> as well as <eos>.
    return (
        config,
        processor,
        {"eos_token_id": [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]},
    )


def _build_idefics3(spec: FamilySpec) -> tuple[Any, Any, dict]:
    import transformers as tf

    tokenizer = _idefics3_tokenizer()
    image_processor = tf.Idefics3ImageProcessorPil(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True
    )
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template(), image_seq_len=4
    )
    config = tf.Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        text_config=dict(model_type="llama", **_llama_text(tokenizer)),
        scale_factor=2,
        image_token_id=processor.image_token_id,
    )
    return config, processor, {}


def _build_llava(spec: FamilySpec, template: str = "vicuna_v1") -> tuple[Any, Any, dict]:
    import transformers as tf

    from medvlm.data.templates import get_template
    from medvlm.model.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=TINY_VOCAB)
    tokenizer.chat_template = get_template(template).to_jinja()
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    config = tf.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=dict(model_type="llama", **_llama_text(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return config, processor, {"template": template}


def _build_llava_onevision(spec: FamilySpec) -> tuple[Any, Any, dict]:
    import transformers as tf

    from medvlm.model.families import processors

    tokenizer = family_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={"image_token": "<image>", "video_token": "<video>"},
    )
    image_processor = tf.LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]]
    )
    processor = processors.LlavaOnevisionImageProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=spec.chat_template(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    config = tf.LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(model_type="qwen2", **_llama_text(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    return config, processor, {}


_BUILDERS: dict[str, Callable[[FamilySpec], tuple[Any, Any, dict]]] = {
    "qwen2_5_vl": _build_qwen,
    "qwen3_vl": _build_qwen,
    "gemma3": _build_gemma3,
    "idefics3": _build_idefics3,
    "llava": _build_llava,
    "llava_onevision": _build_llava_onevision,
}


def build_tiny_family(family: str, seed: int = 0) -> tuple[Any, Any, dict]:
    """A random tiny model of ``family``, its processor, and medvlm metadata extras -> ``(model, processor, extras)``.

    ``extras`` holds what the metadata file must record besides the family (``template`` for ``llava``).
    """
    import transformers as tf

    spec = get_family(family)
    if family not in _BUILDERS:
        raise MedvlmError(f"no tiny build for family {family!r}")
    config, processor, extras = _BUILDERS[family](spec)
    eos = extras.pop("eos_token_id", None)
    with _seeded(seed):
        model = getattr(tf, spec.model_class)(config)
    tok = processor.tokenizer
    gc = model.generation_config
    gc.eos_token_id = eos if eos is not None else tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    model.eval()
    return model, processor, extras


TINY_PRESETS: tuple[str, ...] = tuple(f"tiny-{name}" for name in _BUILDERS)

# ``medvlm demo --family``: the native demo's lessons (see medvlm.demo) carried over to a family's own classes:
# 64 image tokens per 64 px image (patch 8; 16 tokens learned only the modality), a 64-wide 2-layer tower, a
# 3-layer 128-wide LM initialised with std 0.1 (0.02 leaves the image signal too weak at this width), and the
# 1k BPE vocabulary of the native tiny tokenizer.
DEMO_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, patch_size=8)
DEMO_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
)
DEMO_VOCAB = 1000


def _demo_qwen(spec: FamilySpec) -> tuple[Any, Any, dict]:
    import transformers as tf

    from medvlm.model.families import processors

    tokenizer = _qwen_tokenizer(vocab_size=DEMO_VOCAB)
    v = DEMO_VISION
    # merge_size 1: each 8 px patch is one LM token (8 x 8 = 64 at 64 px), as the native demo's patch-8 tower.
    # min = max pixels pins every image to 64 x 64 (Qwen's smart_resize would otherwise choose the grid).
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=v["patch_size"], merge_size=1, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=64 * 64
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(t)
        for name, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    # M-RoPE sections split head_dim / 2 = 16 as Qwen2.5-VL's [16, 24, 24] split 64 (time, height, width).
    text = _llama_text(
        tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
    )
    text.update(DEMO_TEXT)
    vision = dict(
        depth=v["num_hidden_layers"],
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        num_heads=v["num_attention_heads"],
        out_hidden_size=DEMO_TEXT["hidden_size"],
        patch_size=v["patch_size"],
        spatial_merge_size=1,
        temporal_patch_size=2,
        window_size=64,
        fullatt_block_indexes=[1],
    )
    config = tf.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, initializer_range=DEMO_TEXT["initializer_range"], **ids
    )
    processor = getattr(processors, spec.processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template()
    )
    return config, processor, {}


def _demo_idefics3(spec: FamilySpec) -> tuple[Any, Any, dict]:
    import transformers as tf

    tokenizer = _idefics3_tokenizer(vocab_size=DEMO_VOCAB)
    v = DEMO_VISION
    # One 64 px tile (no splitting: the synthetic images are 64 px), patch 8 -> 64 patches; scale_factor 1 keeps
    # all 64 as LM tokens (SmolVLM's pixel shuffle by 4 would leave 4).
    image_processor = tf.Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 64}, do_image_splitting=False
    )
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template(), image_seq_len=64
    )
    text = _llama_text(tokenizer)
    text.update(DEMO_TEXT)
    config = tf.Idefics3Config(
        vision_config=dict(v, image_size=64),
        text_config=dict(model_type="llama", **text),
        scale_factor=1,
        image_token_id=processor.image_token_id,
    )
    return config, processor, {}


DEMO_BUILDERS: dict[str, Callable[[FamilySpec], tuple[Any, Any, dict]]] = {
    "qwen2_5_vl": _demo_qwen,
    "idefics3": _demo_idefics3,
}
"""The families ``medvlm demo --family`` builds at demo size."""


def build_demo_family(family: str, seed: int = 0) -> tuple[Any, Any, dict]:
    """A random demo-size model of ``family`` (64 image tokens per 64 px image, ~1M parameters) and its processor."""
    import transformers as tf

    spec = get_family(family)
    if family not in DEMO_BUILDERS:
        raise MedvlmError(f"medvlm demo has no build for family {family!r}; demo families: {', '.join(DEMO_BUILDERS)}")
    config, processor, extras = DEMO_BUILDERS[family](spec)
    with _seeded(seed):
        model = getattr(tf, spec.model_class)(config)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    return model, processor, extras


def init_demo_family(family: str, out_dir: str | os.PathLike, seed: int = 0, title: str | None = None) -> Path:
    """Build the demo-size ``family`` model and save it (hub layout + medvlm metadata)."""
    from medvlm.model.families.io import save_family
    from medvlm.model.families.processing import FamilyProcessor

    model, processor, extras = build_demo_family(family, seed=seed)
    spec = get_family(family)
    fp = FamilyProcessor(spec, processor, spec.chat_template(), template=extras.get("template"))
    return save_family(model, fp, out_dir, title=title or f"medvlm demo {family}")


def init_tiny_family(preset: str, out_dir: str | os.PathLike, seed: int = 0, template: str | None = None) -> Path:
    """Build ``tiny-<family>`` and save it (hub layout + medvlm metadata): what ``medvlm model init`` does.

    ``template`` (a medvlm chat template name) applies to ``tiny-llava`` only.
    """
    from medvlm.model.families.io import save_family
    from medvlm.model.families.processing import FamilyProcessor

    if preset not in TINY_PRESETS:
        raise MedvlmError(f"unknown preset {preset!r}; family presets: {', '.join(TINY_PRESETS)}")
    family = preset.removeprefix("tiny-")
    spec = get_family(family)
    if template is not None and spec.template_file is not None:
        raise MedvlmError(f"--template applies to tiny-llava only; family {family} uses its own chat template")
    if template is not None:
        model, processor, extras = _tiny_llava(spec, template, seed)
    else:
        model, processor, extras = build_tiny_family(family, seed=seed)
    marked = spec.chat_template() if spec.template_file else processor.chat_template
    fp = FamilyProcessor(spec, processor, marked, template=extras.get("template"))
    return save_family(model, fp, out_dir, title=f"medvlm {preset}")


def _tiny_llava(spec: FamilySpec, template: str, seed: int) -> tuple[Any, Any, dict]:
    import transformers as tf

    config, processor, extras = _build_llava(spec, template)
    with _seeded(seed):
        model = tf.LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.eval()
    return model, processor, extras
