"""The exact file set of a checkpoint: a native model after ``align`` and after ``sft``, and a model-family one.

A renamed, lost or stray file shows here (the names are written out, not taken from
:mod:`medvlm.utils.artifacts`, so that a change there must be made on purpose in both places).
"""

from __future__ import annotations

import json

from family_helpers import tiny
from medvlm.model.families.io import save_family
from medvlm.train.run import run_training
from medvlm.utils import artifacts
from train_helpers import make_demo, small_config

NATIVE_MODEL = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "medvlm_processor.json",
    "trainable_parts.json",
    "README.md",
}
FAMILY_MODEL = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "medvlm_family.json",
    "README.md",
}
RUN = {"train_config.yaml", "data_manifest.json", "train_log.jsonl", "loss_curve.png"}


def _files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_native_checkpoints_after_align_and_sft_hold_exactly_these_files(tmp_path):
    demo = make_demo(tmp_path, n_images=16)
    align = tmp_path / "align"
    run_training(small_config(demo, align, stage="align", data_path=str(demo / "alignment.json"), max_steps=2))
    assert _files(align) == NATIVE_MODEL | RUN
    sft = tmp_path / "sft"
    run_training(small_config(demo, sft, stage="sft", preset=None, model_name_or_path=str(align), max_steps=2))
    assert _files(sft) == NATIVE_MODEL | RUN
    # the run files are what they say: the resolved config, the data manifest, one log line per step
    assert "stage: sft" in (sft / artifacts.TRAIN_CONFIG_FILE).read_text()
    assert json.loads((sft / artifacts.DATA_MANIFEST_FILE).read_text())
    assert len((sft / artifacts.TRAIN_LOG_FILE).read_text().splitlines()) >= 2
    assert (sft / artifacts.LOSS_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_family_checkpoint_holds_exactly_these_files(tmp_path):
    model, processor = tiny("qwen2_5_vl")
    out = save_family(model, processor, tmp_path / "qwen")
    assert _files(out) == FAMILY_MODEL
    assert json.loads((out / artifacts.FAMILY_FILE).read_text())["family"] == "qwen2_5_vl"
    demo = make_demo(tmp_path, n_images=16)
    run = tmp_path / "sft"
    run_training(
        small_config(demo, run, stage="sft", preset=None, model_name_or_path=str(out), max_steps=2, max_length=2048)
    )
    assert _files(run) == FAMILY_MODEL | RUN
