"""``medvlm demo`` end to end: it must learn the synthetic VQA task far beyond the image-blind baseline.

The one long test of the suite (minutes): the demo's default recipe on a smaller dataset (``--fast``),
run through the CLI exactly as a user would, then its JSON, answers, report and model are checked.
"""

from __future__ import annotations

import json

import pytest

from medvlm.errors import MedvlmError


def test_demo_learns_far_beyond_the_blind_baseline(tmp_path, capsys):
    from medvlm.cli import main

    out, json_out = tmp_path / "demo", tmp_path / "final.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--fast", "--json-out", str(json_out)])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    res = json.loads(json_out.read_text())

    llava, strict, blind = res["scores"], res["strict"], res["blind"]
    assert llava["protocol"] == "llava-med" and strict["protocol"] == "strict"
    assert llava["closed"]["accuracy"] >= 90.0, llava["closed"]
    assert llava["open"]["recall"] >= 80.0, llava["open"]
    # The model answers with the bare word, so whole-word scoring agrees with the substring rule.
    assert strict["closed"]["accuracy"] >= 85.0 and strict["open"]["recall"] >= 75.0
    # Far above what the question alone gives (closed answers are balanced per question text).
    assert blind["closed"]["accuracy"] <= 60.0 and blind["open"]["recall"] <= 50.0
    assert blind["per_question_prior"]["closed"]["accuracy"] <= 60.0
    assert llava["closed"]["accuracy"] - blind["closed"]["accuracy"] >= 30.0
    assert llava["open"]["recall"] - blind["open"]["recall"] >= 30.0
    assert res["untrained"]["llava-med"]["closed_accuracy"] < llava["closed"]["accuracy"] - 30.0
    for stage, losses in res["losses"].items():  # it visibly learns: the loss falls in each stage
        assert len(losses) >= 5 and losses[-1] < losses[0] / 2, (stage, losses)
    assert res["seconds"] > 0

    # What the user is shown and left with.
    assert "stage 1" in printed and "stage 2" in printed and "loss" in printed
    assert "blind baseline" in printed and "medvlm chat --model" in printed
    eval_dir = out / "eval"
    answers = [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text().splitlines()]
    gt = json.loads((out / "data" / "vqa" / "test.json").read_text())
    assert [a["question_id"] for a in answers] == [g["id"] for g in gt]
    assert (eval_dir / "decoding.json").is_file()
    report = (eval_dir / "report.md").read_text()
    assert "Research use only" in report and "scores_llava-med.json" in report and "scores_untrained_strict.json" in report
    assert (eval_dir / "plot_protocols.png").stat().st_size > 1000
    assert (out / "models" / "stage2_sft" / "model.safetensors").is_file()
    assert (out / "models" / "stage1_align" / "loss_curve.png").is_file()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from medvlm.demo import DemoConfig, run_demo

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(MedvlmError, match="not a medvlm demo folder"):
        run_demo(DemoConfig(out=str(tmp_path), fast=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"
