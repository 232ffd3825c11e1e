"""Labelled-positions LM head on model families (medvlm.train.family_loss): per family, the loss and the
gradients equal the full-logits path, the head sees only the labelled rows, and `num_items_in_batch`
normalisation (gradient accumulation) is unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from family_helpers import FAMILY_NAMES, images, msgs, multi_turn_sample, single_sample, tiny
from medvlm.data.schema import Sample
from medvlm.train.family_loss import add_labelled_positions, family_collator, labelled_positions


def _batch(proc):
    imgs = images()
    text_only = Sample("t", msgs(("user", "Define effusion."), ("assistant", "Fluid in a space.")))
    feats = [
        proc.encode(single_sample("Yes, it is."), images=imgs[:1]),
        proc.encode(multi_turn_sample(with_vuser=proc.spec.name != "llava"), images=imgs),
        proc.encode(text_only),
    ]
    return proc.collator("right")(feats)


def _loss_and_grads(model, batch, **extra):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **extra).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labelled_positions_loss_and_grads_equal_full_logits(family):
    model, proc = tiny(family)
    model.train()  # Gemma 3 builds its training attention mask from the labels: the training path is compared
    batch = _batch(proc)
    full, g_full = _loss_and_grads(model, batch)
    fast_batch = family_collator(lambda f: batch, labelled_logits_only=True)([])
    assert fast_batch["logits_to_keep"].dtype == torch.bool
    rows = {}

    def record(module, args, output):  # returns None: the output is only observed
        rows["shape"] = tuple(output.shape)

    hook = model.lm_head.register_forward_hook(record)
    try:
        fast, g_fast = _loss_and_grads(model, fast_batch)
    finally:
        hook.remove()
    n_learned = int((batch["labels"][:, 1:] != -100).sum())
    assert rows["shape"][0] == n_learned < batch["input_ids"].numel() // 4  # head ran on the learned rows only
    assert abs(fast.item() - full.item()) < 1e-5, (family, fast.item(), full.item())
    assert g_full.keys() == g_fast.keys()
    for name, g in g_full.items():
        assert torch.allclose(g_fast[name], g, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_num_items_in_batch_normalisation_is_kept(family):
    """The Trainer passes num_items_in_batch under gradient accumulation: sum / count on both paths."""
    model, proc = tiny(family)
    batch = _batch(proc)
    count = torch.tensor(37)
    with torch.no_grad():
        full = model(**batch, num_items_in_batch=count).loss
        fast = model(**add_labelled_positions(batch), num_items_in_batch=count).loss
    assert abs(fast.item() - full.item()) < 1e-5


def test_labelled_positions_targets_are_the_next_learned_tokens():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    keep, targets = labelled_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [5, 6, 7]


def test_batches_without_learned_tokens_or_labels_keep_full_logits():
    ids = torch.ones(1, 4, dtype=torch.long)
    nothing = {"input_ids": ids, "labels": torch.full((1, 4), -100)}
    assert add_labelled_positions(nothing) is nothing
    assert "logits_to_keep" not in add_labelled_positions({"input_ids": ids})
    base = object()
    assert family_collator(base, labelled_logits_only=False) is base


class _Collator(TrainerCallback):
    """Records the training dataloader's collate function."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.collate = train_dataloader.collate_fn


def test_family_run_uses_the_labelled_head_and_follows_the_full_logits_losses(tmp_path):
    """Wiring: `medvlm train` on a family passes labelled_logits_only to the collator; the loss curve is unchanged."""
    from medvlm.model.families.tiny import init_tiny_family
    from medvlm.train.family_loss import LabelledPositionsCollator
    from medvlm.train.run import run_training
    from train_helpers import make_demo, small_config

    demo = make_demo(tmp_path, n_images=10)
    start = init_tiny_family("tiny-qwen2_5_vl", tmp_path / "start")
    runs = {}
    for on in (True, False):
        seen = _Collator()
        cfg = small_config(
            demo,
            tmp_path / f"run_{on}",
            model_name_or_path=str(start),
            preset=None,
            labelled_logits_only=on,
            group_by_modality_length=False,
        )
        result = run_training(cfg, callbacks=[seen])
        assert isinstance(seen.collate, LabelledPositionsCollator) is on
        runs[on] = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(runs[True]) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(runs[True], runs[False], strict=True)), runs
