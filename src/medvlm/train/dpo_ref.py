"""Reference log-probabilities computed once and stored (``ref_logps``): DPO then never runs the reference.

The reference of DPO is frozen, so its log-probabilities of every pair are fixed numbers: computing
them before training halves DPO's forward passes and frees the reference's memory. TRL refuses this
for image data; here the reference sees the images through its own frozen visual path, exactly as
the on-the-fly computation does (same batching code, same fp32 sums).

File format: safetensors with float32 tensors ``chosen`` and ``rejected`` ``[N]``; its metadata holds
``ids`` (a JSON list, the pair keys in tensor order) and ``fingerprint`` (SHA-256 of the reference
checkpoint's files, the processor settings and the encoded pairs). A stored file whose fingerprint
differs from the run's is refused (or, for ``ref_logps: auto``, recomputed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.utils.artifacts import CONFIG_FILE, REF_LOGPS_FILE
from medvlm.utils.io import atomic_path


def fingerprint(checkpoint: str | os.PathLike, dataset) -> str:
    """SHA-256 over the reference checkpoint's weights and config, the processor settings and the encoded pairs."""
    from medvlm.train.data import file_sha256

    h = hashlib.sha256()
    folder = Path(checkpoint)
    for f in sorted(folder.glob("*.safetensors")) + [folder / CONFIG_FILE]:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    for settings in processor_settings(dataset.processor):
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for pair, enc in zip(dataset.pairs, dataset.encoded):
        h.update(json.dumps([pair.id, list(pair.images), enc], sort_keys=True).encode())
    return h.hexdigest()


def processor_settings(processor) -> list[dict[str, Any]]:
    """What of a processor decides the encoded pairs: its settings and its image processor's (a family: also its
    chat template)."""
    from medvlm.model.families.processing import FamilyProcessor

    if isinstance(processor, FamilyProcessor):
        return [
            {"family": processor.spec.name, "chat_template": processor.chat_template, "template": processor.template},
            processor.processor.image_processor.to_dict(),
        ]
    return [processor.to_dict(), processor.image_processor.to_dict()]


def compute_ref_logps(
    ref_model, dataset, batch_size: int = 4, pad_token_id: int | None = None, device: torch.device | str | None = None
) -> dict[str, tuple[float, float]]:
    """``{pair key: (chosen, rejected)}`` summed answer log-probs of the frozen reference (eval mode, no grad)."""
    from tqdm.auto import tqdm

    from medvlm.train.preference import DPOCollator, reference_logps

    saved, dataset.ref_logps = dataset.ref_logps, None
    collate = DPOCollator(pad_token_id) if pad_token_id is not None else dataset.collator()
    device = device or next(ref_model.parameters()).device
    ref_model.eval()
    out: dict[str, tuple[float, float]] = {}
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="reference log-probs", unit="batch"):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logps = reference_logps(ref_model, tensors).cpu()  # [2B]
            b = len(batch["pair_ids"])
            for j, key in enumerate(batch["pair_ids"]):
                out[key] = (float(logps[j]), float(logps[b + j]))
    finally:
        dataset.ref_logps = saved
    return out


def save_ref_logps(path: str | os.PathLike, values: dict[str, tuple[float, float]], fp: str) -> Path:
    """Write the values as safetensors (atomic) with ``ids`` and ``fingerprint`` metadata."""
    from safetensors.torch import save_file

    ids = list(values)
    tensors = {
        "chosen": torch.tensor([values[k][0] for k in ids], dtype=torch.float32),  # [N]
        "rejected": torch.tensor([values[k][1] for k in ids], dtype=torch.float32),
    }  # [N]
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(
            tensors, str(tmp), metadata={"ids": json.dumps(ids), "fingerprint": fp, "format": "medvlm-ref-logps-1"}
        )
    return Path(path)


def load_ref_logps(path: str | os.PathLike) -> tuple[dict[str, tuple[float, float]], str]:
    """``(values by pair key, fingerprint)`` of a stored file; a MedvlmError names a malformed one."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise MedvlmError(f"ref_logps {p}: file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            chosen, rejected = f.get_tensor("chosen"), f.get_tensor("rejected")
        ids = json.loads(meta["ids"])
    except (KeyError, ValueError, OSError) as e:
        raise MedvlmError(f"ref_logps {p}: not a medvlm reference log-prob file ({e})") from e
    if len(ids) != chosen.shape[0] or chosen.shape != rejected.shape:
        raise MedvlmError(
            f"ref_logps {p}: {len(ids)} ids but tensors of shape {tuple(chosen.shape)} / {tuple(rejected.shape)}"
        )
    return {k: (float(c), float(r)) for k, c, r in zip(ids, chosen.tolist(), rejected.tolist())}, meta.get(
        "fingerprint", ""
    )


def ensure_ref_logps(cfg, load_reference: Callable[[], Any], dataset) -> dict[str, tuple[float, float]]:
    """The run's reference log-probs: read from ``cfg.ref_logps`` if it matches, else computed and stored there.

    ``load_reference()`` returns the frozen reference model; it is called only when values must be computed.

    ``ref_logps: auto`` stores them in ``output_dir/ref_logps.safetensors`` (recomputed when stale); a
    path is created when missing and refused when it belongs to other data or another reference.
    """
    auto = cfg.ref_logps == "auto"
    path = Path(cfg.output_dir) / REF_LOGPS_FILE if auto else Path(cfg.ref_logps)
    fp = fingerprint(cfg.model_name_or_path, dataset)
    if path.is_file():
        values, stored_fp = load_ref_logps(path)
        if stored_fp == fp:
            missing = [p.id for p in dataset.pairs if p.id not in values]
            if not missing:
                return values
            raise MedvlmError(f"ref_logps {path}: no values for {len(missing)} pair(s), e.g. {missing[:3]}")
        if not auto:
            raise MedvlmError(
                f"ref_logps {path}: computed for another reference checkpoint or other pairs "
                "(fingerprint differs); delete it or use ref_logps: auto"
            )
    values = compute_ref_logps(load_reference(), dataset, batch_size=cfg.per_device_train_batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ref_logps(path, values, fp)
    return values
