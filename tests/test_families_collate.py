"""Model families through the collator: every processor tensor is carried, per-token ones padded with the
text, and a padded batch's loss equals the token-weighted per-sample losses (Qwen's mm_token_type_ids trap)."""

from __future__ import annotations

import pytest
import torch

from family_helpers import FAMILY_NAMES, images, msgs, multi_turn_sample, single_sample, tiny
from medvlm.data.collate import VLMCollator
from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError


def _features(proc):
    imgs = images()
    text_only = Sample("t", msgs(("user", "Define effusion."), ("assistant", "Fluid in a space.")))
    return [
        proc.encode(single_sample("Yes, it is."), images=imgs[:1]),
        proc.encode(multi_turn_sample(with_vuser=proc.spec.name != "llava"), images=imgs),
        proc.encode(text_only),
    ]


def _loss_sum(model, batch):
    """Sum of per-token losses and the learned-token count (the model's mean loss times the count)."""
    n = int((batch["labels"][:, 1:] != -100).sum())
    return model(**batch).loss.double() * n, n


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_loss_equals_token_weighted_sample_losses(family):
    model, proc = tiny(family)
    feats = _features(proc)
    collate = proc.collator()
    batch = collate(feats)
    for key in (*proc.spec.token_tensors, *[k for k in proc.spec.image_tensors if k in feats[0]]):
        assert key in batch, key
    for key in proc.spec.token_tensors:
        assert batch[key].shape == batch["input_ids"].shape
    with torch.no_grad():
        total, count = _loss_sum(model, batch)
        parts = [_loss_sum(model, collate([f])) for f in feats]
    per_sample = sum(s for s, _ in parts) / sum(n for _, n in parts)
    assert count == sum(n for _, n in parts)
    assert abs(float(total / count) - float(per_sample)) < 1e-5


def test_dropping_qwen_mm_token_type_ids_changes_the_loss():
    """The trap the collator guards against: without mm_token_type_ids Qwen falls back to 1-D positions."""
    model, proc = tiny("qwen2_5_vl")
    batch = proc.collator()(_features(proc)[:2])
    with torch.no_grad():
        kept = model(**batch).loss.item()
        dropped = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).loss.item()
    assert kept != dropped


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_left_padding_pads_per_token_tensors_on_the_left(family):
    _, proc = tiny(family)
    s = Sample("p", msgs(("user", "<image>\nWhat is shown?")), images=["a"])
    short = proc.encode(s, images=images()[:1], add_generation_prompt=True)
    long = proc.encode(multi_turn_sample(with_vuser=False), images=images())
    long.pop("labels")
    batch = proc.collator(padding_side="left")([short, long])
    key = proc.spec.token_tensors[0]
    n = short["input_ids"].numel()
    assert torch.equal(batch[key][0, -n:], short[key]) and not batch[key][0, :-n].any()
    assert torch.equal(batch["input_ids"][0, -n:], short["input_ids"])


def test_image_tensors_of_different_shapes_are_zero_padded_and_concatenated():
    collate = VLMCollator(0, image_keys=("pixel_values", "pixel_attention_mask"))
    a = {
        "input_ids": torch.tensor([1, 2]),
        "pixel_values": torch.ones(1, 2, 3, 4, 4),
        "pixel_attention_mask": torch.ones(1, 2, 4, 4, dtype=torch.bool),
    }
    b = {
        "input_ids": torch.tensor([3]),
        "pixel_values": torch.full((1, 5, 3, 4, 4), 2.0),
        "pixel_attention_mask": torch.ones(1, 5, 4, 4, dtype=torch.bool),
    }
    batch = collate([a, b, {"input_ids": torch.tensor([4])}])
    assert batch["pixel_values"].shape == (2, 5, 3, 4, 4)
    assert (batch["pixel_values"][0, :2] == 1).all() and (batch["pixel_values"][0, 2:] == 0).all()
    assert batch["pixel_attention_mask"].dtype == torch.bool and not batch["pixel_attention_mask"][0, 2:].any()
    with pytest.raises(MedvlmError, match="unknown keys"):
        collate([{"input_ids": torch.tensor([1]), "image_grid_thw": torch.ones(1, 3)}])
    with pytest.raises(MedvlmError, match="different ranks"):
        collate([a, {"input_ids": torch.tensor([1]), "pixel_values": torch.ones(2, 3)}])
