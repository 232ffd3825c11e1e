"""Where the vision tower of an imported LLaVA checkpoint comes from: stored weights or a local CLIP.

LLaVA checkpoints name their tower in ``mm_vision_tower`` (a hub name like
``openai/clip-vit-large-patch14-336`` or a local path) and may store its weights under
``model.vision_tower.vision_tower.vision_model.*`` (LLaVA-Med v1.5 does; v1.0 does not). The architecture of a
stored tower comes from the table of published towers below, or from ``mm_vision_tower`` when it is a
local folder with a ``config.json``; ``--vision-tower PATH`` replaces the stored weights by a local
CLIP/SigLIP folder (config, weights and ``preprocessor_config.json``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionConfig, PretrainedConfig

from medvlm.errors import MedvlmError
from medvlm.model.build import image_processor_for
from medvlm.model.convert.shards import SafetensorsCheckpoint, check_weights_folder
from medvlm.model.safe_load import refusing_remote_code
from medvlm.utils.artifacts import CONFIG_FILE, IMAGE_PROCESSOR_FILE

STORED_TOWER_PREFIX = "model.vision_tower.vision_tower."
# Buffers older transformers versions saved with the weights; today's models recompute them.
BUFFER_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")

_VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_VIT_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_VIT_L14, "image_size": 224},
}
"""Published CLIP towers used by LLaVA(-Med): ``mm_vision_tower`` name -> ``CLIPVisionConfig`` fields."""

_FULL_TO_VISION = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


@dataclass
class TowerSource:
    """The tower an import uses: its config, image processor and a tensor stream in medvlm names."""

    vision_config: PretrainedConfig
    """Config of the vision model (``CLIPVisionConfig`` / ``SiglipVisionConfig``)."""
    image_processor: Any
    """Image processor matching the tower."""
    description: str
    """Where the weights come from (logged and recorded in ``conversion.json``)."""
    folder: Path | None
    """The local tower folder, or None when the stored weights are used."""
    keys: list[str]
    """Source tensor names of the tower (in ``folder`` or in the LLaVA checkpoint)."""
    prefix: str
    """Prefix of ``keys`` replaced by ``vision_tower.`` in medvlm names."""

    def tensors(self, llava: SafetensorsCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
        """``(medvlm name, tensor)`` of every tower tensor."""
        source = SafetensorsCheckpoint(self.folder, "vision tower") if self.folder else llava
        for key in self.keys:
            if key.endswith(BUFFER_SUFFIXES):
                continue
            # medvlm (transformers 5) names tower tensors without CLIP's `vision_model.` level
            yield "vision_tower." + key[len(self.prefix) :].removeprefix("vision_model."), source.get(key)


def _vision_config(cfg: PretrainedConfig, where: str) -> PretrainedConfig:
    if cfg.model_type in _FULL_TO_VISION:
        return cfg.vision_config
    if cfg.model_type in _FULL_TO_VISION.values():
        return cfg
    raise MedvlmError(
        f"{where}: unsupported vision model type {cfg.model_type!r}; supported: "
        f"{', '.join([*_FULL_TO_VISION, *_FULL_TO_VISION.values()])}"
    )


def _processor_of(folder: Path | None, vision_config: PretrainedConfig) -> Any:
    if folder is not None and (folder / IMAGE_PROCESSOR_FILE).is_file():
        with refusing_remote_code(folder, "image processor"):
            return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return image_processor_for(vision_config)


def resolve_tower(
    llava: SafetensorsCheckpoint, mm_vision_tower: str | None, vision_tower: str | os.PathLike | None
) -> TowerSource:
    """The tower of a LLaVA checkpoint: ``vision_tower`` (a local folder) if given, else the stored weights."""
    stored = [k for k in llava.keys() if k.startswith(STORED_TOWER_PREFIX)]
    if vision_tower is not None:
        folder = check_weights_folder(vision_tower, "vision tower")
        with refusing_remote_code(folder, "vision tower"):
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        vision_config = _vision_config(cfg, str(folder))
        keys = SafetensorsCheckpoint(folder, "vision tower").keys()
        if cfg.model_type in _FULL_TO_VISION:  # a full CLIP/SigLIP: its vision half only
            keys = [k for k in keys if k.startswith("vision_model.")]
        if not keys:
            raise MedvlmError(f"vision tower folder {folder} has no vision tower tensors")
        ignored = f"; the {len(stored)} stored tower tensors of {llava.folder} are ignored" if stored else ""
        return TowerSource(
            vision_config, _processor_of(folder, vision_config), f"weights from {folder}{ignored}", folder, keys, ""
        )
    if not stored:
        raise MedvlmError(
            f"{llava.folder} stores no vision tower weights ({STORED_TOWER_PREFIX}*); pass --vision-tower PATH "
            f"to a local copy (safetensors) of {mm_vision_tower or 'the CLIP tower it was trained with'}"
        )
    if not mm_vision_tower:
        raise MedvlmError(f"{llava.folder}/config.json has no mm_vision_tower; pass --vision-tower PATH")
    if mm_vision_tower in KNOWN_TOWERS:
        vision_config: PretrainedConfig = CLIPVisionConfig(**KNOWN_TOWERS[mm_vision_tower])
        folder = None
    elif (Path(mm_vision_tower) / CONFIG_FILE).is_file():
        folder = Path(mm_vision_tower)
        with refusing_remote_code(folder, "vision tower"):
            cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        vision_config = _vision_config(cfg, str(folder))
    else:
        raise MedvlmError(
            f"mm_vision_tower {mm_vision_tower!r} is neither a known tower ({', '.join(KNOWN_TOWERS)}) nor a local "
            "folder with config.json; pass --vision-tower PATH to a local copy of it"
        )
    return TowerSource(
        vision_config,
        _processor_of(folder, vision_config),
        f"stored weights ({len(stored)} tensors) with the architecture of {mm_vision_tower}",
        None,
        stored,
        STORED_TOWER_PREFIX,
    )


def tower_name_for(vision_config: PretrainedConfig) -> str | None:
    """The published tower name whose architecture equals ``vision_config`` (None if none does)."""
    for name, fields in KNOWN_TOWERS.items():
        if vision_config.model_type == "clip_vision_model" and all(
            getattr(vision_config, k, None) == v for k, v in fields.items()
        ):
            return name
    return None
