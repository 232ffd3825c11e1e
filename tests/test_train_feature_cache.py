"""Frozen-tower feature cache: misses in epoch 1, hits from epoch 2 on, identical losses, safe keys."""

from __future__ import annotations

import json

import torch

from medvlm.model.build import build_preset
from medvlm.train.feature_cache import FeatureCache, cache_settings
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config


def test_cache_hits_from_epoch_two_and_changes_no_loss(tmp_path):
    demo = make_demo(tmp_path)
    data = tmp_path / "align12.json"
    data.write_text(json.dumps(json.loads((demo / "alignment.json").read_text())[:12]))
    common = dict(stage="align", data_path=str(data), max_steps=-1, num_train_epochs=3, learning_rate=2e-3)
    plain = run_training(small_config(demo, tmp_path / "nocache", **common))
    cache_dir = tmp_path / "features"
    cached = run_training(
        small_config(demo, tmp_path / "cache", feature_cache="on", feature_cache_dir=str(cache_dir), **common)
    )
    assert plain.cache_stats == {"hits": 0, "misses": 0}  # feature_cache: off
    assert cached.cache_by_epoch == {
        0: {"hits": 0, "misses": 12},
        1: {"hits": 12, "misses": 0},
        2: {"hits": 12, "misses": 0},
    }
    a = [h["loss"] for h in plain.log_history if "loss" in h]
    b = [h["loss"] for h in cached.log_history if "loss" in h]
    assert len(a) == len(b) == 9
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # A second run with the same tower and settings reuses every entry from its first step.
    again = run_training(
        small_config(
            demo,
            tmp_path / "again",
            feature_cache="on",
            feature_cache_dir=str(cache_dir),
            **{**common, "num_train_epochs": 1},
        )
    )
    assert again.cache_stats == {"hits": 12, "misses": 0}


def test_cache_key_changes_with_tower_weights_and_settings(tmp_path):
    m1, p1 = build_preset("tiny", seed=1)
    m2, p2 = build_preset("tiny", seed=2)
    k1 = FeatureCache(tmp_path, cache_settings(m1, p1, torch.float32)).key
    assert k1 == FeatureCache(tmp_path, cache_settings(m1, p1, torch.float32)).key
    assert k1 != FeatureCache(tmp_path, cache_settings(m2, p2, torch.float32)).key  # other tower weights
    p1.image_aspect = "square"
    assert k1 != FeatureCache(tmp_path, cache_settings(m1, p1, torch.float32)).key  # other aspect mode
    m1.config.vision_feature_layer = -1
    assert k1 != FeatureCache(tmp_path, cache_settings(m1, p1, torch.float32)).key  # other layer
    cache = FeatureCache(tmp_path, cache_settings(m2, p2, torch.bfloat16))
    feats = torch.randn(2, 16, 64).to(torch.bfloat16)
    cache.put_many(["a" * 64, "b" * 64], feats)
    assert torch.equal(cache.get_many(["a" * 64, "b" * 64]), feats)
    assert cache.get_many(["a" * 64, "c" * 64]) is None


def test_model_accepts_precomputed_vision_features():
    model, _ = build_preset("tiny", seed=3)
    model.eval()
    n = model.config.image_seq_length
    ids = torch.tensor([[1] + [model.config.image_token_id] * n + [5, 6, 7]])  # [1, T]
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        direct = model(input_ids=ids, pixel_values=pixels).logits
        feats = model.get_vision_features(pixels)  # [1, n, D_v]
        via_cache = model(input_ids=ids, vision_features=feats).logits
    assert feats.shape == (1, n, model.config.vision_config.hidden_size)
    assert torch.equal(direct, via_cache)
