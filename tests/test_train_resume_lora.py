"""A LoRA run resumed from ``checkpoint-2`` ends exactly as one that ran 4 steps straight.

The HF Trainer's ``checkpoint-N`` of a PEFT model holds only the adapter file; a model family trains its connector
(and, with ``tune: full`` beside tower LoRA, the whole LM) as base weights, which medvlm saves beside the adapter
(``trainable_base.safetensors``) and restores on resume. The native model trains its projector through PEFT's
``modules_to_save`` (in the adapter file): checked too, as a guard against regressions.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from medvlm.errors import MedvlmError
from medvlm.model.families import FAMILIES
from medvlm.model.families.io import load_family
from medvlm.model.families.spec import part_of
from medvlm.model.families.tiny import init_tiny_family
from medvlm.train.callbacks import read_log
from medvlm.train.run import run_training
from medvlm.utils.artifacts import TRAINABLE_BASE_FILE
from train_helpers import make_demo, small_config


class Capture(TrainerCallback):
    """The trainable parameters at the end of training (before the LoRA merge)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopAt(TrainerCallback):
    """Ends the run after ``step`` (its checkpoint is saved): the first half of an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("resume-lora"), n_images=16)


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-lora-start")
    return {f: init_tiny_family(f"tiny-{f}", root / f) for f in ("qwen2_5_vl", "idefics3")}


def _config(demo, out, start, **over):
    keys = dict(
        tune="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        vit_lora_dropout=0.0,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        group_by_modality_length=False,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        max_length=2048,
    )
    if start is not None:
        keys.update(model_name_or_path=str(start), preset=None)
    keys.update(over)
    return small_config(demo, out, **keys)


def _checkpoint_keys(ckpt) -> set[str]:
    keys = set()
    for name in ("adapter_model.safetensors", TRAINABLE_BASE_FILE):
        if (ckpt / name).is_file():
            with safe_open(str(ckpt / name), framework="pt") as f:
                keys |= set(f.keys())
    return keys


def _straight_and_resumed(demo, tmp_path, start, **over):
    """(straight capture, straight result, resumed capture, resumed folder)."""
    straight_cap = Capture()
    straight = run_training(_config(demo, tmp_path / "straight", start, **over), callbacks=[straight_cap])
    run_training(_config(demo, tmp_path / "resumed", start, **over), callbacks=[StopAt(2)])
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir() and not (tmp_path / "resumed" / "checkpoint-4").exists()
    resumed_cap = Capture()
    run_training(_config(demo, tmp_path / "resumed", start, **over), callbacks=[resumed_cap])  # auto: checkpoint-2
    return straight_cap, straight, resumed_cap, tmp_path / "resumed"


def _assert_same_run(straight_cap, straight, resumed_cap, resumed_dir):
    want = {h["step"]: h["loss"] for h in straight.log_history if "loss" in h}
    got = {r["step"]: r["loss"] for r in read_log(resumed_dir) if "loss" in r}
    assert set(want) == {1, 2, 3, 4} and {3, 4} <= set(got)
    for step in (1, 2, 3, 4):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    assert straight_cap.params.keys() == resumed_cap.params.keys()
    for name, value in straight_cap.params.items():
        assert torch.allclose(value, resumed_cap.params[name], atol=1e-6, rtol=0), name


CASES = [
    ("qwen2_5_vl", dict(stage="sft")),
    ("qwen2_5_vl", dict(stage="sft", vit_lora=True)),
    ("idefics3", dict(stage="sft")),
    ("idefics3", dict(stage="sft", vit_lora=True)),
    ("qwen2_5_vl", dict(stage="sq", tune="full")),  # the whole LM trains as base weights beside tower LoRA
]


@pytest.mark.parametrize(
    "family,over",
    CASES,
    ids=[f"{f}-{o['stage']}-{o.get('tune', 'lora')}-vit{int(o.get('vit_lora', o['stage'] == 'sq'))}" for f, o in CASES],
)
def test_family_lora_run_resumes_exactly(demo, starts, tmp_path, family, over):
    start = starts[family]
    spec = FAMILIES[family]
    straight_cap, straight, resumed_cap, resumed_dir = _straight_and_resumed(demo, tmp_path, start, **over)
    _assert_same_run(straight_cap, straight, resumed_cap, resumed_dir)
    ckpt = resumed_dir / "checkpoint-2"
    keys = _checkpoint_keys(ckpt)
    # checkpoint-2 holds every trainable parameter: adapters, the connector, and the LM when it trains fully
    parts = {part_of(spec, k.removeprefix("base_model.model.")) for k in keys if "lora_" not in k}
    assert "connector" in parts
    assert ("language_model" in parts) == (over.get("tune") == "full")
    assert all(".modules_to_save." not in k for k in keys)
    # not vacuous: the saved connector had already moved away from its starting value at step 2
    initial = dict(load_family(start)[0].named_parameters())
    with safe_open(str(ckpt / TRAINABLE_BASE_FILE), framework="pt") as f:
        moved = {
            k: not torch.equal(f.get_tensor(k), initial[k.removeprefix("base_model.model.")])
            for k in f.keys()
            if part_of(spec, k.removeprefix("base_model.model.")) == "connector"
        }
    assert moved and any(moved.values())
    assert json.loads((resumed_dir / "medvlm_family.json").read_text())["family"] == family  # final: hub layout
    assert (resumed_dir / "adapter" / "adapter_config.json").is_file()


def test_family_dpo_run_resumes_exactly(demo, starts, tmp_path):
    recs = json.loads((demo / "vqa" / "train.json").read_text())[:8]
    answers = sorted({r["conversations"][1]["value"] for r in recs})
    prefs = [
        {
            "id": f"p{r['id']}",
            "image": r["image"],
            "chosen_conversations": r["conversations"][:2],
            "reject_conversations": [
                r["conversations"][0],
                {"from": "gpt", "value": next(a for a in answers if a != r["conversations"][1]["value"])},
            ],
        }
        for r in recs
    ]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(prefs))
    straight_cap, straight, resumed_cap, resumed_dir = _straight_and_resumed(
        demo, tmp_path, starts["qwen2_5_vl"], stage="dpo", data_path=str(data), ref_logps="auto", dpo_beta=0.5
    )
    _assert_same_run(straight_cap, straight, resumed_cap, resumed_dir)
    spec = FAMILIES["qwen2_5_vl"]
    with safe_open(str(resumed_dir / "checkpoint-2" / TRAINABLE_BASE_FILE), framework="pt") as f:
        assert {part_of(spec, k.removeprefix("base_model.model.")) for k in f.keys()} == {"connector"}


def test_native_lora_run_resumes_exactly(demo, tmp_path):
    straight_cap, straight, resumed_cap, resumed_dir = _straight_and_resumed(demo, tmp_path, None, max_length=512)
    _assert_same_run(straight_cap, straight, resumed_cap, resumed_dir)
    ckpt = resumed_dir / "checkpoint-2"
    assert any(k.startswith("base_model.model.projector.") for k in _checkpoint_keys(ckpt))  # PEFT's modules_to_save
    assert not (ckpt / TRAINABLE_BASE_FILE).exists()  # nothing trains outside the adapter


def test_resume_without_the_trained_base_weights_is_refused(demo, starts, tmp_path):
    out = tmp_path / "run"
    run_training(_config(demo, out, starts["qwen2_5_vl"]), callbacks=[StopAt(2)])
    (out / "checkpoint-2" / TRAINABLE_BASE_FILE).unlink()  # a checkpoint written before this file existed
    with pytest.raises(MedvlmError, match="trainable_base.safetensors.*initial values"):
        run_training(_config(demo, out, starts["qwen2_5_vl"]))


@pytest.mark.parametrize("mode", ["fsdp2_cpu", "deepspeed_cpu"])
def test_manual_loops_refuse_resume_before_any_work(demo, tmp_path, mode):
    """The CPU loops write no checkpoint-N: a resume they would ignore is refused, with the fix."""
    keys = dict(distributed=mode, tune="full", save_strategy="no")
    with pytest.raises(MedvlmError, match=f"distributed: {mode} writes no mid-run checkpoints"):
        run_training(small_config(demo, tmp_path / "a", resume_from_checkpoint=str(tmp_path / "x"), **keys))
    ckpt = tmp_path / "b" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    with pytest.raises(MedvlmError, match=f"holds checkpoint-3 and distributed: {mode} cannot resume"):
        run_training(small_config(demo, tmp_path / "b", **keys))
