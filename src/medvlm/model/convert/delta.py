"""LLaVA-Med v1.0 delta weights: ``apply_delta`` (base + delta -> target) and ``make_delta`` (its inverse).

LLaVA-Med v1.0 was released as a delta against LLaMA-7B. Semantics (those of LLaVA's ``apply_delta``):

- a delta tensor whose name and shape are in the base: ``target = delta + base``;
- ``model.embed_tokens.weight`` / ``lm_head.weight`` (the delta has more rows: ``[PAD]``, ``<im_patch>``,
  ``<im_start>``, ``<im_end>``): the base is added into the top-left block, the extra rows are kept as stored;
- tensors absent from the base (the projector ``model.mm_projector.*``): kept as stored.

The target is a full v1.0-layout checkpoint that ``medvlm model import --from llava-med-v1.0`` reads.
Both directions stream tensor by tensor (one tensor of each input in memory, shards written as they
fill), so 7B models do not need three copies in RAM. Sums are computed in float64 and rounded once
to the target dtype. ``make_delta`` stores the delta in the target's dtype by default (as published;
then ``target - base`` is rounded and a few elements may not come back bit for bit, which it counts
and reports) or in a wider ``dtype`` (``float64``: the round trip is exact); the target dtype of each
widened tensor is recorded in the shard metadata so ``apply_delta`` restores it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.model.convert.common import check_distinct, log
from medvlm.model.convert.shards import (
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    PICKLE_SUFFIXES,
    SafetensorsCheckpoint,
    ShardWriter,
)
from medvlm.utils.artifacts import DELTA_FILE, WEIGHTS_INDEX_FILE
from medvlm.utils.io import atomic_dir, write_json_atomic

BLOCK_KEYS: tuple[str, ...] = ("model.embed_tokens.weight", "lm_head.weight")
TARGET_DTYPE_META = "target_dtype."


def _block(key: str, base_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows/cols of the top-left block the base fills, or a clear error for incompatible shapes."""
    if (
        key in BLOCK_KEYS
        and len(shape) == 2
        and len(base_shape) == 2
        and base_shape[0] <= shape[0]
        and base_shape[1] <= shape[1]
    ):
        return base_shape[0], base_shape[1]
    raise MedvlmError(
        f"tensor {key!r}: shape {shape} does not match the base's {base_shape} (only "
        f"{' and '.join(BLOCK_KEYS)} may be larger than the base)"
    )


def _combine(key: str, x: torch.Tensor, base: torch.Tensor, sign: float) -> torch.Tensor:
    """``x + sign * base`` in float64, the base added into the top-left block when ``x`` is larger."""
    out = x.to(torch.float64, copy=True)  # [*shape]; never modify the caller's tensor
    if tuple(base.shape) == tuple(x.shape):
        return out.add_(base.double(), alpha=sign)
    r, c = _block(key, tuple(base.shape), tuple(x.shape))
    out[:r, :c].add_(base.double(), alpha=sign)  # [r, c] block
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files (weights are written by the caller)."""
    skip = {WEIGHTS_INDEX_FILE, DELTA_FILE}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name not in skip and p.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def apply_delta(
    base: str | os.PathLike,
    delta: str | os.PathLike,
    target: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Write ``target`` = ``base`` + ``delta`` (v1.0 semantics, see the module docstring); returns counts."""
    base, delta, target = Path(base), Path(delta), Path(target)
    for p in (base, delta):
        check_distinct(p, target)
    b = SafetensorsCheckpoint(base, "base")
    d = SafetensorsCheckpoint(delta, "delta")
    counts = {"tensors": 0, "added_to_base": 0, "kept_as_stored": 0}
    with atomic_dir(target) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for file in d.files():
            meta = d.file_metadata(file)
            for key in d.keys_in(file):
                x = d.get(key)
                if key in b:
                    dtype_name = meta.get(TARGET_DTYPE_META + key)
                    dtype = DTYPES_BY_NAME[dtype_name] if dtype_name in DTYPES_BY_NAME else x.dtype
                    x = _combine(key, x, b.get(key), 1.0).to(dtype)
                    counts["added_to_base"] += 1
                else:
                    counts["kept_as_stored"] += 1
                writer.add(key, x)
                counts["tensors"] += 1
        writer.close()
        _copy_side_files(delta, tmp)
    log.info("applied delta %s to base %s -> %s (%s)", delta, base, target, counts)
    return counts


def make_delta(
    base: str | os.PathLike,
    target: str | os.PathLike,
    delta: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Write ``delta`` = ``target`` - ``base`` (the inverse of :func:`apply_delta`); returns counts.

    ``dtype`` (``float32``/``float64``/...) widens the stored differences; by default each keeps the
    target tensor's dtype. ``inexact_elements`` counts elements that ``apply_delta`` would not give
    back bit for bit (0 means the round trip is exact).
    """
    if dtype is not None and dtype not in DTYPES_BY_NAME:
        raise MedvlmError(f"unknown delta dtype {dtype!r}; choose one of {', '.join(DTYPES_BY_NAME)}")
    base, target, delta = Path(base), Path(target), Path(delta)
    for p in (base, target):
        check_distinct(p, delta)
    b = SafetensorsCheckpoint(base, "base")
    t = SafetensorsCheckpoint(target, "target")
    counts = {"tensors": 0, "differences": 0, "kept_as_stored": 0, "inexact_elements": 0}
    with atomic_dir(delta) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for key in t.keys():
            y = t.get(key)
            if key not in b:
                writer.add(key, y)
                counts["kept_as_stored"] += 1
                counts["tensors"] += 1
                continue
            x = b.get(key)
            store = DTYPES_BY_NAME[dtype] if dtype else y.dtype
            diff = _combine(key, y, x, -1.0).to(store)
            back = _combine(key, diff, x, 1.0).to(y.dtype)  # what apply_delta will compute
            counts["inexact_elements"] += int((back != y).sum())
            meta = {TARGET_DTYPE_META + key: _dtype_name(y.dtype)} if store != y.dtype else None
            writer.add(key, diff, meta)
            counts["differences"] += 1
            counts["tensors"] += 1
        writer.close()
        _copy_side_files(target, tmp)
        write_json_atomic(
            tmp / DELTA_FILE, {"base": str(base), "target": str(target), "semantics": "llava-med-v1.0", **counts}
        )
    if counts["inexact_elements"]:
        log.warning(
            "%d element(s) of the delta do not round-trip exactly in the stored dtype; use dtype='float64' "
            "for an exact delta",
            counts["inexact_elements"],
        )
    log.info("made delta %s from base %s and target %s (%s)", delta, base, target, counts)
    return counts
