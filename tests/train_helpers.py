"""Shared helpers for the training tests: the synthetic demo data and a small run config."""

from __future__ import annotations

from pathlib import Path

import torch

from medvlm.data.synth import generate_synth
from medvlm.train.config import TrainConfig, load_config


def make_demo(root: Path, n_images: int = 32) -> Path:
    """The synthetic demo dataset (64 px images) under ``root/demo``."""
    out = root / "demo"
    if not out.exists():
        generate_synth(out, n_images=n_images, seed=0, image_size=64, qa50_images=2)
    return out


def small_config(demo: Path, out: Path, **over) -> TrainConfig:
    """A fast tiny-preset run: 4 samples per step, no checkpoints, no TensorBoard."""
    keys = {
        "stage": "sft", "preset": "tiny", "data_path": str(demo / "vqa" / "train.json"),
        "image_folder": str(demo / "images"), "output_dir": str(out), "per_device_train_batch_size": 4,
        "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [],
        "warmup_ratio": 0.0, "disable_tqdm": True, "max_length": 512, "feature_cache": "off",
    }
    keys.update(over)
    return load_config(None, keys)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> dict[str, bool]:
    """For each tensor under ``prefix``: did it change at all (not bit-identical)?"""
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}
