"""STLLaVA-Med's stages on model families: ``sq`` (VUSER questions learned) and ``dpo`` (frozen reference, stored
reference log-probs), with LoRA on the LM, LoRA on the vision tower and a trained connector; every frozen weight
stays bit-identical."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from medvlm.errors import MedvlmError
from medvlm.model.families.io import load_family
from medvlm.model.families.spec import part_of
from medvlm.model.families.tiny import init_tiny_family
from medvlm.train.config import DataSource
from medvlm.train.data import build_dataset
from medvlm.train.dpo_ref import compute_ref_logps, load_ref_logps
from medvlm.train.recipes.dpo import prepare_dpo
from medvlm.train.run import run_training
from medvlm.train.self_training import SelfQuestioningDataset
from train_helpers import make_demo, small_config


class Capture(TrainerCallback):
    """Keeps the trained model's parameters (before the LoRA merge) at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("fam-st"), n_images=16)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    start = init_tiny_family("tiny-qwen2_5_vl", tmp_path_factory.mktemp("fam-st-start") / "qwen")
    model, proc = load_family(start)
    return start, proc, {n: p.detach().clone() for n, p in model.named_parameters()}


def _config(demo, start, out, **over):
    keys = dict(
        model_name_or_path=str(start),
        preset=None,
        tune="lora",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        group_by_modality_length=False,
    )
    keys.update(over)
    return small_config(demo, out, **keys)


def _check_only_adapters_and_connector_changed(params, before, spec, full=("connector",)) -> set[str]:
    """Every base weight outside the ``full`` parts is bit-identical; returns the parts holding trained LoRA weights."""
    lora_parts = set()
    for name, value in params.items():
        base_name = name.removeprefix("base_model.model.")
        if "lora_" in name:
            if "lora_B" in name and value.abs().sum() > 0:  # B starts at zero: non-zero = it trained
                lora_parts.add(part_of(spec, base_name))
            continue
        base_name = base_name.replace(".base_layer.", ".")
        assert torch.equal(value, before[base_name]) == (part_of(spec, base_name) not in full), name
    return lora_parts


def _write_multi_turn(demo, path) -> None:
    """The VQA questions of each image as one conversation (short, learnable answers; later turns can be VUSER)."""
    by_image: dict[str, list] = {}
    for r in json.loads((demo / "vqa" / "train.json").read_text()):
        by_image.setdefault(r["image"], []).append(r["conversations"])
    out = []
    for i, (image, convs) in enumerate(sorted(by_image.items())):
        turns = list(convs[0])
        for c in convs[1:]:
            turns += [{"from": "human", "value": c[0]["value"].replace("<image>\n", "")}, c[1]]
        out.append({"id": f"mt{i}", "image": image, "conversations": turns})
    path.write_text(json.dumps(out))


def test_family_sq_learns_vuser_questions_with_tower_lora(demo, qwen, tmp_path):
    """``sq`` with the whole LM (``tune: full``; LM-LoRA is the dpo test's) and LoRA on the tower: a random tiny LM
    learns templated questions too slowly through LoRA alone for a 30-step test."""
    start, proc, before = qwen
    data = tmp_path / "multi_turn.json"
    _write_multi_turn(demo, data)
    base, _ = build_dataset([DataSource(str(data))], proc, image_folder=str(demo / "images"), max_length=512)
    plain = sum(int((base[i]["labels"] != -100).sum()) for i in range(4))
    vuser = SelfQuestioningDataset(base, 1.0, seed=0)
    assert sum(int((vuser[i]["labels"] != -100).sum()) for i in range(4)) > plain  # the questions are learned
    cap = Capture()
    result = run_training(
        _config(demo, start, tmp_path / "sq", stage="sq", data_path=str(data), max_steps=30, sq_r=0.5, tune="full"),
        callbacks=[cap],
    )
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert result.steps == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    # Tower LoRA trained; connector and LM trained fully; the tower's own weights bit-identical.
    assert _check_only_adapters_and_connector_changed(
        cap.params, before, proc.spec, full=("connector", "language_model")
    ) == {"vision_tower"}
    out = tmp_path / "sq"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "medvlm_family.json").read_text())["family"] == "qwen2_5_vl"
    load_family(out)  # the merged checkpoint loads


def _write_prefs(demo, path, limit: int = 8) -> None:
    """The gold VQA answer is chosen, another answer rejected."""
    recs = json.loads((demo / "vqa" / "train.json").read_text())
    answers = sorted({r["conversations"][1]["value"] for r in recs})
    out = []
    for r in recs[:limit]:
        gold = r["conversations"][1]["value"]
        wrong = next(a for a in answers if a != gold)
        human = r["conversations"][0]
        out.append(
            {
                "id": f"vqa{r['id']}",
                "image": r["image"],
                "chosen_conversations": [human, {"from": "gpt", "value": gold}],
                "reject_conversations": [human, {"from": "gpt", "value": wrong}],
            }
        )
    path.write_text(json.dumps(out))


def test_family_dpo_with_stored_reference_logps_learns_and_keeps_frozen_weights(demo, qwen, tmp_path):
    start, proc, before = qwen
    prefs = tmp_path / "prefs.json"
    _write_prefs(demo, prefs)
    cap = Capture()
    cfg = _config(
        demo,
        start,
        tmp_path / "dpo",
        stage="dpo",
        data_path=str(prefs),
        ref_logps="auto",
        max_steps=16,
        dpo_beta=0.5,
        learning_rate=5e-3,
    )
    result = run_training(cfg, callbacks=[cap])
    rows = [h for h in result.log_history if "loss" in h]
    # Step 1: the policy is the reference (LoRA B = 0), so the stored reference log-probs equal the policy's own.
    assert rows[0]["logps/chosen"] == pytest.approx(rows[0]["logps/ref_chosen"], abs=1e-3)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert sum(r["loss"] for r in rows[-4:]) / 4 < math.log(2) - 0.1, [r["loss"] for r in rows]
    assert _check_only_adapters_and_connector_changed(cap.params, before, proc.spec) == {
        "language_model",
        "vision_tower",
    }
    stored, _ = load_ref_logps(tmp_path / "dpo" / "ref_logps.safetensors")
    # The stored values are the frozen reference's: the on-the-fly reference computes the same numbers.
    job = prepare_dpo(_config(demo, start, tmp_path / "fly", stage="dpo", data_path=str(prefs)), family="qwen2_5_vl")
    fly = compute_ref_logps(job.trainer.ref_model, job.dataset, batch_size=3)
    assert set(fly) == set(stored)
    for k in stored:
        assert fly[k] == pytest.approx(stored[k], abs=1e-3)
    batch = job.dataset.collator()([job.dataset[0], job.dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4  # chosen rows, then rejected
    assert "mm_token_type_ids" in batch  # Qwen's per-token types reach policy and reference


def test_family_self_training_refusals(demo, qwen, tmp_path):
    start, _, _ = qwen
    for over, why in (
        ({"stage": "sq", "vit_lora_target_modules": ["nope"]}, "vit_lora_target_modules"),
        ({"stage": "dpo", "ref_visual_path": "policy"}, "ref_visual_path does not apply"),
        ({"stage": "sq", "tune": "qlora"}, "qlora"),
    ):
        with pytest.raises(MedvlmError, match=why):
            run_training(_config(demo, start, tmp_path / "bad", data_path=str(demo / "instruct.json"), **over))
