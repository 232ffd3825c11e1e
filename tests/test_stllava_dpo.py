"""STLLaVA-Med DPO (``stage: dpo``): the loss, a frozen reference with its own visual path, stored reference
log-probs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset, save_checkpoint
from medvlm.train.dpo_ref import compute_ref_logps, load_ref_logps
from medvlm.train.preference import (
    METRIC_KEYS,
    DPOCollator,
    build_preference_dataset,
    dpo_loss,
    reference_logps,
    sequence_logps,
)
from medvlm.train.recipes.dpo import prepare_dpo
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config, state


def _flat(values: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {f"{k}/{side}": v[i] for k, v in values.items() for i, side in enumerate(("c", "r"))}


def write_gold_prefs(demo, path, limit: int = 8) -> list[dict]:
    """Pairs from the synthetic VQA train split: the pixel-correct gold answer is chosen, a wrong one rejected."""
    recs = json.loads((demo / "vqa" / "train.json").read_text())
    answers = sorted({r["conversations"][1]["value"] for r in recs})
    out = []
    for r in recs[:limit]:
        gold = r["conversations"][1]["value"]
        if gold in ("yes", "no"):
            wrong = "no" if gold == "yes" else "yes"
        else:
            wrong = next(a for a in answers if a != gold and a not in ("yes", "no"))
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
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stllava_dpo")
    demo = make_demo(root, n_images=16)
    model, proc = build_preset("tiny", seed=3, template="v1_sq", projector="cluster")
    save_checkpoint(model, proc, root / "stage1")
    prefs = root / "prefs.json"
    write_gold_prefs(demo, prefs)
    return demo, root / "stage1", prefs


def _dpo_config(setup, out, **over):
    demo, stage1, prefs = setup
    keys = dict(
        stage="dpo",
        preset=None,
        model_name_or_path=str(stage1),
        data_path=str(prefs),
        tune="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        vit_lora_r=4,
        vit_lora_alpha=8,
        vit_lora_dropout=0.0,
        max_steps=3,
        learning_rate=5e-3,
        projector_lr=5e-3,
        vision_lr=5e-3,
        per_device_train_batch_size=2,
        group_by_modality_length=False,
    )
    keys.update(over)
    return small_config(demo, out, **keys)


def test_sequence_logps_sums_answer_tokens_in_fp32(setup):
    model, proc = build_preset("tiny", seed=3, template="v1_sq", projector="cluster")
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 9))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(input_ids=ids, labels=labels)
    logps = sequence_logps(out.logits, labels)  # [2]
    n = (labels[:, 1:] != -100).sum()
    assert logps.dtype == torch.float32
    assert torch.allclose(-logps.sum() / n, out.loss, atol=1e-5)  # the same tokens the LM loss averages


def test_dpo_loss_values():
    pi = torch.tensor([-1.0, -2.0, -3.0, -1.0])  # chosen [-1, -2], rejected [-3, -1]
    ref = torch.tensor([-1.5, -2.0, -2.0, -1.0])
    loss, stats = dpo_loss(pi, ref, beta=0.5)
    logits = torch.tensor([(-1 + 3) - (-1.5 + 2.0), (-2 + 1) - (-2.0 + 1.0)])
    assert math.isclose(loss.item(), -torch.nn.functional.logsigmoid(0.5 * logits).mean().item(), rel_tol=1e-6)
    assert stats["rewards/chosen"].tolist() == [0.25, 0.0]
    assert stats["rewards/rejected"].tolist() == [-0.5, 0.0]
    assert stats["rewards/accuracies"].tolist() == [1.0, 0.0]
    equal, _ = dpo_loss(ref, ref, beta=0.1)
    assert math.isclose(equal.item(), math.log(2), rel_tol=1e-6)


def test_pairs_learn_only_the_compared_answer(setup):
    demo, stage1, prefs = setup
    _, proc = build_preset("tiny", seed=3, template="v1_sq", projector="cluster")
    ds, report = build_preference_dataset([str(prefs)], proc, str(demo / "images"), 512)
    assert report.pairs == 8 and report.image_pairs == 8
    item = ds[0]
    pair = ds.pairs[0]
    for side in ("chosen", "rejected"):
        learned = [
            t for t, lab in zip(item[f"{side}_input_ids"].tolist(), item[f"{side}_labels"].tolist()) if lab != -100
        ]
        text = proc.tokenizer.decode(learned, skip_special_tokens=True).strip()
        assert text == getattr(pair, side)[0].text  # the answer (plus its EOS), nothing of the prompt
    assert item["pixel_values"].shape[0] == 1
    batch = DPOCollator(proc.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4


def test_reference_stays_frozen_and_stored_logps_equal_on_the_fly(setup, tmp_path):
    run = prepare_dpo(_dpo_config(setup, tmp_path / "fly"))
    trainer = run.trainer
    ref = trainer.ref_model
    before = state(ref)
    values0 = compute_ref_logps(ref, run.dataset, batch_size=3)
    # The reference never trains: frozen, eval mode, and not in the optimizer.
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    trainer.train()
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in ref.parameters()}
    after = state(ref)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _flat(compute_ref_logps(ref, run.dataset, batch_size=2)) == pytest.approx(_flat(values0), abs=1e-5)
    # The policy did train (its LoRA and projector moved away from the reference).
    assert trainer.state.global_step == 3
    fly_log = [h for h in trainer.state.log_history if "loss" in h]
    assert all(k in fly_log[0] for k in METRIC_KEYS)

    # The same run with stored reference log-probs: the file holds exactly the on-the-fly values,
    # and training sees the same losses and reference log-probs step by step.
    stored = run_training(_dpo_config(setup, tmp_path / "stored", ref_logps="auto"))
    values, fp = load_ref_logps(tmp_path / "stored" / "ref_logps.safetensors")
    assert fp and _flat(values) == pytest.approx(_flat(values0), abs=1e-5)
    st_log = [h for h in stored.log_history if "loss" in h]
    for a, b in zip(fly_log, st_log):
        for k in ("loss", "logps/ref_chosen", "logps/ref_rejected", "logps/chosen", "rewards/margins"):
            # rel 1e-4: the stored and on-the-fly reference values agree to 1e-5 (asserted above); two LoRA steps at
            # lr 5e-3 on the tiny preset (LM init std 0.1) amplify that to ~5e-5 relative in the policy's log-probs.
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-4), k


def test_stored_logps_are_refused_for_other_pairs(setup, tmp_path):
    demo, stage1, prefs = setup
    path = tmp_path / "ref.safetensors"
    prepare_dpo(_dpo_config(setup, tmp_path / "a", ref_logps=str(path)))
    assert path.is_file()
    other = tmp_path / "other.json"
    write_gold_prefs(demo, other, limit=4)
    with pytest.raises(MedvlmError, match="fingerprint"):
        prepare_dpo(_dpo_config(setup, tmp_path / "b", ref_logps=str(path), data_path=str(other)))


def test_ref_visual_path_policy_uses_the_policy_projector(setup, tmp_path):
    run = prepare_dpo(_dpo_config(setup, tmp_path / "p", ref_visual_path="policy"))
    batch = DPOCollator(run.processor.pad_token_id)([run.dataset[0], run.dataset[1]])
    ref = run.trainer.ref_model
    policy = run.trainer._vlm(run.trainer.model)
    own = reference_logps(ref, batch)
    with torch.no_grad():
        same = reference_logps(ref, batch, policy.get_image_features(batch["pixel_values"]))
        assert torch.allclose(own, same, atol=1e-5)  # before training both visual paths agree
        for p in policy.projector.parameters():
            p.add_(0.05)
        moved = reference_logps(ref, batch, policy.get_image_features(batch["pixel_values"]))
    assert not torch.allclose(own, moved, atol=1e-3)  # the published path follows the policy's projector
    with pytest.raises(MedvlmError, match="ref_visual_path: policy"):
        prepare_dpo(_dpo_config(setup, tmp_path / "q", ref_visual_path="policy", ref_logps="auto"))
    with pytest.raises(MedvlmError, match="ref_visual_path"):
        prepare_dpo(_dpo_config(setup, tmp_path / "r", ref_visual_path="shared"))


def test_rpo_adds_the_chosen_answers_token_mean_nll():
    pi = torch.tensor([-1.0, -2.0, -3.0, -1.0])  # chosen [-1, -2], rejected [-3, -1]
    ref = torch.tensor([-1.5, -2.0, -2.0, -1.0])
    n_tokens = torch.tensor([2, 3, 4, 1])
    plain, _ = dpo_loss(pi, ref, beta=0.5)
    rpo, stats = dpo_loss(pi, ref, beta=0.5, rpo_alpha=0.5, n_tokens=n_tokens)
    assert math.isclose(rpo.item(), plain.item() + 0.5 * (3.0 / 5), rel_tol=1e-6)  # only the chosen rows count
    assert stats["nll/chosen"].tolist() == pytest.approx([0.6, 0.6])
    with pytest.raises(ValueError, match="n_tokens"):
        dpo_loss(pi, ref, beta=0.5, rpo_alpha=1.0)


def test_rpo_term_in_training_equals_cross_entropy_of_the_chosen_answers(setup, tmp_path):
    run = prepare_dpo(_dpo_config(setup, tmp_path / "rpo", dpo_rpo_alpha=1.0))
    trainer = run.trainer
    batch = DPOCollator(run.processor.pad_token_id)([run.dataset[0], run.dataset[1], run.dataset[2]])
    model = trainer.model
    model.eval()  # no dropout: the two losses see the same logits
    with torch.no_grad():
        with_rpo = trainer.compute_loss(model, batch)
        trainer.rpo_alpha = None
        plain = trainer.compute_loss(model, batch)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits  # [2B, T, V]
    b = 3
    ce = torch.nn.functional.cross_entropy(
        logits[:b, :-1].flatten(0, 1).float(), batch["pair_labels"][:b, 1:].flatten(), ignore_index=-100
    )  # token mean over the chosen answers only
    assert with_rpo.item() == pytest.approx(plain.item() + ce.item(), abs=1e-4)
    assert ce.item() > 0.1  # a real term, not a rounding difference
    trainer.rpo_alpha = 1.0
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["nll/chosen"] > 0 for h in logged)  # the RPO term is logged beside the DPO metrics
    with pytest.raises(MedvlmError, match="dpo_rpo_alpha"):
        prepare_dpo(_dpo_config(setup, tmp_path / "neg", dpo_rpo_alpha=-1.0))
