"""Shared pieces of the converters: reading a medvlm checkpoint without its weights, checking tensor
sets against the target architecture (built on the ``meta`` device, no memory), and writing a medvlm
checkpoint from a stream of tensors (atomic, with the model card).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig

from medvlm.errors import MedvlmError
from medvlm.model.card import render_model_card
from medvlm.model.config import MedVLMConfig
from medvlm.model.convert.shards import DEFAULT_SHARD_BYTES, DTYPE_NAMES, SafetensorsCheckpoint, ShardWriter
from medvlm.model.modeling import MedVLMForConditionalGeneration
from medvlm.model.processing import MedVLMProcessor
from medvlm.model.safe_load import refusing_remote_code
from medvlm.utils.artifacts import CONFIG_FILE, CONVERSION_FILE, MODEL_CARD_FILE, PROCESSOR_FILE
from medvlm.utils.io import atomic_dir, read_json, write_json_atomic, write_text_atomic

log = logging.getLogger("medvlm.model.convert")


def read_medvlm(folder: str | os.PathLike) -> tuple[MedVLMConfig, MedVLMProcessor, SafetensorsCheckpoint]:
    """Config, processor and a lazy view of the weights of a medvlm checkpoint (no model is built)."""
    folder = Path(folder)
    ckpt = SafetensorsCheckpoint(folder, "medvlm checkpoint")
    if not (folder / CONFIG_FILE).is_file():
        raise MedvlmError(f"medvlm checkpoint folder {folder} has no config.json")
    if not (folder / PROCESSOR_FILE).is_file():
        raise MedvlmError(
            f"{folder} has no {PROCESSOR_FILE}; export needs a medvlm checkpoint (see `medvlm model import`)"
        )
    with refusing_remote_code(folder, "checkpoint"):
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if not isinstance(config, MedVLMConfig):
        raise MedvlmError(f"{folder}/config.json has model_type {config.model_type!r}, expected 'medvlm'")
    return config, MedVLMProcessor.from_pretrained(folder), ckpt


def read_conversion_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``conversion.json`` an import wrote (empty dict when the checkpoint has none)."""
    path = Path(folder) / CONVERSION_FILE
    data = read_json(path) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def meta_model(build) -> nn.Module:
    """A model built by ``build()`` on the ``meta`` device: its state-dict names and shapes cost no memory."""
    with torch.device("meta"):
        return build()


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict names that are tied to another parameter (may be absent from a checkpoint)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if model.config.tie_word_embeddings or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set(tied)
    return set()


class TensorChecker:
    """Checks a stream of ``(name, tensor)`` against the target's expected names and shapes."""

    def __init__(self, expected: dict[str, tuple[int, ...]], optional: set[str], what: str):
        self.expected, self.optional, self.what = expected, optional, what
        self.seen: set[str] = set()

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in self.expected:
            raise MedvlmError(f"{self.what}: tensor {key!r} has no place in the target architecture")
        if tuple(tensor.shape) != self.expected[key]:
            raise MedvlmError(
                f"{self.what}: tensor {key!r} has shape {tuple(tensor.shape)}, the target "
                f"architecture needs {self.expected[key]}"
            )
        self.seen.add(key)
        return tensor

    def finish(self) -> None:
        missing = sorted(set(self.expected) - self.seen - self.optional)
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise MedvlmError(f"{self.what}: tensors missing for the target architecture: {shown}")


def write_tensors(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    checker: TensorChecker,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    file_name=None,
) -> list[str]:
    """Check and write a tensor stream into ``folder`` as safetensors shards.

    Names are checked as the model names them; ``file_name(name)`` (default: unchanged) is the name stored.
    """
    writer = ShardWriter(folder, max_shard_bytes)
    for key, tensor in tensors:
        writer.add(file_name(key) if file_name else key, checker(key, tensor))
    checker.finish()
    return writer.close()


def generation_config_for(tokenizer: Any) -> GenerationConfig:
    """BOS/EOS/PAD ids of the tokenizer as a generation config."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def sync_token_ids(config: MedVLMConfig, tokenizer: Any) -> None:
    """Copy the tokenizer's BOS/EOS/PAD ids into the text config (as ``build`` does for new models)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config.text_config, name, value)


def write_medvlm_checkpoint(
    dst: str | os.PathLike,
    config: MedVLMConfig,
    processor: MedVLMProcessor,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    title: str,
    notes: str,
    record: dict[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a medvlm checkpoint (config, weights, processor, model card, ``conversion.json``) atomically.

    The tensors are checked against :class:`MedVLMForConditionalGeneration` built on the meta device.
    """
    config.dtype = DTYPE_NAMES.get(dtype, "float32")
    model = meta_model(lambda: MedVLMForConditionalGeneration(config))
    checker = TensorChecker(expected_shapes(model), tied_keys(model), f"converting to {dst}")
    out = Path(dst)
    with atomic_dir(out) as tmp:
        write_tensors(tmp, tensors, checker, max_shard_bytes)
        config.save_pretrained(str(tmp))
        generation_config_for(processor.tokenizer).save_pretrained(str(tmp))
        processor.save_pretrained(tmp)
        write_text_atomic(tmp / MODEL_CARD_FILE, render_model_card(model, title=title, notes=notes))
        write_json_atomic(tmp / CONVERSION_FILE, record)
    return out


def check_distinct(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse to write a conversion over its own input."""
    if Path(src).resolve() == Path(dst).resolve():
        raise MedvlmError(f"the output folder {dst} is the input folder; choose another output folder")


def append_mean_rows(weight: torch.Tensor, n_new: int) -> torch.Tensor:
    """``weight`` [V, H] with ``n_new`` rows appended, each the mean of the existing rows (LLaVA's init)."""
    if n_new <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, H]
    return torch.cat([weight, mean.expand(n_new, -1)], dim=0)  # [V + n_new, H]
