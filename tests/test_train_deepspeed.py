"""DeepSpeed on CPU (``distributed: deepspeed_cpu``): 2-process ZeRO-2 and ZeRO-3 equal 1 process; ZeRO-3 partitions."""

from __future__ import annotations

import pytest

from medvlm.model.build import load_pretrained
from train_helpers import config_keys, one_process_baseline, small_config, torchrun_two


def test_deepspeed_zero2_and_zero3_two_processes_match_one_process(tmp_path):
    demo, common, want = one_process_baseline(tmp_path)

    for stage in (2, 3):
        tag = f"zero{stage}"
        ranks = torchrun_two(
            tmp_path,
            config_keys(
                small_config(
                    demo,
                    tmp_path / tag,
                    per_device_train_batch_size=2,
                    distributed="deepspeed_cpu",
                    deepspeed_zero_stage=stage,
                    **common,
                )
            ),
            tag,
        )
        assert [r["world"] for r in ranks] == [2, 2]
        for r in ranks:
            assert len(r["losses"]) == 4
            assert r["losses"] == pytest.approx(want, abs=1e-4), (stage, r["losses"], want)
        s0, s1 = ranks[0]["shards"], ranks[1]["shards"]
        if stage == 2:
            assert s0 == {} and s1 == {}  # ZeRO-2 keeps full parameters on every rank
        else:
            # ZeRO-3: every rank holds about half of each tensor, and the halves differ.
            q = "language_model.model.layers.0.self_attn.q_proj.weight"
            assert s0[q]["global"] == s1[q]["global"] and s0[q]["local"] < s0[q]["global"]
            assert s0[q]["local"] + s1[q]["local"] >= s0[q]["global"] and s0[q]["sum"] != s1[q]["sum"]
            assert all(s0[n]["local"] <= (s0[n]["global"] + 1) // 2 for n in s0)
            assert len(s0) == len(list(load_pretrained(tmp_path / "single")[0].named_parameters()))
        # The gathered result is a loadable checkpoint.
        load_pretrained(tmp_path / tag)
