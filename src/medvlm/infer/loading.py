"""Load any checkpoint the engine serves: native medvlm or a transformers model family.

The kind is read from the folder's declared fields (``config.json`` ``model_type``; a family folder's
``medvlm_family.json`` must agree with it), never from its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.utils.artifacts import CONFIG_FILE
from medvlm.utils.io import read_json


def load_for_inference(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode for :class:`~medvlm.infer.engine.InferenceEngine`.

    ``model_type`` ``medvlm`` loads the native model; a supported family's ``model_type`` loads it with
    :func:`medvlm.model.families.io.load_family`; anything else is refused listing the supported families.
    """
    from medvlm.model.build import load_pretrained

    folder = Path(path)
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        raise MedvlmError(f"{folder}: config.json not found (not a checkpoint folder)")
    model_type = read_json(cfg).get("model_type")
    if model_type == "medvlm":
        return load_pretrained(folder, dtype=dtype)
    from medvlm.model.families.io import family_of, load_family

    family_of(folder)  # an unsupported model_type fails here, listing the supported families
    return load_family(folder, dtype=dtype)
