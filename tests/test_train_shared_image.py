"""Shared-image rows (isolate_questions): each question's logits equal its single-question sample's, the row's loss is
the singles' token mean, masks and labels are exact, and the key is refused where it cannot take effect."""

from __future__ import annotations

import json

import pytest
import torch

from medvlm.data.benchmarks.group import group_by_image, split_merged
from medvlm.data.collate import IGNORE_INDEX, VLMCollator
from medvlm.data.readers.formats import convert_record
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset
from medvlm.train.data import isolated_row
from medvlm.train.run import run_training
from medvlm.train.shared_image import (
    PAD_SEGMENT,
    additive_mask,
    segment_attention_mask,
    shared_prefix_row,
)
from medvlm.train.trainer import TrainCollator
from train_helpers import make_demo, small_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("shared"))


def _merged(demo, n_images: int):
    records = json.loads((demo / "vqa" / "train.json").read_text())
    samples = [convert_record("llava", r, i, "train.json") for i, r in enumerate(records)]
    merged = [s for s in group_by_image(samples, seed=0) if len(s.messages) >= 4]
    return merged[:n_images]


def test_split_inverts_the_merge(demo):
    merged = _merged(demo, 1)[0]
    singles = split_merged(merged)
    turns = [m for m in merged.messages if m.role != "system"]
    assert len(singles) == len(turns) // 2 >= 2
    for k, s in enumerate(singles):
        user, answer = [m for m in s.messages if m.role != "system"]
        assert user.content[0] == {"type": "image"} and user.num_images == 1
        assert user.text == turns[2 * k].text and answer.text == turns[2 * k + 1].text
        assert s.images == merged.images
    one = split_merged(singles[0])
    assert one == [singles[0]]  # a single question stays as it is
    dialogue = type(merged)(merged.id, merged.messages, merged.images, {})  # not merged by group_by_image
    assert split_merged(dialogue) == [dialogue]  # a real multi-turn conversation keeps its context


def test_mask_positions_and_labels_are_exact(demo):
    _, processor = build_preset("tiny", seed=0)
    singles = split_merged(_merged(demo, 1)[0])
    enc = [processor.encode_text(s, max_length=512) for s in singles]
    row = shared_prefix_row(enc, processor.image_token_id, "test")
    p = row["segment_ids"].count(0)
    assert processor.image_token_id not in row["input_ids"][p:]  # every image token is shared
    assert row["input_ids"][:p] == enc[0].input_ids[:p]
    at = p
    for k, e in enumerate(enc):
        n = len(e.input_ids) - p
        assert row["input_ids"][at : at + n] == e.input_ids[p:]
        assert row["position_ids"][at : at + n] == list(range(p, len(e.input_ids)))
        assert row["segment_ids"][at : at + n] == [k + 1] * n
        assert row["labels"][at] == IGNORE_INDEX and row["labels"][at + 1 : at + n] == e.labels[p + 1 :]
        at += n
    assert sum(lab != IGNORE_INDEX for lab in row["labels"]) == sum(
        lab != IGNORE_INDEX for e in enc for lab in e.labels
    )
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, PAD_SEGMENT]])
    m = segment_attention_mask(seg)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False, False]  # prefix + own segment, causal
    assert m[5].tolist() == [True, True, False, False, True, True, False]  # never the other question
    assert m[6].tolist() == [False] * 6 + [True]  # padding: itself only
    assert additive_mask(m[None, None], torch.float32)[0, 0, 5, 2] == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_row_logits_and_loss_equal_single_questions(demo, attn):
    torch.manual_seed(0)
    model, processor = build_preset("tiny", seed=0)
    model.set_attn_implementation(attn)
    model.eval()
    merged = _merged(demo, 3)
    rows, singles = [], []
    for s in merged:
        parts = split_merged(s)
        feats = processor.encode(parts[0], image_folder=demo / "images", max_length=512)
        row = isolated_row(parts, processor, 512, s.id)
        rows.append({**feats, **{k: torch.tensor(v) for k, v in row.items()}})
        singles.append([processor.encode(q, image_folder=demo / "images", max_length=512) for q in parts])
    batch = TrainCollator(processor.pad_token_id)(rows)
    assert batch["attention_mask"].shape[1] == 1 and batch["pixel_values"].shape[0] == len(merged)
    mask = additive_mask(batch["attention_mask"], torch.float32)
    flat = [f for qs in singles for f in qs]
    ref_batch = VLMCollator(processor.pad_token_id)(flat)
    with torch.no_grad():
        out = model(**{**batch, "attention_mask": mask}, use_cache=False)
        ref = model(**ref_batch, use_cache=False)
    assert abs(float(out.loss) - float(ref.loss)) < 1e-5, (float(out.loss), float(ref.loss))
    i = 0
    for r, (row, qs) in enumerate(zip(rows, singles)):
        seg = row["segment_ids"].tolist()
        for k, f in enumerate(qs):
            at = [t for t, s in enumerate(seg) if s == k + 1]
            n = len(f["input_ids"])
            got = out.logits[r, at]  # [n_k, V]: the question's own tokens in the row
            want = ref.logits[i, n - len(at) : n]  # the same tokens alone
            assert torch.allclose(got, want, atol=1e-4), (attn, r, k, float((got - want).abs().max()))
            i += 1


@pytest.mark.parametrize("cache", ["off", "on"])
def test_training_with_isolated_questions_follows_single_questions(demo, tmp_path, cache):
    """One step on one image's row = one step on its questions as single samples (same loss, same update).

    Plain SGD at rate 1, so the update is the (clipped) gradient itself: Adam's first step, lr * g / (|g| + eps),
    turns last-digit differences in near-zero gradients into differences of a few percent of lr, which vary with the
    CPU's floating-point order (2.4e-4 at lr 1e-2 on one machine, under 1e-4 on another; 1.2e-7 with SGD).
    """
    common = dict(
        max_steps=1, learning_rate=1.0, optim="sgd", feature_cache=cache, feature_cache_dir=str(tmp_path / "fc")
    )
    merged = _merged(demo, 1)[0]
    data = tmp_path / "one_image.json"
    records = [r for r in json.loads((demo / "vqa" / "train.json").read_text()) if r["image"] == merged.images[0]]
    data.write_text(json.dumps(records))
    n = len(records)
    runs = {}
    for name, over in {
        "single": dict(group_by_image=False, per_device_train_batch_size=n),
        "iso": dict(group_by_image=True, isolate_questions=True, per_device_train_batch_size=1),
    }.items():
        cfg = small_config(demo, tmp_path / name, data_path=str(data), **common, **over)
        result = run_training(cfg)
        runs[name] = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(runs["iso"]) == len(runs["single"]) == 1
    assert abs(runs["iso"][0] - runs["single"][0]) < 1e-4, runs
    assert "isolate_questions: true" in (tmp_path / "iso" / "train_config.yaml").read_text()
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "iso" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_refusals(demo, tmp_path):
    with pytest.raises(MedvlmError, match="group_by_image is off"):
        run_training(small_config(demo, tmp_path / "a", isolate_questions=True))
    with pytest.raises(MedvlmError, match="packing and isolate_questions"):
        small_config(demo, tmp_path / "b", group_by_image=True, isolate_questions=True, packing=True).validate()
    with pytest.raises(MedvlmError, match="isolate_questions"):
        small_config(demo, tmp_path / "c", stage="dpo", isolate_questions=True)
    _, processor = build_preset("tiny", seed=0)
    singles = split_merged(_merged(demo, 1)[0])
    enc = [processor.encode_text(s, max_length=512) for s in singles]
    late = [type(e)(e.input_ids[4:] + [processor.image_token_id], e.labels[4:] + [IGNORE_INDEX], 1) for e in enc]
    with pytest.raises(MedvlmError, match="record 7: isolate_questions needs the image before"):
        shared_prefix_row(late, processor.image_token_id, "x.json record 7")


def test_manual_loop_loss_takes_the_shared_image_mask(demo):
    """The FSDP2 / DeepSpeed CPU loops pass the boolean 4-D mask through model_mask too (eager adds it to scores)."""
    from medvlm.train.manual_loop import forward_loss, learned_tokens

    model, processor = build_preset("tiny", seed=0)
    model.set_attn_implementation("eager")
    model.eval()
    s = _merged(demo, 1)[0]
    parts = split_merged(s)
    feats = processor.encode(parts[0], image_folder=demo / "images", max_length=512)
    row = {**feats, **{k: torch.tensor(v) for k, v in isolated_row(parts, processor, 512, s.id).items()}}
    batch = TrainCollator(processor.pad_token_id)([row])
    singles = VLMCollator(processor.pad_token_id)(
        [processor.encode(q, image_folder=demo / "images", max_length=512) for q in parts]
    )
    n = torch.tensor(learned_tokens([batch]))
    assert int(n) == learned_tokens([singles])
    with torch.no_grad():
        got = forward_loss(model, batch, n)
        want = forward_loss(model, singles, n)
    assert abs(float(got) - float(want)) < 1e-5, (float(got), float(want))
