"""STLLaVA-Med self-questioning on model families: the VUSER prompt is exactly what the ``sq`` stage trains a question
after, ``prefs generate`` on a family checkpoint writes preference files that ``train --stage dpo`` on that family
accepts, and test-time self-questioning runs on a family."""

from __future__ import annotations

import json

import pytest
import torch

from family_helpers import FAMILY_NAMES, SHARED_IMAGES, images, msgs, tiny
from medvlm.data.readers import read_preferences
from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.prefs import PrefsConfig, SelfQuestioningEngine, generate_preferences
from medvlm.llm import LLMConfig
from medvlm.model.families.io import load_family
from medvlm.model.families.tiny import init_tiny_family
from medvlm.train.run import run_training
from openai_test_server import openai_server_factory  # noqa: F401  (fixture)
from test_stllava_prefs import prefer_longer
from train_helpers import make_demo, small_config


def _asking(family: str, tmp_path):
    """``(model, processor)`` that can ask questions (the llava family needs the v1_sq template)."""
    if family != "llava":
        return tiny(family)
    return load_family(init_tiny_family("tiny-llava", tmp_path / "llava-sq", template="v1_sq"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vuser_prompt_is_the_trained_text_before_a_question(family, tmp_path):
    _, processor = _asking(family, tmp_path)
    assert processor.asks_questions
    image = images()[:1]
    dialogue = msgs(("user", "<image>\nDescribe the image."), ("assistant", "A chest radiograph."))
    prompt = processor.encode(Sample("p", dialogue, images=["a"]), add_generation_prompt=True, images=image)
    trained = processor.encode(
        Sample("t", dialogue + msgs(("vuser", "Which organ is shown?"), ("assistant", "Lung.")), images=["a"]),
        images=image,
    )
    labels = trained["labels"]
    first_answer_end = int((labels[1:] == -100).logical_and(labels[:-1] != -100).nonzero()[0])
    question_start = first_answer_end + 1 + int((labels[first_answer_end + 1 :] != -100).nonzero()[0])
    n = prompt["input_ids"].numel()
    assert n == question_start  # the prompt ends exactly where the learned question starts
    assert torch.equal(prompt["input_ids"], trained["input_ids"][:n])
    for key in processor.spec.token_tensors:  # Qwen's mm_token_type_ids, Gemma 3's token_type_ids
        assert torch.equal(prompt[key], trained[key][:n])
    for key in processor.spec.image_tensors:
        assert torch.equal(torch.as_tensor(prompt[key]), torch.as_tensor(trained[key]))
    assert "labels" not in prompt


def test_llava_family_without_a_vuser_template_is_refused():
    _, processor = tiny("llava")  # vicuna_v1
    assert not processor.asks_questions
    dialogue = msgs(("user", "<image>\nDescribe the image."), ("assistant", "A chest radiograph."))
    with pytest.raises(MedvlmError, match="VUSER"):
        processor.encode(Sample("p", dialogue, images=["a"]), add_generation_prompt=True, images=images()[:1])
    from medvlm.infer.self_question import SelfQuestioningAnswerer

    with pytest.raises(MedvlmError, match="no VUSER role"):
        SelfQuestioningAnswerer(InferenceEngine(*tiny("llava")), k=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("fam-prefs"), n_images=10)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefs_generate_on_a_family_checkpoint_feeds_family_dpo(family, demo, tmp_path, openai_server_factory):  # noqa: F811
    start = init_tiny_family(f"tiny-{family}", tmp_path / "start", template="v1_sq" if family == "llava" else None)
    server = openai_server_factory(prefer_longer)
    out = tmp_path / "prefs" / "prefs.json"
    cfg = PrefsConfig(
        model=start,
        images=demo / "images",
        out=out,
        questions_per_image=2,
        ties="second",
        limit=2,
        description_tokens=6,
        question_tokens=6,
        answer_tokens=6,
    )
    llm = LLMConfig(
        model="judge-4o", base_url=server.base_url, api_key_env="", retries=0, backoff_base=0.0, progress=False
    )
    report = generate_preferences(cfg, llm)  # loads the folder itself: a family, by its config.json model_type
    assert report.done == 2 and not report.failed and report.pairs >= 1
    pairs = list(read_preferences(out))
    assert len(pairs) == report.pairs == len(list(read_preferences(cfg.trl_path())))
    progress = [json.loads(line) for line in cfg.progress_path().read_text().splitlines()]
    assert all(rec["description"] and rec["questions"] for rec in progress)
    for p in pairs:
        assert p.chosen != p.rejected and len(p.images) == 1 and (demo / "images" / p.images[0]).is_file()
    result = run_training(
        small_config(
            demo,
            tmp_path / "dpo",
            stage="dpo",
            data_path=str(out),
            model_name_or_path=str(start),
            preset=None,
            tune="lora",
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            per_device_train_batch_size=1,
            max_steps=2,
            learning_rate=1e-3,
            group_by_modality_length=False,
        )
    )
    assert [h for h in result.log_history if "loss" in h]
    assert json.loads((tmp_path / "dpo" / "medvlm_family.json").read_text())["family"] == family
    load_family(tmp_path / "dpo")


def test_test_time_self_questioning_on_a_family():
    from medvlm.data.images import load_image
    from medvlm.infer.self_question import SelfQuestioningAnswerer

    model, processor = tiny("idefics3")
    model.eval()
    image = load_image(SHARED_IMAGES / "synpic32933.jpg")
    sample = Sample("q", [Message("user", [image_part(), text_part("Is there a mass?")])], ["a"])
    answerer = SelfQuestioningAnswerer(InferenceEngine(model, processor), k=1, aux_tokens=6)
    settings = GenerationSettings(max_new_tokens=6)
    answer = answerer.generate([sample], settings, images=[[image]])[0]
    d = answerer.dialogues[0]
    assert [m.role for m in d] == ["user", "assistant", "vuser", "assistant"]
    # The self-asked question is what the engine, continuing the described image, asks greedily.
    asked = SelfQuestioningEngine(model, processor).generate(
        [Sample("q", d[:2], ["a"])], GenerationSettings(max_new_tokens=6), images=[[image]]
    )
    assert asked[0] == d[2].text
    final = Sample("x", d + [Message("user", [text_part("Is there a mass?")])], ["a"])
    assert InferenceEngine(model, processor).generate([final], settings, images=[[image]])[0] == answer
