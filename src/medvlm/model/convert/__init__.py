"""Checkpoint formats: export medvlm checkpoints to other layouts, import published ones, LLaVA-Med deltas.

- ``export_checkpoint(src, dst, to)``: ``llava-hf`` (transformers ``LlavaForConditionalGeneration``,
  also read by vLLM) or ``llava-med-v1.5`` (the published LLaVA-Med v1.5 layout).
- ``import_checkpoint(src, dst, from_)``: ``llava-med-v1.5`` or ``llava-med-v1.0``.
- ``apply_delta`` / ``make_delta``: LLaVA-Med v1.0 delta weights (:mod:`medvlm.model.convert.delta`).

Everything works tensor by tensor on safetensors files (pickles are refused) and writes atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medvlm.model.config import check_choice

EXPORT_FORMATS: tuple[str, ...] = ("llava-hf", "llava-med-v1.5")
IMPORT_FORMATS: tuple[str, ...] = ("llava-med-v1.5", "llava-med-v1.0")


def export_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, vision_tower_name: str | None = None
) -> Path:
    """Export the medvlm checkpoint ``src`` to format ``to`` in ``dst`` (atomic); returns ``dst``.

    ``vision_tower_name`` is used by ``llava-med-v1.5`` only (its ``mm_vision_tower``).
    """
    check_choice(to, EXPORT_FORMATS, "export format (--to)")
    if to == "llava-hf":
        from medvlm.model.convert.llava_hf import export_llava_hf

        return export_llava_hf(src, dst)
    from medvlm.model.convert.llava_med import export_llava_med_v15

    return export_llava_med_v15(src, dst, vision_tower_name=vision_tower_name)


def import_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    from_: str,
    vision_tower: str | os.PathLike | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """Import the checkpoint ``src`` in format ``from_`` as a medvlm checkpoint ``dst``;
    returns the conversion record."""
    check_choice(from_, IMPORT_FORMATS, "import format (--from)")
    from medvlm.model.convert.llava_med import import_llava_med

    return import_llava_med(
        src, dst, version=from_.removeprefix("llava-med-"), vision_tower=vision_tower, template=template
    )
