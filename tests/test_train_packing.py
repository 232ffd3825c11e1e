"""Packing: each packed sample's logits equal its unpacked logits, the packed loss is the unpacked token mean,
and a packed training run follows the padded run's loss curve."""

from __future__ import annotations

import json

import pytest
import torch

from medvlm.data.collate import VLMCollator
from medvlm.data.readers.formats import convert_record
from medvlm.errors import MedvlmError
from medvlm.model.build import build_preset
from medvlm.train.packing import pack_features, pack_rows
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("pack"))


def _features(demo, processor, n: int) -> list[dict]:
    records = json.loads((demo / "vqa" / "train.json").read_text())[:n]
    samples = [convert_record("llava", r, i, "train.json") for i, r in enumerate(records)]
    return [processor.encode(s, image_folder=demo / "images", max_length=512) for s in samples]


def test_pack_rows_keeps_order_and_bounds():
    assert pack_rows([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(MedvlmError, match="sample 1 has 9 tokens"):
        pack_rows([3, 9], 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(demo, attn):
    torch.manual_seed(0)
    model, processor = build_preset("tiny", seed=0)
    model.set_attn_implementation(attn)
    model.eval()
    feats = _features(demo, processor, 5)
    lengths = [int(f["input_ids"].numel()) for f in feats]
    assert len(set(lengths)) > 1  # different lengths: the padded batch really pads
    padded = VLMCollator(processor.pad_token_id)(feats)
    # Two rows (forces a padding run in the shorter one) and one row holding all five.
    for pack_length in (sum(lengths[:3]), sum(lengths)):
        packed = pack_features(feats, processor.pad_token_id, pack_length)
        assert "attention_mask" not in packed
        with torch.no_grad():
            ref = model(**padded, use_cache=False)
            out = model(**packed, use_cache=False)
        assert abs(float(out.loss) - float(ref.loss)) < 1e-5
        # The packed loss is the mean of the per-token losses of the unpacked batch.
        logp = torch.log_softmax(ref.logits[:, :-1].float(), -1)  # [B, T-1, V]
        tgt = padded["labels"][:, 1:]  # [B, T-1]
        keep = tgt != -100
        per_token = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
        assert abs(float(out.loss) - float(per_token.mean())) < 1e-5
        # Each sample's logits in its packed row equal its unpacked logits.
        rows = pack_rows(lengths, pack_length)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                got = out.logits[r, at : at + n]  # [n, V]
                want = ref.logits[i, :n]  # [n, V]
                assert torch.allclose(got, want, atol=1e-5), (attn, i, float((got - want).abs().max()))
                at += n


def test_packed_training_follows_the_padded_run(demo, tmp_path):
    common = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3)
    padded = run_training(small_config(demo, tmp_path / "padded", **common))
    packed = run_training(small_config(demo, tmp_path / "packed", packing=True, **common))
    a = [h["loss"] for h in padded.log_history if "loss" in h]
    b = [h["loss"] for h in packed.log_history if "loss" in h]
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_packing_only_for_align_and_sft(demo, tmp_path):
    with pytest.raises(MedvlmError, match="packing applies to stages align and sft"):
        small_config(demo, tmp_path / "x", stage="dpo", packing=True)
