"""`medvlm train` on model families: sft with LoRA on the LM (frozen weights bit-identical, connector learns),
full sft and align; the loss falls over 30 steps; options that do not apply are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from medvlm.errors import MedvlmError
from medvlm.model.families.io import load_family
from medvlm.model.families.spec import part_of
from medvlm.model.families.tiny import init_tiny_family
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config


class Capture(TrainerCallback):
    """Keeps the trained model's parameters (before any LoRA merge) at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("fam-demo"), n_images=16)


def _config(demo, start, out, **over):
    keys = dict(
        model_name_or_path=str(start),
        preset=None,
        max_steps=30,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        group_by_modality_length=False,
        feature_cache="auto",
    )
    keys.update(over)
    return small_config(demo, out, **keys)


def _first_last(result):
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_qwen2_5_vl_lora_sft_learns_and_leaves_frozen_weights_bit_identical(demo, tmp_path):
    start = init_tiny_family("tiny-qwen2_5_vl", tmp_path / "start")
    base, proc = load_family(start)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cap = Capture()
    cfg = _config(
        demo, start, tmp_path / "run", tune="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, family="qwen2_5_vl"
    )
    result = run_training(cfg, callbacks=[cap])
    first, last = _first_last(result)
    assert result.steps == 30 and last < first - 0.3, (first, last)
    seen_lora = False
    for name, value in cap.params.items():
        if "lora_" in name:
            seen_lora = True
            assert name.startswith("base_model.model.model.language_model."), name
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        part = part_of(proc.spec, base_name)
        same = torch.equal(value, before[base_name])
        assert same == (part != "connector"), (name, part)
    assert seen_lora
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "medvlm_family.json").read_text())["family"] == "qwen2_5_vl"
    trained, _ = load_family(out)  # the merged checkpoint loads like any family checkpoint
    assert not torch.equal(
        trained.state_dict()["model.visual.merger.mlp.0.weight"], before["model.visual.merger.mlp.0.weight"]
    )
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["samples"] > 0 and manifest["template"] is None


@pytest.mark.parametrize("family,stage", [("idefics3", "sft"), ("gemma3", "align")])
def test_full_sft_and_align_train_exactly_their_parts(family, stage, demo, tmp_path):
    """Full sft: connector + LM learn and the loss falls; align: only the connector changes (a random LM cannot
    use image features within 30 steps, so align's loss is not asserted)."""
    start = init_tiny_family(f"tiny-{family}", tmp_path / "start")
    base, proc = load_family(start)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cap = Capture()
    result = run_training(_config(demo, start, tmp_path / "run", stage=stage), callbacks=[cap])
    if stage == "sft":
        first, last = _first_last(result)
        assert last < first - 0.3, (first, last)
    trains = {"connector", "language_model"} if stage == "sft" else {"connector"}
    for name, value in cap.params.items():
        assert torch.equal(value, before[name]) == (part_of(proc.spec, name) not in trains), name


def test_options_that_do_not_apply_are_refused_before_loading(demo, tmp_path):
    start = init_tiny_family("tiny-gemma3", tmp_path / "start")
    for over, why in (
        ({"stage": "dpo", "ref_visual_path": "policy"}, "ref_visual_path does not apply"),
        ({"stage": "sq", "vit_lora_grad": "published"}, "vit_lora_grad does not apply"),
        ({"packing": True}, "packing does not apply"),
        ({"feature_cache": "on"}, "feature_cache does not apply"),
        ({"template": "chatml"}, "template does not apply"),
        ({"stage": "sq", "distributed": "fsdp2_cpu"}, "distributed is not used by stage 'sq'"),
        ({"tune": "qlora"}, "qlora"),
        ({"family": "qwen2_5_vl"}, "is a gemma3 checkpoint"),
    ):
        with pytest.raises(MedvlmError, match=why):
            run_training(_config(demo, start, tmp_path / "bad", **over))
        assert not (tmp_path / "bad").exists()
