"""Shared helpers for the training tests: the synthetic demo data and a small run config."""

from __future__ import annotations

from pathlib import Path

import torch

from medvlm.data.synth import generate_synth
from medvlm.train.config import FIELD_STAGES, TrainConfig, load_config


def make_demo(root: Path, n_images: int = 32) -> Path:
    """The synthetic demo dataset (64 px images) under ``root/demo``."""
    out = root / "demo"
    if not out.exists():
        generate_synth(out, n_images=n_images, seed=0, image_size=64, qa50_images=2)
    return out


def small_config(demo: Path, out: Path, **over) -> TrainConfig:
    """A fast tiny-preset run: 4 samples per step, no checkpoints, no TensorBoard."""
    keys = {
        "stage": "sft",
        "preset": "tiny",
        "data_path": str(demo / "vqa" / "train.json"),
        "image_folder": str(demo / "images"),
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "warmup_ratio": 0.0,
        "disable_tqdm": True,
        "max_length": 512,
    }
    if over.get("stage", "sft") in ("align", "sft"):
        keys["feature_cache"] = "off"  # the feature cache exists in these stages only (a key sq/dpo refuse)
        # These tests check LLaVA-Med's stage semantics on the tiny preset: switch off what the preset's random
        # parts would otherwise turn on (tower / LM training in both stages, image augmentation, per-image grouping).
        keys.update({"tune_vision_tower": False, "image_augment": False, "group_by_image": False})
        if over.get("stage") == "align":
            keys["tune_language_model"] = False
    if over.get("stage") == "vision":  # its own loop: the Trainer's keys are refused there (FIELD_STAGES)
        keys = {k: v for k, v in keys.items() if "vision" in FIELD_STAGES[k]}
    keys.update(over)
    return load_config(None, keys)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> dict[str, bool]:
    """For each tensor under ``prefix``: did it change at all (not bit-identical)?"""
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}


TORCHRUN_WORKER = """
import json, os, sys
from medvlm.train.config import load_config
from medvlm.train.run import run_training
r = run_training(load_config(None, json.loads(sys.argv[1])))
rank = int(os.environ["RANK"])
with open(sys.argv[2] + f".rank{rank}.json", "w") as f:
    json.dump({"losses": [h["loss"] for h in r.log_history if "loss" in h], "shards": r.shards,
               "world": int(os.environ["WORLD_SIZE"])}, f)
"""


def torchrun_two(tmp_path: Path, keys: dict, tag: str) -> list[dict]:
    """Run ``run_training(keys)`` under ``torchrun --nproc_per_node 2``; each rank's losses, shards and world size."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        json.dumps(keys),
        str(tmp_path / tag),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"{tag}.rank{r}.json").read_text()) for r in (0, 1)]


def config_keys(cfg: TrainConfig) -> dict:
    """A config as the flat key mapping ``load_config`` takes (nulls left out)."""
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


def one_process_baseline(tmp_path: Path) -> tuple[Path, dict, list[float]]:
    """The reference of the multi-process tests: demo folder, shared config keys, and the 4 logged losses of one
    process at 4 samples per step (16 demo samples; checkpoint in ``tmp_path / "single"``)."""
    import json

    from medvlm.train.run import run_training

    demo = make_demo(tmp_path)
    data = tmp_path / "train16.json"
    data.write_text(json.dumps(json.loads((demo / "vqa" / "train.json").read_text())[:16]))
    common = dict(data_path=str(data), max_steps=4, learning_rate=3e-3, weight_decay=0.01)
    single = run_training(small_config(demo, tmp_path / "single", per_device_train_batch_size=4, **common))
    want = [h["loss"] for h in single.log_history if "loss" in h]
    assert len(want) == 4
    return demo, common, want
