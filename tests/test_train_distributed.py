"""Multi-process training on CPU (gloo): 2-process DDP (HF Trainer) and 2-process FSDP2 equal 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from medvlm.train.run import run_training

from train_helpers import make_demo, small_config

WORKER = """
import json, os, sys
from medvlm.train.config import load_config
from medvlm.train.run import run_training
r = run_training(load_config(None, json.loads(sys.argv[1])))
rank = int(os.environ["RANK"])
with open(sys.argv[2] + f".rank{rank}.json", "w") as f:
    json.dump({"losses": [h["loss"] for h in r.log_history if "loss" in h], "shards": r.shards,
               "world": int(os.environ["WORLD_SIZE"])}, f)
"""


def _torchrun(tmp_path, keys: dict, tag: str) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    report = tmp_path / tag
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps(keys), str(report)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"{tag}.rank{r}.json").read_text()) for r in (0, 1)]


def _keys(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if v is not None}


def test_ddp_and_fsdp2_two_processes_match_one_process(tmp_path):
    demo = make_demo(tmp_path)
    data = tmp_path / "train16.json"
    data.write_text(json.dumps(json.loads((demo / "vqa" / "train.json").read_text())[:16]))
    common = dict(data_path=str(data), max_steps=4, learning_rate=3e-3, weight_decay=0.01)
    # One process, 4 samples per step.
    single = run_training(small_config(demo, tmp_path / "single", per_device_train_batch_size=4, **common))
    want = [h["loss"] for h in single.log_history if "loss" in h]
    assert len(want) == 4

    # Two processes x 2 samples: the same global batch of 4.
    ddp = _torchrun(tmp_path, _keys(small_config(demo, tmp_path / "ddp", per_device_train_batch_size=2, **common)), "ddp")
    assert [r["world"] for r in ddp] == [2, 2]
    for r in ddp:
        assert max(abs(a - b) for a, b in zip(r["losses"], want)) < 1e-4, (r["losses"], want)

    fsdp = _torchrun(tmp_path, _keys(small_config(demo, tmp_path / "fsdp", per_device_train_batch_size=2,
                                                  distributed="fsdp2_cpu", **common)), "fsdp")
    for r in fsdp:
        assert len(r["losses"]) == 4
        assert max(abs(a - b) for a, b in zip(r["losses"], want)) < 1e-4, (r["losses"], want)
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
