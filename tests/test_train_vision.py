"""Stage ``vision``: a random tower learns the training answers as classes; nothing else of the model moves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.data.benchmarks.group import answer_key
from medvlm.data.synth import generate_synth
from medvlm.errors import MedvlmError
from medvlm.model.build import init_model
from medvlm.train.answer_head import AnswerHead, read_question_set
from medvlm.train.config import load_config
from medvlm.train.recipes.vision import VISION_LOG_FILE
from medvlm.train.run import run_training
from medvlm.train.stages import SCRATCH
from medvlm.utils.artifacts import TRAIN_CONFIG_FILE


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vision") / "data"
    generate_synth(out, n_images=40, seed=0, image_size=64, qa50_images=0)
    return out


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("vision_init") / "init", seed=0)


def _vqa(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    turns = [[{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}] for _, q, a in rows]
    records = [{"id": i, "image": row[0], "conversations": t} for i, (row, t) in enumerate(zip(rows, turns))]
    path.write_text(json.dumps(records))
    return path


def test_questions_are_grouped_per_image_with_answers_as_classes(tmp_path: Path) -> None:
    path = _vqa(
        tmp_path / "q.json",
        [
            ("a.png", "Is it left?", "Yes."),
            ("b.png", "Is it left?", "no"),
            ("a.png", "Which side?", "left"),
            ("c.png", "Which side?", "left"),
            ("b.png", "Is it right?", "yes"),
        ],
    )
    qs = read_question_set([str(path)])
    assert qs.images == ["a.png", "b.png", "c.png"]
    assert qs.classes == ["yes", "left", "no"] and qs.class_counts == [2, 2, 1]
    assert qs.questions[0] == ["Is it left?", "Which side?"]  # the image placeholder is not part of the question
    assert [[qs.classes[k] for k in a] for a in qs.answers] == [["yes", "left"], ["no", "yes"], ["left"]]
    assert answer_key("  No. ") == "no" and answer_key("x-ray") == "x-ray"


def test_answers_that_do_not_repeat_are_refused_with_the_fix(tmp_path: Path) -> None:
    rows = [(f"{i}.png", "Describe the image.", f"Caption number {i}.") for i in range(6)]
    path = _vqa(tmp_path / "captions.json", rows)
    with pytest.raises(MedvlmError, match=r"captions\.json only 0 of 6 answers occur more than once .*VQA file"):
        read_question_set([str(path)])


def test_head_scores_each_question_against_its_own_image() -> None:
    torch.manual_seed(0)
    head = AnswerHead(vocab_size=10, vision_width=8, n_classes=3)
    tokens = torch.randn(2, 5, 8)  # two images
    ids, offsets = torch.tensor([1, 2, 3, 1, 2, 3]), torch.tensor([0, 3])
    both = head(tokens, ids, offsets, torch.tensor([0, 1]))  # [2, 3]: same question, image 0 then image 1
    alone = head(tokens[1:], ids[:3], torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(both[1:], alone)
    assert not torch.allclose(both[0], both[1])  # the image changes the answer scores


def test_vision_stage_trains_the_tower_only_and_learns(tmp_path: Path, synth: Path, init: Path) -> None:
    out = tmp_path / "vision"
    cfg = load_config(
        None,
        {
            "stage": "vision",
            "model_name_or_path": str(init),
            "data_path": str(synth / "vqa" / "train.json"),
            "image_folder": str(synth / "images"),
            "output_dir": str(out),
            "num_train_epochs": 12,
            "per_device_train_batch_size": 8,
            "disable_tqdm": True,
        },
    )
    assert cfg.learning_rate == SCRATCH.vision_lr  # the stage's own default rate
    result = run_training(cfg)
    before, after = load_file(init / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed)  # projector and LM bit-identical
    assert any(".encoder.layers.1." in k for k in changed)  # the feature layer (-1: the last) learned
    assert not any("post_layernorm" in k for k in changed)  # after the feature layer: no gradient, untouched
    report = json.loads((out / VISION_LOG_FILE).read_text())
    assert {"yes", "no", "left", "right"} <= set(report["classes"])
    epochs = report["epochs"]
    assert len(epochs) == 12 and result.steps == 12 * 4  # 32 train images in batches of 8
    assert epochs[-1]["accuracy"] > epochs[0]["accuracy"] + 0.15  # it learns the answers (not only the prior)
    again = load_config(out / TRAIN_CONFIG_FILE)  # the saved, resolved config loads as it is
    assert again.stage == "vision" and again.num_train_epochs == 12
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["images"] == 32 and manifest["questions"] == 128


def test_cli_refuses_what_the_stage_does_not_do(tmp_path: Path, synth: Path, init: Path) -> None:
    base = ["train", "--stage", "vision", "--model_name_or_path", str(init), "--out", str(tmp_path / "o")]
    base += ["--data_path", str(synth / "vqa" / "train.json"), "--image_folder", str(synth / "images")]
    res = CliRunner().invoke(app, [*base, "--eval-questions", str(synth / "vqa" / "test.json")])
    assert res.exit_code != 0 and "eval_data_path is not used by stage 'vision'" in str(res.exception or res.output)
    res = CliRunner().invoke(app, [*base, "--tune", "lora"])
    assert res.exit_code != 0 and "tune is not used by stage 'vision'" in str(res.exception or res.output)
    res = CliRunner().invoke(app, [*base[:-1], str(tmp_path)])  # an image folder without the images
    assert res.exit_code != 0 and "32 of 32 images" in str(res.exception) and "synth00000" in str(res.exception)
