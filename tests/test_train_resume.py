"""Resume after SIGKILL: the resumed run ends with the same losses and weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from medvlm.train.callbacks import read_log
from medvlm.train.run import run_training
from train_helpers import make_demo, small_config

CHILD = """
import json, os, signal, sys
from transformers import TrainerCallback
from medvlm.train.config import load_config
from medvlm.train.run import run_training

class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final save: a real crash

cfg = load_config(None, json.loads(sys.argv[1]))
kill = int(os.environ.get("KILL_AT_STEP", "0"))
run_training(cfg, callbacks=[KillAt(kill)] if kill else None)
"""


def _keys(cfg) -> dict:
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if v is not None}


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    demo = make_demo(tmp_path)
    data = tmp_path / "train12.json"
    data.write_text(json.dumps(json.loads((demo / "vqa" / "train.json").read_text())[:12]))
    # 12 samples at 4 per step: 8 steps cross two epoch boundaries, so the per-epoch order matters too.
    common = dict(
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        learning_rate=3e-3,
        num_train_epochs=3,
        data_path=str(data),
    )
    straight = run_training(small_config(demo, tmp_path / "straight", **common))

    cfg = small_config(demo, tmp_path / "killed", **common)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, KILL_AT_STEP="5", OMP_NUM_THREADS=str(torch.get_num_threads()))
    first = subprocess.run(
        [sys.executable, str(script), json.dumps(_keys(cfg))], env=env, capture_output=True, text=True
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    env.pop("KILL_AT_STEP")
    second = subprocess.run(
        [sys.executable, str(script), json.dumps(_keys(cfg))], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-2000:]

    want = {h["step"]: h["loss"] for h in straight.log_history if "loss" in h}
    got = {r["step"]: r["loss"] for r in read_log(tmp_path / "killed") if "loss" in r}
    assert set(got) == set(range(1, 9))  # steps 5 (lost with the kill) and 6-8 were redone from checkpoint-4
    for step in range(5, 9):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
