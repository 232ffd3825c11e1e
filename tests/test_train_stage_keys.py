"""Every ``TrainConfig`` key x every stage: a key the stage does not use is refused at config load (issue 15, item 17).

``FIELD_STAGES`` in ``medvlm.train.config`` says which stages read each field; this walks the whole table, and a
field missing from it fails here. Also: ``template`` switches the model being trained (STLLaVA-Med's
``--version v1_sq``), recorded in the output checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from medvlm.errors import MedvlmError
from medvlm.train.config import FIELD_STAGES, STAGES, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
BASE_KEYS = ("stage", "preset", "data_path", "output_dir")
# non-default values for the fields whose type alone does not give one
SAMPLES = {
    "tune": "lora",
    "feature_cache": "on",
    "distributed": "deepspeed_cpu",
    "lora_bias": "all",
    "vit_lora_grad": "published",
    "ref_visual_path": "policy",
    "data_format": "llava_med_instruct",
    "lr_scheduler_type": "linear",
    "save_strategy": "epoch",
    "optim": "adamw_torch",
    "template": "v1_sq",
    "projector_type": "linear",
    "model_name_or_path": "ckpt",
    "vision_tower_path": "tower",
    "language_model_path": "lm",
    "pretrain_projector": "stage1",
    "image_folder": "images",
    "feature_cache_dir": "cache",
    "ref_logps": "auto",
    "model_kwargs": {"image_aspect": "square"},
    "resume_from_checkpoint": False,
    "data_weights": [2.0],
    "lora_target_modules": ["q_proj"],
    "vit_lora_target_modules": ["q_proj"],
    "report_to": [],
    "training_args": {"eval_steps": 7},
    "family": "qwen2_5_vl",
    "eval_data_path": "test.json",
}


def _non_default(f: dataclasses.Field) -> typing.Any:
    if f.name in SAMPLES:
        return SAMPLES[f.name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    tp = typing.get_type_hints(TrainConfig)[f.name]
    options = typing.get_args(tp) or (tp,)
    if bool in options:
        return True if default is None else not default
    if int in options:
        return 8 if default is None else default + 1
    if float in options:
        return 0.5 if default is None else default + 0.25
    raise AssertionError(f"add a non-default sample for TrainConfig.{f.name} to SAMPLES")


def _load(stage: str, **keys) -> TrainConfig:
    return load_config(None, {"stage": stage, "preset": "tiny", "data_path": "train.json", "output_dir": "out", **keys})


def test_every_field_has_a_row_and_every_row_a_field():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FIELD_STAGES) == fields
    for name, stages in FIELD_STAGES.items():
        assert stages and set(stages) <= set(STAGES), name


@pytest.mark.parametrize("stage", STAGES)
def test_every_field_on_every_stage(stage):
    for f in dataclasses.fields(TrainConfig):
        if f.name in BASE_KEYS:
            continue
        value = _non_default(f)
        if f.name == "training_args":
            keys = {"eval_steps": 7}  # pass-through TrainingArguments keys arrive as top-level keys
        else:
            keys = {f.name: value}
        if f.name in ("model_name_or_path", "language_model_path"):
            keys["preset"] = None  # one starting point
        if f.name == "language_model_path":
            keys["vision_tower_path"] = "tower"
        if f.name == "vision_tower_path":
            keys.update(preset=None, language_model_path="lm")
        used = stage in FIELD_STAGES[f.name]
        try:
            _load(stage, **keys)
        except MedvlmError as e:
            if used:  # another rule may refuse the value (tune: lora in align ...), never the stage table
                assert "is not used by stage" not in str(e), (f.name, stage, str(e))
            else:
                assert f.name in str(e), (f.name, stage, str(e))
            continue
        assert used, f"{f.name}={value!r} was accepted in stage {stage!r}, which never reads it"


def test_message_names_the_key_and_the_stages_that_use_it():
    with pytest.raises(MedvlmError) as e:
        _load("sft", dpo_beta=0.5)
    assert str(e.value) == (
        "dpo_beta is not used by stage 'sft' (it applies to stage dpo); remove it (or set stage to one that uses it)"
    )
    with pytest.raises(MedvlmError, match=r"vision_lr is not used by stage 'align' \(it applies to stages sq, dpo\)"):
        _load("align", vision_lr=1e-5)
    with pytest.raises(MedvlmError, match="distributed is not used by stage 'sq'"):
        _load("sq", distributed="deepspeed_cpu")
    # a key at its default value changes nothing, so a resolved train_config.yaml (every key) reloads
    assert _load("sft", dpo_beta=TrainConfig.dpo_beta).dpo_beta == TrainConfig.dpo_beta


def test_saved_resolved_configs_and_every_shipped_yaml_load(tmp_path):
    yamls = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
    assert len(yamls) >= 10
    for p in yamls:
        cfg = load_config(p)
        again = tmp_path / f"{p.stem}.yaml"
        again.write_text(cfg.to_yaml())
        assert load_config(again).to_dict() == cfg.to_dict()


def test_template_switches_the_model_and_is_recorded(tmp_path, shared_dir):
    """``--stage sq --template v1_sq`` on a model saved with vicuna_v1: trains in v1_sq, the output keeps v1_sq."""
    from medvlm.model.build import build_preset, load_pretrained, save_checkpoint
    from medvlm.train.run import run_training

    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=2, template="vicuna_v1")
    assert model.config.template == "vicuna_v1"
    src = save_checkpoint(model, processor, tmp_path / "start")
    data = tmp_path / "sq.json"
    image = shared_dir / "images" / "bio_patch.png"
    data.write_text(
        json.dumps(
            [
                {
                    "id": str(i),
                    "image": image.name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A tissue patch."},
                        {"from": "human", "value": "Which colour dominates?"},
                        {"from": "gpt", "value": "Pink."},
                    ],
                }
                for i in range(4)
            ]
        )
    )
    cfg = load_config(
        None,
        {
            "stage": "sq",
            "template": "v1_sq",
            "model_name_or_path": str(src),
            "data_path": str(data),
            "image_folder": str(image.parent),
            "output_dir": str(tmp_path / "out"),
            "max_steps": 1,
            "per_device_train_batch_size": 2,
            "save_strategy": "no",
            "report_to": [],
            "disable_tqdm": True,
            "max_length": 512,  # the tiny preset's 64 image tokens + v1_sq's system prompt and two turns
            "resume_from_checkpoint": None,
        },
    )
    run_training(cfg)
    out_model, out_proc = load_pretrained(tmp_path / "out")
    assert out_model.config.template == "v1_sq" and out_proc.template == "v1_sq"
    assert load_pretrained(src)[0].config.template == "vicuna_v1"  # the starting checkpoint is untouched
    with pytest.raises(MedvlmError, match="only stage 'align' trains with it, not 'sft'"):
        from medvlm.train.setup import training_processor

        training_processor(_load("sft", template="plain"), model, processor)
