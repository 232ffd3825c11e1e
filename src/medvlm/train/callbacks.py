"""Trainer callbacks: run artifacts beside every checkpoint, a JSON-lines log, the loss-curve PNG.

The HF ``ProgressCallback`` already draws the progress bar and prints one line per logging step;
TensorBoard (or W&B, ``report_to``) gets the same scalars. These callbacks add what makes a
checkpoint reproducible on its own (resolved config, data manifest, processor with its template)
and a loss curve a researcher can glance at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medvlm.utils.artifacts import DATA_MANIFEST_FILE, LOSS_CURVE_FILE, TRAIN_CONFIG_FILE, TRAIN_LOG_FILE
from medvlm.utils.io import append_jsonl, atomic_path, write_json_atomic, write_text_atomic


def plot_loss_curve(log_history: list[dict[str, Any]], dest: str | os.PathLike, title: str = "training loss") -> bool:
    """Write a PNG of loss against step (atomic); False when there is nothing to plot."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = zip(*points)
    ax.plot(steps, losses, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


class RunArtifactsCallback(TrainerCallback):
    """Writes the resolved config and data manifest into each checkpoint, logs lines, redraws the loss curve."""

    def __init__(self, config_yaml: str, manifest: dict[str, Any], title: str):
        self.config_yaml = config_yaml
        self.manifest = manifest
        self.title = title

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_text_atomic(ckpt / TRAIN_CONFIG_FILE, self.config_yaml)
                write_json_atomic(ckpt / DATA_MANIFEST_FILE, self.manifest)
            plot_loss_curve(state.log_history, Path(args.output_dir) / LOSS_CURVE_FILE, self.title)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
            append_jsonl(Path(args.output_dir) / TRAIN_LOG_FILE, row)
        return control


class TrainableBaseCallback(TrainerCallback):
    """Saves a LoRA run's trained base weights beside the adapter in each ``checkpoint-N`` (rank 0).

    The Trainer's ``checkpoint-N`` of a PEFT model holds the adapter file only; a base weight trained through
    ``requires_grad`` (a family's connector, a fully tuned LM beside tower LoRA) goes into
    ``trainable_base.safetensors`` here and is restored on resume (:func:`medvlm.train.checkpoint.load_trainable_base`).
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        from medvlm.train.checkpoint import save_trainable_base

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and model is not None and ckpt.is_dir():
            save_trainable_base(model, ckpt)
        return control


def read_log(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``train_log.jsonl`` (a torn last line from a killed run is skipped)."""
    path = Path(output_dir) / TRAIN_LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
