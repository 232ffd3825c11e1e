"""Multi-process training on CPU (gloo): 2-process DDP (HF Trainer) and 2-process FSDP2 equal 1 process."""

from __future__ import annotations

import pytest

from train_helpers import config_keys, one_process_baseline, small_config, torchrun_two


def test_ddp_and_fsdp2_two_processes_match_one_process(tmp_path):
    demo, common, want = one_process_baseline(tmp_path)  # one process, 4 samples per step

    # Two processes x 2 samples: the same global batch of 4.
    ddp_keys = config_keys(small_config(demo, tmp_path / "ddp", per_device_train_batch_size=2, **common))
    ddp = torchrun_two(tmp_path, ddp_keys, "ddp")
    assert [r["world"] for r in ddp] == [2, 2]
    for r in ddp:
        assert r["losses"] == pytest.approx(want, abs=1e-4), (r["losses"], want)

    fsdp_keys = config_keys(
        small_config(demo, tmp_path / "fsdp", per_device_train_batch_size=2, distributed="fsdp2_cpu", **common)
    )
    fsdp = torchrun_two(tmp_path, fsdp_keys, "fsdp")
    for r in fsdp:
        assert len(r["losses"]) == 4
        assert r["losses"] == pytest.approx(want, abs=1e-4), (r["losses"], want)
    # Really sharded: each rank holds half of every decoder-layer weight, and the halves differ.
    s0, s1 = fsdp[0]["shards"], fsdp[1]["shards"]
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert s0[q]["global"] == s1[q]["global"] and s0[q]["local"][0] * 2 == s0[q]["global"][0]
    assert s0[q]["local"] == s1[q]["local"] and s0[q]["sum"] != s1[q]["sum"]
    halves = [n for n in s0 if s0[n]["local"][0] * 2 == s0[n]["global"][0]]
    assert len(halves) >= 0.9 * len(s0)
    # The gathered result is a loadable checkpoint.
    from medvlm.model.build import load_pretrained

    load_pretrained(tmp_path / "fsdp")


def test_ddp_fsdp2_and_deepspeed_two_processes_match_one_process_on_a_model_family(tmp_path):
    """A tiny Qwen2.5-VL (image grids and ``mm_token_type_ids`` in every batch) under torchrun DDP, FSDP2 and DeepSpeed
    ZeRO-2 equals one process."""
    import json

    from medvlm.model.families.io import load_family
    from medvlm.model.families.tiny import init_tiny_family
    from medvlm.train.run import run_training
    from train_helpers import make_demo

    demo = make_demo(tmp_path)
    data = tmp_path / "train16.json"
    data.write_text(json.dumps(json.loads((demo / "vqa" / "train.json").read_text())[:16]))
    start = init_tiny_family("tiny-qwen2_5_vl", tmp_path / "start")
    common = dict(
        data_path=str(data),
        max_steps=4,
        learning_rate=3e-3,
        weight_decay=0.01,
        preset=None,
        model_name_or_path=str(start),
        family="qwen2_5_vl",
    )
    single = run_training(small_config(demo, tmp_path / "single", per_device_train_batch_size=4, **common))
    want = [h["loss"] for h in single.log_history if "loss" in h]
    assert len(want) == 4
    ddp = torchrun_two(
        tmp_path, config_keys(small_config(demo, tmp_path / "ddp", per_device_train_batch_size=2, **common)), "fam"
    )
    assert [r["world"] for r in ddp] == [2, 2]
    for r in ddp:
        assert r["losses"] == pytest.approx(want, abs=1e-4), (r["losses"], want)
    load_family(tmp_path / "ddp")  # rank 0 saved a loadable family checkpoint

    for mode in ("fsdp2_cpu", "deepspeed_cpu"):  # the CPU sharded loops carry the family's tensors as well
        runs = torchrun_two(
            tmp_path,
            config_keys(small_config(demo, tmp_path / mode, per_device_train_batch_size=2, distributed=mode, **common)),
            f"fam-{mode}",
        )
        for r in runs:
            assert r["losses"] == pytest.approx(want, abs=1e-4), (mode, r["losses"], want)
        if mode == "fsdp2_cpu":  # really sharded
            assert any(s["local"] != s["global"] for s in runs[0]["shards"].values())
        load_family(tmp_path / mode)
