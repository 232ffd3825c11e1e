"""LLaVA-Med checkpoints <-> medvlm: import ``llava-med-v1.5`` / ``llava-med-v1.0``, export ``llava-med-v1.5``.

Published layouts (read from ``config.json`` and the safetensors index at run time):

- v1.5 (``LlavaMistralForCausalLM``, microsoft/llava-med-v1.5-mistral-7b): LM keys ``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``, ``lm_head``; projector ``model.mm_projector.0/.2``
  (``mm_projector_type: mlp2x_gelu``); tower ``model.vision_tower.vision_tower.vision_model.*``;
  ``mm_vision_select_layer``, ``mm_vision_select_feature``, ``image_aspect_ratio`` (``pad``),
  ``mm_use_im_start_end`` (false). The vocabulary has no ``<image>`` token (LLaVA splices image
  features at a sentinel id), so the import appends one row to the embedding and the LM head, set
  to the mean of the existing rows as LLaVA initialises new tokens; the v1.5 export drops it again.
- v1.0 (LLaMA, ``model.mm_projector.{weight,bias}`` = linear): vocabulary 32000 + ``[PAD]``,
  ``<im_patch>``, ``<im_start>``, ``<im_end>`` (32004); no stored tower (``--vision-tower PATH``);
  template ``llava_med_v0``, ``mm_use_im_start_end`` true.

Pickled ``pytorch_model-*.bin`` shards are refused with instructions; safetensors shards are read
one tensor at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, LlamaConfig, MistralConfig, PretrainedConfig

from medvlm.errors import MedvlmError
from medvlm.model.build import prepare_tokenizer
from medvlm.model.config import MedVLMConfig, check_choice, expected_image_seq_length
from medvlm.model.convert.common import (
    append_mean_rows,
    check_distinct,
    log,
    read_conversion_record,
    read_medvlm,
    sync_token_ids,
    write_medvlm_checkpoint,
)
from medvlm.model.convert.shards import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    SafetensorsCheckpoint,
    ShardWriter,
    read_config_json,
)
from medvlm.model.convert.towers import BUFFER_SUFFIXES, STORED_TOWER_PREFIX, resolve_tower, tower_name_for
from medvlm.model.processing import MedVLMProcessor
from medvlm.model.tokenizer import IMAGE_TOKEN
from medvlm.notice import NOTICE
from medvlm.utils.artifacts import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    MODEL_CARD_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from medvlm.utils.io import atomic_dir, read_json, write_json_atomic, write_text_atomic

LLAVA_MED_VERSIONS: tuple[str, ...] = ("v1.5", "v1.0")
# config.json model_type of LLaVA checkpoints -> language-model config class.
LM_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llava_mistral": MistralConfig,
    "llava_llama": LlamaConfig,
    "llava": LlamaConfig,
}
ARCHITECTURES = {
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral"),
    "llama": ("LlavaLlamaForCausalLM", "llava_llama"),
}
DEFAULT_TEMPLATES = {
    ("v1.5", "mistral"): "mistral_instruct",
    ("v1.5", "llama"): "vicuna_v1",
    ("v1.0", "llama"): "llava_med_v0",
    ("v1.0", "mistral"): "llava_med_v0",
}
ASPECTS = {"pad": "pad", "square": "square", None: "square"}
EMBED_KEY, HEAD_KEY, PROJ_PREFIX = "model.embed_tokens.weight", "lm_head.weight", "model.mm_projector."
_NOT_TEXT = ("model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def _text_config(cfg: dict, where: Path) -> PretrainedConfig:
    model_type = cfg.get("model_type")
    if model_type not in LM_CONFIGS:
        raise MedvlmError(
            f"{where}/config.json: model_type {model_type!r} is not a LLaVA checkpoint "
            f"(expected one of {', '.join(LM_CONFIGS)})"
        )
    cls = LM_CONFIGS[model_type]
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}
    return cls(**{k: v for k, v in cfg.items() if k in known and k not in _NOT_TEXT})


def _load_tokenizer(src: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        raise MedvlmError(
            f"cannot load the tokenizer in {src} ({e}); a tokenizer.model-only folder needs the "
            "sentencepiece package (pip install sentencepiece)"
        ) from e


def import_llava_med(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    version: str = "v1.5",
    vision_tower: str | os.PathLike | None = None,
    template: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Convert a LLaVA-Med ``version`` checkpoint folder into a medvlm checkpoint at ``dst`` (atomic).

    ``vision_tower``: a local CLIP folder used instead of stored tower weights (needed for v1.0).
    Returns the conversion record (also written to ``dst/conversion.json``), which says which tower was used.
    """
    check_choice(version, LLAVA_MED_VERSIONS, "LLaVA-Med version")
    src, dst = Path(src), Path(dst)
    check_distinct(src, dst)
    cfg = read_config_json(src, f"LLaVA-Med {version} checkpoint")
    ckpt = SafetensorsCheckpoint(src, f"LLaVA-Med {version} checkpoint")
    text_config = _text_config(cfg, src)
    lm_kind = "mistral" if isinstance(text_config, MistralConfig) else "llama"
    projector = cfg.get("mm_projector_type", "linear" if version == "v1.0" else None)
    if projector is None:
        raise MedvlmError(f"{src}/config.json has no mm_projector_type (a LLaVA-Med v1.5 checkpoint has 'mlp2x_gelu')")
    check_choice(projector, ("linear", "mlp2x_gelu"), f"{src}/config.json mm_projector_type")
    aspect_value = cfg.get("image_aspect_ratio")
    if aspect_value not in ASPECTS:
        raise MedvlmError(
            f"{src}/config.json: image_aspect_ratio {aspect_value!r} is not supported (supported: pad, square)"
        )
    aspect = ASPECTS[aspect_value]
    select = cfg.get("mm_vision_select_feature", "patch")
    check_choice(select, ("patch", "cls_patch"), f"{src}/config.json mm_vision_select_feature")
    layer = int(cfg.get("mm_vision_select_layer", -2))
    im_start_end = bool(cfg.get("mm_use_im_start_end", version == "v1.0"))
    template = template or DEFAULT_TEMPLATES[(version, lm_kind)]

    tower = resolve_tower(ckpt, cfg.get("mm_vision_tower"), vision_tower)
    log.info("vision tower: %s", tower.description)
    tokenizer = _load_tokenizer(src)
    prepare_tokenizer(tokenizer, im_start_end)
    if EMBED_KEY not in ckpt:
        raise MedvlmError(f"{src} has no {EMBED_KEY}; not a LLaVA checkpoint in the published layout")
    rows = ckpt.shape(EMBED_KEY)[0]
    n_new = max(0, len(tokenizer) - rows)
    text_config.vocab_size = rows + n_new
    seq = expected_image_seq_length(tower.vision_config, select)
    processor = MedVLMProcessor(tokenizer, tower.image_processor, template, aspect, seq, im_start_end)
    config = MedVLMConfig(
        vision_config=tower.vision_config.to_dict(),
        text_config=text_config.to_dict(),
        projector_type=projector,
        vision_feature_layer=layer,
        vision_feature_select_strategy=select,
        image_token_id=processor.image_token_id,
        image_seq_length=seq,
        image_aspect=aspect,
        mm_use_im_start_end=im_start_end,
        im_start_token_id=processor.im_start_token_id,
        im_end_token_id=processor.im_end_token_id,
        template=template,
    )
    sync_token_ids(config, tokenizer)
    record = {
        "source_format": f"llava-med-{version}",
        "source": str(src),
        "mm_vision_tower": cfg.get("mm_vision_tower"),
        "vision_tower": tower.description,
        "source_vocab_size": rows,
        "added_token_rows": n_new,
        "template": template,
    }

    def tensors():
        yield from tower.tensors(ckpt)
        for key in ckpt.keys():
            if key.startswith(STORED_TOWER_PREFIX) or key.endswith(BUFFER_SUFFIXES):
                continue  # the tower came from `tower`; buffers are recomputed
            if key.startswith(PROJ_PREFIX):
                yield "projector." + key[len(PROJ_PREFIX) :], ckpt.get(key)
            elif key in (EMBED_KEY, HEAD_KEY):
                name = (
                    "language_model.model.embed_tokens.weight" if key == EMBED_KEY else "language_model.lm_head.weight"
                )
                yield name, append_mean_rows(ckpt.get(key), n_new)  # [V + n_new, H]
            elif key.startswith("model."):
                yield "language_model." + key, ckpt.get(key)
            else:
                raise MedvlmError(f"{src}: tensor {key!r} is not part of the LLaVA-Med {version} layout")

    notes = (
        f"Imported from the LLaVA-Med {version} checkpoint `{src.name}` by `medvlm model import`. "
        f"Vision tower: {tower.description}. "
        + (
            f"{n_new} token row(s) ({IMAGE_TOKEN}) were appended to the embeddings and LM head, set to the mean "
            "of the existing rows. "
            if n_new
            else ""
        )
    )
    write_medvlm_checkpoint(
        dst,
        config,
        processor,
        tensors(),
        dtype=ckpt.main_dtype(),
        title=f"{src.name} (imported from LLaVA-Med {version})",
        notes=notes,
        record=record,
        max_shard_bytes=max_shard_bytes,
    )
    log.info("imported %s (LLaVA-Med %s) into %s", src, version, dst)
    return record


def _v15_refusal(config: MedVLMConfig, aspect: str) -> str | None:
    if config.projector_type != "mlp2x_gelu" or config.projector_hidden_act != "gelu":
        return (
            f"the LLaVA-Med v1.5 layout holds an mlp2x_gelu projector only (this model has "
            f"{config.projector_type}/{config.projector_hidden_act})"
        )
    if config.mm_use_im_start_end:
        return "the LLaVA-Med v1.5 layout has no <im_start>/<im_end> tokens (mm_use_im_start_end is false)"
    if aspect == "resize":
        return "LLaVA's image_aspect_ratio has no plain-resize mode (only pad and the default crop)"
    if config.vision_config.model_type != "clip_vision_model":
        return "LLaVA-Med v1.5 expects a CLIP vision tower"
    if config.text_config.model_type not in ARCHITECTURES:
        return f"LLaVA has no architecture for a {config.text_config.model_type!r} language model"
    return None


def _strip_token_files(folder: Path, token: str) -> None:
    """Remove an added token from saved tokenizer files (transformers has no API to remove a token)."""
    tok_json = folder / TOKENIZER_FILE
    if tok_json.is_file():
        data = read_json(tok_json)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != token]
        write_json_atomic(tok_json, data, indent=None)
    cfg_json = folder / TOKENIZER_CONFIG_FILE
    if cfg_json.is_file():
        data = read_json(cfg_json)
        decoder = data.get("added_tokens_decoder") or {}
        data["added_tokens_decoder"] = (
            {k: v for k, v in decoder.items() if v.get("content") != token} if decoder else decoder
        )
        for key in ("extra_special_tokens", "additional_special_tokens"):
            value = data.get(key)
            if isinstance(value, list):
                data[key] = [t for t in value if t != token]
            elif isinstance(value, dict):
                data[key] = {k: v for k, v in value.items() if v != token}
        for key in [k for k, v in data.items() if v == token]:
            del data[key]
        write_json_atomic(cfg_json, data)


def export_llava_med_v15(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    vision_tower_name: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a medvlm checkpoint in the LLaVA-Med v1.5 layout (the inverse of the v1.5 import); returns ``dst``.

    ``vision_tower_name`` fills ``mm_vision_tower`` (default: the name recorded by the import, else the
    published tower with the same architecture).
    """
    src, dst = Path(src), Path(dst)
    check_distinct(src, dst)
    config, processor, ckpt = read_medvlm(src)
    refusal = _v15_refusal(config, processor.image_aspect)
    if refusal:
        raise MedvlmError(f"{src}: {refusal}")
    name = (
        vision_tower_name or read_conversion_record(src).get("mm_vision_tower") or tower_name_for(config.vision_config)
    )
    if not name:
        raise MedvlmError(f"{src}: cannot tell which tower to name in mm_vision_tower; pass --vision-tower-name")
    tokenizer = processor.tokenizer
    embed = "language_model.model.embed_tokens.weight"
    rows = ckpt.shape(embed)[0]
    # The v1.5 vocabulary has no <image>: drop its row when the import (or compose) appended it last.
    drop = config.image_token_id == rows - 1 and config.image_token_id in tokenizer.added_tokens_decoder
    keep = rows - 1 if drop else rows
    arch, model_type = ARCHITECTURES[config.text_config.model_type]
    text = config.text_config.to_dict()
    for key in ("model_type", "architectures", "dtype", "transformers_version"):
        text.pop(key, None)
    rope = text.get("rope_parameters") or {}
    dtype = DTYPE_NAMES.get(ckpt.main_dtype(), "float32")
    out_cfg = {
        **text,
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": keep,
        "torch_dtype": dtype,
        "mm_vision_tower": name,
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": config.vision_feature_select_strategy,
        "image_aspect_ratio": processor.image_aspect,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "tokenizer_padding_side": "right",
    }
    if "rope_theta" in rope:
        out_cfg["rope_theta"] = rope["rope_theta"]  # the key LLaVA's (older) transformers reads

    def tensors():
        for key in ckpt.keys():
            t = ckpt.get(key)
            if key.startswith("vision_tower."):
                yield (
                    STORED_TOWER_PREFIX + "vision_model." + key[len("vision_tower.") :].removeprefix("vision_model."),
                    t,
                )
            elif key.startswith("projector."):
                yield PROJ_PREFIX + key[len("projector.") :], t
            elif key in (embed, "language_model.lm_head.weight"):
                yield (EMBED_KEY if key == embed else HEAD_KEY), t[:keep]  # [V_kept, H]
            elif key.startswith("language_model.model."):
                yield key[len("language_model.") :], t
            else:
                raise MedvlmError(f"{src}: tensor {key!r} has no place in the LLaVA-Med v1.5 layout")
        if "language_model.lm_head.weight" not in ckpt:  # tied head: LLaVA's code expects it stored
            yield HEAD_KEY, ckpt.get(embed)[:keep]

    with atomic_dir(dst) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key, t in tensors():
            writer.add(key, t)
        writer.close()
        write_json_atomic(tmp / CONFIG_FILE, out_cfg)
        tokenizer.save_pretrained(str(tmp))
        if drop:
            _strip_token_files(tmp, tokenizer.convert_ids_to_tokens(config.image_token_id))
            check = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True, trust_remote_code=False)
            if len(check) != keep:
                raise MedvlmError(
                    f"could not remove {IMAGE_TOKEN} from the exported tokenizer ({len(check)} != {keep})"
                )
        write_json_atomic(
            tmp / GENERATION_CONFIG_FILE,
            {
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        )
        write_text_atomic(
            tmp / MODEL_CARD_FILE,
            "\n".join(
                [
                    f"# {src.name} (LLaVA-Med v1.5 layout)",
                    "",
                    f"> **Research use only.** {NOTICE}",
                    "",
                    f"Exported by `medvlm model export --to llava-med-v1.5` ({arch}). Chat template used in training: "
                    f"`{config.template}` (LLaVA chooses the conversation mode at run time). Vision tower: `{name}` "
                    "(weights stored under model.vision_tower.vision_tower.*).",
                    "",
                ]
            ),
        )
    log.info("exported %s to the LLaVA-Med v1.5 layout at %s", src, dst)
    return dst
