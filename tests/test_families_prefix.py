"""Shared-prefix reuse on the transformers model families: questions that share an image prefix prefill it once
(then only their own tokens, at M-RoPE / plain positions), and greedy answers equal plain ``model.generate`` on each
whole prompt alone, for mixed prefixes (different images, system prompts, very different question lengths)."""

from __future__ import annotations

import pytest

from family_helpers import FAMILY_NAMES, images, msgs, tiny
from medvlm.data.schema import Sample
from medvlm.infer.decoding import GenerationSettings
from medvlm.infer.engine import InferenceEngine
from test_families_infer import MAX_NEW, hf_greedy

LONG = (
    "Looking carefully at the region of the left lower lobe near the costophrenic angle, and taking into account "
    "the patient's history of smoking and the prior imaging study, is there any sign of a mass or effusion?"
)


def mixed() -> list[tuple[Sample, list]]:
    """Several questions per image (short and very long), another image, a system prompt, two images, text only."""
    a, b = images()
    out = []
    for k, img in enumerate((a, b)):
        for q in ("Which organ?", LONG, "Is it normal?"):
            out.append((Sample(f"{k}-{len(out)}", msgs(("user", "<image>\n" + q)), images=["i"]), [img]))
    for q in ("Which organ?", LONG):
        out.append(
            (
                Sample(
                    f"sys-{len(out)}",
                    msgs(("system", "You are a careful radiology assistant."), ("user", "<image>\n" + q)),
                    images=["i"],
                ),
                [a],
            )
        )
    out.append((Sample("two", msgs(("user", "Compare <image> with <image>.")), images=["a", "b"]), [a, b]))
    out.append((Sample("text", msgs(("user", "What does a normal chest radiograph show?"))), []))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefix_reuse_equals_generate_alone(family):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=4)  # fewer rows than questions: rows join as others end
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    cases = mixed()
    samples, imgs = [s for s, _ in cases], [i for _, i in cases]
    expected = [processor.decode(hf_greedy(model, processor, s, i)).strip() for s, i in cases]
    assert engine.generate(samples, settings, images=imgs) == expected
    first = engine.prefix_cache.info()
    assert first["inserts"] >= 4  # one image prefix per distinct (images, text before them)
    # Asked again: every image prefix now comes from the cache, answers unchanged.
    assert engine.generate(samples, settings, images=imgs) == expected
    again = engine.prefix_cache.info()
    assert again["hits"] - first["hits"] >= len(samples) - 1
    assert any(a for a in expected)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_without_a_prefix_cache_shared_prefixes_still_equal_generate(family):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=8, prefix_cache_bytes=0)
    assert engine.prefix_cache is None
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    cases = mixed()
    expected = [processor.decode(hf_greedy(model, processor, s, i)).strip() for s, i in cases]
    assert engine.generate([s for s, _ in cases], settings, images=[i for _, i in cases]) == expected


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_a_chat_turn_reuses_the_previous_turn_and_answers_as_alone(family):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=2)
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    a, _ = images()
    turn1 = Sample("t1", msgs(("user", "<image>\nWhich organ?")), images=["a"])
    answer = "".join(engine.stream(turn1, settings, images=[a]))
    assert answer.strip() == processor.decode(hf_greedy(model, processor, turn1, [a])).strip()
    turn2 = Sample(
        "t2",
        msgs(("user", "<image>\nWhich organ?"), ("assistant", answer.strip() or "Yes."), ("user", "Are you sure?")),
        images=["a"],
    )
    before = engine.prefix_cache.info()["hit_tokens"]
    p2 = engine.prepare(turn2, images=[a])
    got = "".join(engine.stream(turn2, settings, images=[a]))
    assert got.strip() == processor.decode(hf_greedy(model, processor, turn2, [a])).strip()
    assert engine.prefix_cache.info()["hit_tokens"] - before > p2.split  # beyond the image: the earlier turn too
