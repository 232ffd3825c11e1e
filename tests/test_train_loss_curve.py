"""Pinned loss curves of ``align`` and ``sft`` (as torchtune pins its recipes'): a fixed seed, one thread, five steps
of the tiny preset on the synthetic set, each logged loss equal to the recorded one within 1e-4 relative.

A silent change in label masking, the template, collation, the data order, which parts train, the optimizer or the
schedule moves these numbers. When a change is meant to move them, rerun this file, check the new curve still falls
as it should, and pin the new values here, saying why in the commit.
"""

from __future__ import annotations

import pytest
import torch

from medvlm.train.run import run_training
from train_helpers import make_demo, small_config

PINNED = {
    # Re-pinned for issue 17: the tiny preset, which this test builds through, now has the demo's shape (patch-8
    # tower, 3-layer width-128 LM at init std 0.1) and 2-D sin-cos tower position embeddings. Re-pinned again (17d):
    # its template is now mistral_instruct (no system prompt); both curves still fall.
    "align": [7.545775890350342, 7.382057189941406, 7.253703594207764, 7.343526840209961, 7.0059003829956055],
    "sft": [7.463365077972412, 5.449625015258789, 4.094285011291504, 3.9311752319335938, 3.4795727729797363],
}


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test (reductions in a fixed order), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("stage", ["align", "sft"])
def test_loss_curve_is_pinned(stage, tmp_path, one_thread):
    demo = make_demo(tmp_path, n_images=16)
    data = demo / ("alignment.json" if stage == "align" else "vqa/train.json")
    r = run_training(small_config(demo, tmp_path / stage, stage=stage, data_path=str(data), max_steps=5, seed=0))
    losses = [h["loss"] for h in r.log_history if "loss" in h]
    assert losses == pytest.approx(PINNED[stage], rel=1e-4), losses
