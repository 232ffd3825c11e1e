"""``labelled_logits_only``: the LM head at labelled positions only gives the full-logits loss and gradients.

Compared on the tiny preset in fp32, for the align and sft stages, with two accumulated micro-batches
normalised as the HF Trainer does (``num_items_in_batch``), padded and packed, image and text-only samples
mixed; then the Trainer path itself: its head sees only labelled rows, and the loss curve is unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset
from medvlm.train.data import build_dataset
from medvlm.train.run import run_training
from medvlm.train.stages import apply_stage
from medvlm.train.trainer import TrainCollator
from train_helpers import make_demo, small_config


def mixed_data(tmp_path, demo, n_image: int = 6, n_text: int = 3):
    """A data file of VQA samples with images followed by text-only conversations (the images dropped)."""
    records = json.loads((demo / "vqa" / "train.json").read_text())[: n_image + n_text]
    for r in records[n_image:]:
        r.pop("image", None)
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def accumulated(model, batches, labelled: bool, num_items: torch.Tensor | None):
    """Summed loss and trainable-parameter gradients over micro-batches, as the Trainer accumulates them."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        out = model(**b, use_cache=False, num_items_in_batch=num_items, labelled_logits_only=labelled)
        if labelled:
            assert out.logits is None  # no [B, T, V] tensor was built
        else:
            assert out.logits.shape == (*b["input_ids"].shape, model.config.text_config.vocab_size)
        out.loss.backward()
        total += float(out.loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return total, grads


@pytest.mark.parametrize("stage,packing", [("align", False), ("sft", False), ("sft", True), ("align", True)])
def test_loss_and_gradients_equal_full_logits(tmp_path, stage, packing):
    torch.manual_seed(0)
    demo = make_demo(tmp_path)
    cfg = small_config(demo, tmp_path / "out", stage=stage, data_path=str(mixed_data(tmp_path, demo)))
    model, processor = build_preset("tiny", seed=0)
    dataset, manifest = build_dataset(
        cfg.sources(), processor, image_folder=cfg.image_folder, max_length=cfg.max_length
    )
    assert manifest.image_samples == 6 and manifest.text_samples == 3
    model, plan, _ = apply_stage(model, cfg)
    model.train()
    collate = TrainCollator(processor.pad_token_id, cfg.max_length if packing else None)
    # Two accumulated micro-batches; the second mixes image and text-only samples.
    batches = [collate([dataset[i] for i in (0, 1, 2)]), collate([dataset[i] for i in (3, 6, 4, 7)])]
    for b in batches:
        b.pop("image_is_cached", None)
        b.pop("image_keys", None)
    assert ("position_ids" in batches[0]) == packing
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in batches)  # the Trainer's num_items_in_batch
    for n_items in (num_items, None):  # accumulation normalisation, and the plain per-batch mean
        full_loss, full_grads = accumulated(model, batches, False, n_items)
        part_loss, part_grads = accumulated(model, batches, True, n_items)
        assert abs(full_loss - part_loss) < 1e-6
        assert full_grads.keys() == part_grads.keys()
        assert any(k.startswith("projector.") for k in full_grads)
        assert any(k.startswith("language_model.") for k in full_grads) == (stage == "sft")
        for k, g in full_grads.items():
            torch.testing.assert_close(part_grads[k], g, atol=1e-6, rtol=1e-5, msg=k)
            assert g.abs().sum() > 0, k


class HeadRows(TrainerCallback):
    """Records the input shape of every call of the model's output head during training."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_output_embeddings().register_forward_hook(lambda m, inp, out: self.shapes.append(tuple(inp[0].shape)))


def test_trainer_uses_labelled_positions_and_keeps_the_loss_curve(tmp_path):
    demo = make_demo(tmp_path)
    data = mixed_data(tmp_path, demo, n_image=8, n_text=4)
    common = dict(
        stage="sft",
        data_path=str(data),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
    )
    runs = {}
    for flag in (True, False):
        hook = HeadRows()
        r = run_training(
            small_config(demo, tmp_path / f"run_{flag}", labelled_logits_only=flag, **common), callbacks=[hook]
        )
        runs[flag] = ([h["loss"] for h in r.log_history if "loss" in h], hook.shapes)
    (on_losses, on_shapes), (off_losses, off_shapes) = runs[True], runs[False]
    assert len(on_shapes) == len(off_shapes) == 4  # 2 steps x 2 micro-batches
    assert all(len(s) == 2 for s in on_shapes)  # [N learned positions, hidden]
    assert all(len(s) == 3 for s in off_shapes)  # [B, T, hidden]
    for on, off in zip(on_shapes, off_shapes):
        assert on[0] < off[0] * off[1]  # fewer rows than every position of the micro-batch
    assert len(on_losses) == len(off_losses) == 2
    assert max(abs(a - b) for a, b in zip(on_losses, off_losses)) < 1e-5


def test_refuses_lms_that_transform_their_logits():
    model, processor = build_preset("tiny", seed=0)
    model.language_model.config.final_logit_softcapping = 30.0  # as Gemma 2 does
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(MedvlmError, match="final_logit_softcapping"):
        model(input_ids=ids, labels=ids, labelled_logits_only=True)
    assert model(input_ids=ids, labels=ids).logits.shape == (1, 4, model.config.text_config.vocab_size)
