"""The one inference engine on transformers model families: greedy answers equal plain ``model.generate``,
batched (left padding, different lengths and images) equals one at a time, and eval/serve take a family checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from family_helpers import FAMILY_NAMES, images, msgs, tiny

from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError
from medvlm.infer.decoding import GenerationSettings
from medvlm.infer.engine import InferenceEngine

MAX_NEW = 8


def prompts() -> list[tuple[Sample, list]]:
    """Prompts of different lengths: two images, one image, text only, a system prompt, a follow-up turn."""
    a, b = images()
    return [
        (Sample("p0", msgs(("user", "<image>\nIs there a mass?")), images=["a"]), [a]),
        (Sample("p1", msgs(("system", "Answer briefly."), ("user", "Compare <image> with <image> please, which "
                                                                    "one shows the larger organ?")),
                images=["a", "b"]), [a, b]),
        (Sample("p2", msgs(("user", "What is a lung?"))), []),
        (Sample("p3", msgs(("user", "<image>\nWhat organ?"), ("assistant", "The liver."), ("user", "Sure?")),
                images=["b"]), [b]),
    ]


def hf_greedy(model, processor, sample: Sample, imgs: list) -> list[int]:
    """Plain transformers ``generate`` on the processor-built inputs (batch of one), new tokens without the stop."""
    feats = processor.encode(sample, add_generation_prompt=True, images=imgs)
    inputs = {k: (v[None] if k in ("input_ids", "attention_mask", *processor.spec.token_tensors) else v)
              for k, v in feats.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=processor.stop_token_ids,
                             pad_token_id=processor.pad_token_id,
                             suppress_tokens=sorted(processor.marker_ids))
    new = out[0, feats["input_ids"].shape[0]:].tolist()
    return [t for t in new if t not in processor.stop_token_ids and t != processor.pad_token_id]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_engine_greedy_equals_generate_and_batched_equals_single(family):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=4)
    assert engine.prefix_cache is None  # families prefill whole prompts (no cross-question reuse yet)
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    ps = prompts()
    samples, imgs = [s for s, _ in ps], [i for _, i in ps]
    batched = engine.generate(samples, settings, images=imgs)
    single = [engine.generate([s], settings, images=[i])[0] for s, i in ps]
    assert batched == single
    expected = [processor.decode(hf_greedy(model, processor, s, i)).strip() for s, i in ps]
    assert batched == expected
    assert any(a for a in batched)  # a random tiny model still says something


def test_more_images_than_placeholders_is_refused_before_work():
    model, processor = tiny("qwen2_5_vl")
    engine = InferenceEngine(model, processor)
    a, b = images()
    sample = Sample("x", msgs(("user", "<image>\nWhat?")), images=["a"])
    with pytest.raises(MedvlmError, match="1 image part"):
        engine.generate([sample], GenerationSettings(max_new_tokens=2), images=[[a, b]])


def test_family_model_needs_its_family_processor():
    model, _ = tiny("gemma3")
    _, other = tiny("idefics3")
    with pytest.raises(MedvlmError, match="needs its family's processor"):
        InferenceEngine(model, other)


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    from medvlm.model.families.tiny import init_tiny_family

    return init_tiny_family("tiny-qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen")


def test_load_for_inference_picks_the_family_by_model_type(qwen_ckpt, tmp_path):
    from medvlm.infer.loading import load_for_inference

    model, processor = load_for_inference(qwen_ckpt)
    assert model.config.model_type == "qwen2_5_vl" and processor.spec.name == "qwen2_5_vl"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(MedvlmError, match="qwen2_5_vl"):
        load_for_inference(bad)
