"""InferenceEngine: batched == one-at-a-time greedy, streaming, stop sequences, settings validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medvlm.data.images import load_image
from medvlm.data.schema import Message, Sample
from medvlm.data.templates import stop_token_id_sequences
from medvlm.errors import MedvlmError
from medvlm.infer.decoding import ends_with_any
from medvlm.infer.engine import GenerationSettings, InferenceEngine, visible_text
from medvlm.model.build import build_preset

QUESTIONS = [
    ("<image>\nWhat is shown?", ["synpic42202.jpg"]),
    (
        "Is there evidence of an aortic aneurysm in this chest radiograph of an elderly patient?\n<image>",
        ["synpic32933.jpg"],
    ),
    ("Compare the two images.\n<image>\n<image>", ["med_img_1.png", "bio_patch.png"]),
    ("Describe what a normal chest radiograph shows.", []),
    ("<image>\nWhich organ?", ["xy_chromosome.jpg"]),
]


def _samples() -> list[Sample]:
    return [
        Sample(id=f"q{i}", messages=[Message.from_text("user", q)], images=imgs)
        for i, (q, imgs) in enumerate(QUESTIONS)
    ]


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=11)
    return InferenceEngine(model, processor, batch_size=8)


def test_batched_greedy_equals_one_at_a_time(engine: InferenceEngine, shared_dir: Path) -> None:
    settings = GenerationSettings(max_new_tokens=16)
    folder = shared_dir / "images"
    batched = engine.generate(_samples(), settings, image_folder=folder)
    single = [engine.generate([s], settings, image_folder=folder)[0] for s in _samples()]
    assert batched == single
    assert len(batched) == len(QUESTIONS) and sum(bool(a) for a in batched) >= 3
    engine.batch_size = 2  # chunked batches give the same answers too
    try:
        assert engine.generate(_samples(), settings, image_folder=folder) == batched
    finally:
        engine.batch_size = 8


def test_preloaded_images_and_trailing_answers(engine: InferenceEngine, shared_dir: Path) -> None:
    settings = GenerationSettings(max_new_tokens=10)
    folder = shared_dir / "images"
    samples = _samples()[:3]
    from_files = engine.generate(samples, settings, image_folder=folder)
    pil = [[load_image(folder / p) for p in s.images] for s in samples]
    assert engine.generate(samples, settings, images=pil) == from_files
    # A gold assistant turn at the end (eval records) is dropped: the question is answered.
    with_gold = [
        Sample(id=s.id, messages=[*s.messages, Message.from_text("assistant", "gold")], images=s.images)
        for s in samples
    ]
    assert engine.generate(with_gold, settings, image_folder=folder) == from_files


def test_stream_concatenates_to_the_generated_answer(engine: InferenceEngine, shared_dir: Path) -> None:
    settings = GenerationSettings(max_new_tokens=16)
    folder = shared_dir / "images"
    for sample in _samples():
        deltas = list(engine.stream(sample, settings, image_folder=folder))
        assert "".join(deltas) == engine.generate([sample], settings, image_folder=folder)[0]
        assert all(deltas)


def test_user_stop_string_cuts_the_answer_and_empty_stop_is_ignored(engine: InferenceEngine, shared_dir: Path) -> None:
    folder = shared_dir / "images"
    sample = _samples()[1]
    full = engine.generate([sample], GenerationSettings(max_new_tokens=24), image_folder=folder)[0]
    words = full.split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    cut = engine.generate([sample], GenerationSettings(max_new_tokens=24, stop=(stop,)), image_folder=folder)[0]
    assert cut == full[: full.find(stop)].strip()
    assert engine.generate([sample], GenerationSettings(max_new_tokens=24, stop=("",)), image_folder=folder)[0] == full
    streamed = "".join(engine.stream(sample, GenerationSettings(max_new_tokens=24, stop=(stop,)), image_folder=folder))
    assert streamed == cut


def test_sampling_is_reproducible_with_a_seed(engine: InferenceEngine, shared_dir: Path) -> None:
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    folder = shared_dir / "images"
    a = engine.generate(_samples()[:2], settings, image_folder=folder)
    b = engine.generate(_samples()[:2], settings, image_folder=folder)
    assert a == b
    # it samples: other seeds give other answers, and the seeded answers are not the greedy ones
    others = [
        engine.generate(_samples()[:2], dataclasses.replace(settings, seed=s), image_folder=folder) for s in (1, 2, 3)
    ]
    assert any(o != a for o in others), (a, others)
    greedy = engine.generate(_samples()[:2], GenerationSettings(max_new_tokens=12), image_folder=folder)
    assert any(x != greedy for x in [a, *others]), greedy


def test_stop_token_sequences_match_the_answer_tail() -> None:
    seqs = [[7, 8], [9], []]  # an empty sequence never stops anything
    assert [ends_with_any(ids, seqs) for ids in ([5, 7, 8], [3, 4, 9], [8, 7, 5], [], [8])] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_template_stop_sequences_cover_eos_and_stop_strings(engine: InferenceEngine) -> None:
    tok = engine.processor.tokenizer
    seqs = stop_token_id_sequences(tok, "llava_med_v0")
    assert [tok.eos_token_id] in seqs and tok.encode("###", add_special_tokens=False) in seqs


def test_visible_text_holds_back_partial_stops() -> None:
    assert visible_text("  The lung.###Human:", ["###"], final=False) == "The lung."
    assert visible_text("The lung.#", ["###"], final=False) == "The lung."
    assert visible_text("The lung.#", ["###"], final=True) == "The lung.#"
    assert visible_text("The lung is ", ["###"], final=False) == "The lung is"
    assert visible_text("a</s>", [], final=True) == "a</s>"
    assert visible_text("caf\ufffd", [], final=False) == "caf"  # incomplete UTF-8 waits for the next token


def test_bad_settings_and_inputs_are_clear_errors(engine: InferenceEngine) -> None:
    with pytest.raises(MedvlmError, match="temperature must be >= 0"):
        engine.generate(_samples()[:1], GenerationSettings(temperature=-1))
    with pytest.raises(MedvlmError, match="max_new_tokens must be >= 1"):
        engine.generate(_samples()[:1], GenerationSettings(max_new_tokens=0))
    with pytest.raises(MedvlmError, match="got 1 image lists for 2 samples"):
        engine.generate(_samples()[:2], images=[[]])
    with pytest.raises(MedvlmError, match=r"sample 'q0'.*image file not found"):
        engine.generate(_samples()[:1], image_folder="/nonexistent")
