"""``medvlm demo --family``: the demo curriculum on a transformers model family (issue 14, item 6).

The full runs' figures (closed / open per family, wall time, CPU seconds) are in benchmarks/README.md
("Demo per family"); here a shortened run goes through the CLI end to end and must learn something only the
pixels tell: the open modality question ("What imaging modality is this?"), which neither the untrained model
(no answer words yet) nor the blind baseline (the majority modality) can get right beyond chance.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from medvlm.errors import MedvlmError


def _by_kind(scores: dict) -> dict[str, float]:
    """Mean score per ``ANSWER_TYPE/QUESTION_TYPE`` (closed: accuracy, open: recall) from a scores.json's items."""
    acc: dict[str, list[float]] = defaultdict(list)
    for item in scores["per_item"]:
        acc[f"{item['answer_type']}/{item['question_type']}"].append(
            item["accuracy"] if item["type"] == "closed" else item["recall"]
        )
    return {k: sum(v) / len(v) for k, v in acc.items()}


def test_demo_family_qwen2_5_vl_runs_the_curriculum_and_reads_the_pixels(tmp_path, capsys):
    """A 300-image ``demo --family qwen2_5_vl`` through the CLI (~90 CPU-s): every output, and pixel-reading.

    300 images are far too few for the accuracy targets (the full run's figures are in benchmarks/README.md),
    but enough for stage 1's captions to teach the modality, which the text of the question cannot tell.
    """
    from medvlm.cli import main

    out, json_out = tmp_path / "demo", tmp_path / "final.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--family", "qwen2_5_vl", "--out", str(out), "--n-images", "300", "--summary-out", str(json_out)])
    assert exit_info.value.code in (0, None)
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at the console width
    res = json.loads(json_out.read_text())

    # The outputs: a family checkpoint per stage, answers for every test question, both protocols, the report.
    for stage in ("untrained", "stage1_align", "stage2_sft"):
        meta = json.loads((out / "models" / stage / "medvlm_family.json").read_text())
        assert meta["family"] == "qwen2_5_vl"
        assert json.loads((out / "models" / stage / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    eval_dir = out / "eval"
    answers = [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text().splitlines()]
    gt = json.loads((out / "data" / "vqa" / "test.json").read_text())
    assert [a["question_id"] for a in answers] == [g["id"] for g in gt]
    report = (eval_dir / "report.md").read_text()
    assert "Research use only" in report and "scores_llava-med.json" in report
    assert res["scores"]["protocol"] == "llava-med" and res["strict"]["protocol"] == "strict"
    for stage, losses in res["losses"].items():
        assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], (stage, losses)
    assert "model: qwen2_5_vl" in printed and "blind baseline" in printed
    assert f"medvlm chat --model {out / 'models' / 'stage2_sft'}" in printed

    # It reads the pixels: the open modality question, against the untrained model and the blind majority answer.
    trained = _by_kind(json.loads((eval_dir / "scores_llava-med.json").read_text()))["OPEN/MODALITY"]
    untrained = _by_kind(json.loads((eval_dir / "scores_untrained_llava-med.json").read_text()))["OPEN/MODALITY"]
    blind = res["blind"]["by_kind"]["OPEN/MODALITY"]["score"]
    assert trained >= blind + 0.3 and trained >= untrained + 0.3, (trained, blind, untrained)

    # And it has learned the answer format: yes / no to the closed questions (the untrained model writes noise).
    def yes_no(scores: dict) -> float:
        closed = [i for i in scores["per_item"] if i["type"] == "closed"]
        return sum(i["pred_norm"] in ("yes", "no") for i in closed) / len(closed)

    assert yes_no(res["scores"]) >= 0.9
    assert yes_no(json.loads((eval_dir / "scores_untrained_llava-med.json").read_text())) <= 0.5


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_demo_family_build_gives_64_image_tokens_per_64px_image(family, tmp_path):
    """The native demo's lesson carried over: 64 image tokens per image (16 taught only the modality), LM std 0.1."""
    import numpy as np
    import torch
    from PIL import Image

    from medvlm.model.families.io import load_family
    from medvlm.model.families.tiny import init_demo_family

    model, processor = load_family(init_demo_family(family, tmp_path / family, seed=0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.processor.apply_chat_template(
        msgs, chat_template=processor.spec.chat_template(), add_generation_prompt=True
    )
    enc = processor.processor(text=[text], images=[[image]], return_tensors="pt")
    image_token = model.config.image_token_id
    assert int((enc["input_ids"] == image_token).sum()) == 64
    up = dict(model.named_parameters())[processor.spec.language_model[0] + "layers.0.mlp.up_proj.weight"]
    assert abs(float(up.detach().std()) - 0.1) < 0.01
    with torch.no_grad():
        assert model(**enc).logits.shape[1] == enc["input_ids"].shape[1]


def test_demo_refuses_a_family_it_has_no_model_for_before_any_work(tmp_path):
    from medvlm.demo import DemoConfig, run_demo

    out = tmp_path / "never"
    with pytest.raises(MedvlmError, match="qwen2_5_vl, idefics3") as e:
        run_demo(DemoConfig(out=str(out), family="gemma3"))
    assert "--family gemma3" in str(e.value)
    assert not out.exists()


def test_demo_families_are_the_ones_with_a_demo_build():
    """The CLI's list (kept torch-free for the help text) names exactly the families with a demo-size build."""
    from medvlm.demo import DEMO_FAMILIES
    from medvlm.model.families.tiny import DEMO_BUILDERS

    assert tuple(DEMO_BUILDERS) == DEMO_FAMILIES


def test_demo_family_recipes_name_no_native_only_key(tmp_path):
    """A family keeps its chat template and connector, so the demo's family recipes must not name them (the
    training config refuses them), and both stages declare the family."""
    from medvlm.demo import DemoConfig, stage_configs

    recipes = stage_configs(DemoConfig(family="idefics3"), tmp_path / "data", tmp_path / "untrained", tmp_path / "m")
    for _, keys in recipes:
        assert keys["family"] == "idefics3"
        assert not {"template", "projector_type", "model_kwargs", "vision_tower_path", "language_model_path"} & set(
            keys
        )
    assert recipes[0][1]["model_name_or_path"] == str(tmp_path / "untrained")
    assert recipes[0][1]["tune_vision_tower"] and recipes[0][1]["tune_language_model"]
    assert Path(recipes[1][1]["model_name_or_path"]).name == "stage1_align"
