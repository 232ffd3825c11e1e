"""``sft`` with optional vision-tower LoRA (``vit_lora: true``; issue 14, item 3), on the native model and on the
qwen2_5_vl / idefics3 tiny families: only LM-LoRA, tower-LoRA and connector weights change (every frozen weight
bit-identical), the loss falls, and the saved checkpoint (adapters merged) reloads with the trained model's logits.
The default stays LLaVA-Med's (tower untouched in ``sft``) and STLLaVA-Med's (ViT-LoRA on in ``sq`` / ``dpo``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from family_helpers import images, single_sample
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset, load_pretrained
from medvlm.model.families.io import load_family
from medvlm.model.families.spec import part_of
from medvlm.model.families.tiny import init_tiny_family
from medvlm.train.config import load_config
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config


class Capture(TrainerCallback):
    """Keeps a copy of the trained (PEFT-wrapped, not yet merged) model at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = copy.deepcopy(model).eval()  # the final save merges the adapters into `model` in place


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("sft-vit"), n_images=16)


def _losses(result) -> tuple[float, float]:
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def _load(stage: str, **keys):
    return load_config(None, {"stage": stage, "preset": "tiny", "data_path": "train.json", "output_dir": "out", **keys})


# ---- model families ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_family_sft_vit_lora_trains_lm_lora_tower_lora_and_connector_only(family, demo, tmp_path):
    start = init_tiny_family(f"tiny-{family}", tmp_path / "start")
    base, proc = load_family(start)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    cap = Capture()
    out = tmp_path / "run"
    cfg = small_config(
        demo,
        out,
        model_name_or_path=str(start),
        preset=None,
        family=family,
        tune="lora",
        vit_lora=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        max_steps=30,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        group_by_modality_length=False,
        feature_cache="auto",
    )
    result = run_training(cfg, callbacks=[cap])
    first, last = _losses(result)
    assert result.steps == 30 and last < first - 0.3, (first, last)

    trained_lora: set[str] = set()
    ranks: dict[str, set[int]] = {}
    for name, value in cap.model.named_parameters():
        base_name = name.removeprefix("base_model.model.")
        if "lora_" in name:
            part = part_of(proc.spec, base_name)
            if "lora_A" in name:
                ranks.setdefault(part, set()).add(value.shape[0])
            elif value.abs().sum() > 0:  # B starts at zero: non-zero = it trained
                trained_lora.add(part)
            continue
        base_name = base_name.replace(".base_layer.", ".")
        part = part_of(proc.spec, base_name)
        assert torch.equal(value, before[base_name]) == (part != "connector"), (name, part)
    assert trained_lora == {"language_model", "vision_tower"}
    assert ranks == {"language_model": {8}, "vision_tower": {4}}  # each part its own rank

    # The saved folder: adapters merged (the tower's weights moved), equal logits after reload, plain transformers
    # loads it (the hub layout) and computes the same logits.
    from transformers import AutoModelForImageTextToText

    reloaded, rproc = load_family(out)
    tower_moved = [
        n
        for n, p in reloaded.named_parameters()
        if part_of(proc.spec, n) == "vision_tower" and not torch.equal(p, before[n])
    ]
    assert tower_moved
    batch = rproc.collator()([rproc.encode(single_sample(), images=images()[:1])])
    plain = AutoModelForImageTextToText.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        trained = cap.model(**batch).logits
        merged = reloaded.eval()(**batch).logits
        assert torch.allclose(trained, merged, atol=1e-5, rtol=1e-4)  # merging W + BA: float rounding only
        assert torch.equal(plain(**batch).logits, merged)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and any(v == 4 for v in adapter["rank_pattern"].values())
    assert "vit_lora: true" in (out / "train_config.yaml").read_text()


# ---- native model ------------------------------------------------------------------------------------
def _native_before():
    model, _ = build_preset("tiny", seed=42)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model, prefix):
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(prefix)}


def test_native_sft_vit_lora_trains_lm_lora_tower_lora_and_projector_only(demo, tmp_path):
    before = _native_before()
    cap = Capture()
    out = tmp_path / "native"
    cfg = small_config(
        demo,
        out,
        tune="lora",
        vit_lora=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        max_steps=30,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        feature_cache="auto",
    )
    result = run_training(cfg, callbacks=[cap])
    first, last = _losses(result)
    # a random tiny LM learns slowly through rank-8 adapters alone (6.5 -> 6.2 here); full sft is tested elsewhere
    assert result.steps == 30 and last < first - 0.2, (first, last)

    trained_lora: set[str] = set()
    for name, value in cap.model.named_parameters():
        base_name = name.removeprefix("base_model.model.")
        if "lora_" in name:
            if "lora_B" in name and value.abs().sum() > 0:
                trained_lora.add(base_name.split(".", 1)[0])
            continue
        if ".modules_to_save." in base_name:  # the projector's trained copy
            assert base_name.startswith("projector."), name
            continue
        base_name = base_name.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(value, before[base_name]), name  # every base weight frozen (the projector's original too)
    assert trained_lora == {"language_model", "vision_tower"}

    # Merged checkpoint: the projector and the adapted linears of the feature-feeding tower layer moved, nothing
    # else in the tower; reload gives the trained model's logits and a second load the same logits exactly.
    model, processor = load_pretrained(out)
    tower = _changed(before, model, "vision_tower.")
    moved = {n for n, v in tower.items() if v}
    # the tiny tower feeds its last layer (feature layer -1): LoRA merges move encoder-layer weights only
    assert moved and all(".encoder.layers." in n and n.endswith(".weight") for n in moved), moved
    assert all(_changed(before, model, "projector.").values())
    cache = result.cache_stats or {}
    assert not cache.get("hits") and not cache.get("misses")  # the tower trains: no frozen-feature cache
    from medvlm.data.schema import Message, Sample

    sample = Sample(
        "s", [Message.from_text("user", "<image>\nWhat is shown?"), Message.from_text("assistant", "A.")], images=["x"]
    )
    feat = processor.encode(sample, images=images()[:1])
    ids = feat["input_ids"].unsqueeze(0)
    pixels = feat["pixel_values"]
    with torch.no_grad():
        trained = cap.model(input_ids=ids, pixel_values=pixels).logits
        merged = model.eval()(input_ids=ids, pixel_values=pixels).logits
        again = load_pretrained(out)[0].eval()(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(trained, merged, atol=1e-5, rtol=1e-4)
    assert torch.equal(merged, again)


def test_native_sft_vit_lora_alone_trains_the_whole_lm_and_the_tower_lora(demo, tmp_path):
    """``tune: full`` + ``vit_lora: true``: LM and projector fully, the tower through LoRA (merged at the end)."""
    before = _native_before()
    out = tmp_path / "full"
    run_training(
        small_config(demo, out, vit_lora=True, vit_lora_r=4, vit_lora_alpha=8, max_steps=2, learning_rate=5e-3)
    )
    model, _ = load_pretrained(out)
    lm = _changed(before, model, "language_model.")
    assert lm["language_model.model.layers.0.self_attn.q_proj.weight"] and sum(lm.values()) >= 0.9 * len(lm)
    moved = {n for n, v in _changed(before, model, "vision_tower.").items() if v}
    assert moved and all(".encoder.layers." in n for n in moved)  # feature layer -1: both tower layers learn
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_default_sft_leaves_the_tower_untouched(demo, tmp_path):
    before = _native_before()
    out = tmp_path / "default"
    run_training(small_config(demo, out, tune="lora", lora_r=4, lora_alpha=8, max_steps=2, learning_rate=5e-3))
    model, _ = load_pretrained(out)
    assert not any(_changed(before, model, "vision_tower.").values())
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "vision_tower" in k]


# ---- defaults and refusals -----------------------------------------------------------------------------
def test_vit_lora_default_is_per_stage_and_an_explicit_value_wins():
    assert _load("sft").vit_lora is None and not _load("sft").vit_lora_on()
    assert _load("sq").vit_lora_on() and _load("dpo").vit_lora_on()
    assert _load("sft", vit_lora=True).vit_lora_on()
    assert not _load("sq", vit_lora=False).vit_lora_on() and not _load("dpo", vit_lora="false").vit_lora_on()
    from medvlm.train.stages import vit_spec

    assert vit_spec(_load("sft", vit_lora=True, lora_dropout=0.07)).dropout == 0.07  # sft: the LM's lora_dropout
    assert vit_spec(_load("sq")).dropout == 0.2 and vit_spec(_load("dpo")).dropout == 0.1  # STLLaVA-Med's
    assert vit_spec(_load("sft", vit_lora=True, vit_lora_dropout=0.3)).dropout == 0.3
    assert vit_spec(_load("sft")) is None


def test_align_and_contradictions_are_refused_with_the_fix():
    with pytest.raises(MedvlmError, match=r"vit_lora: stage 'align' trains only the projector .*remove vit_lora"):
        _load("align", vit_lora=True)
    with pytest.raises(MedvlmError, match="vit_lora_r is not used by stage 'align'"):
        _load("align", vit_lora_r=8)
    with pytest.raises(MedvlmError, match="set vit_lora: false"):
        _load("sft", vit_lora=True, tune_vision_tower=True)
    with pytest.raises(MedvlmError, match="vit_lora_grad is not used by stage 'sft'"):
        _load("sft", vit_lora=True, vit_lora_grad="published")  # the published no-grad tower is STLLaVA-Med's


@pytest.mark.parametrize("mode", ["fsdp2_cpu", "deepspeed_cpu"])
def test_cpu_loops_refuse_vit_lora(mode, tmp_path, demo):
    with pytest.raises(MedvlmError, match=f"distributed: {mode} trains without adapters.*vit_lora: true needs DDP"):
        run_training(small_config(demo, tmp_path / mode, vit_lora=True, distributed=mode))


def test_feature_cache_on_is_refused_when_the_tower_adapts(demo, tmp_path):
    with pytest.raises(MedvlmError, match="feature_cache: on needs a frozen vision tower .*vit_lora"):
        run_training(small_config(demo, tmp_path / "fc", tune="lora", vit_lora=True, feature_cache="on"))
