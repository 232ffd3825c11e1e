"""Model families: Sample -> the family's chat format, labels exactly the answers (+ VUSER questions) and their
end-of-turn token; the marked templates render the stock templates' text; truncation never cuts images."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from family_helpers import FAMILY_NAMES, images, learned_spans, msgs, multi_turn_sample, single_sample, tiny
from medvlm.data.schema import Sample
from medvlm.data.templates import ImageTruncationError
from medvlm.errors import MedvlmError
from medvlm.model.families import FAMILIES


def _expected(family: str, texts: list[str]) -> list[str]:
    spec = FAMILIES[family]
    lead = {"idefics3": " ", "llava": " "}.get(family, "")
    end = "</s>" if family == "llava" else spec.end_of_turn
    # LLaVA-OneVision writes a newline before each text part of a user turn (VUSER questions included).
    return [("\n" if family == "llava_onevision" and t.endswith("?") else lead) + t + end for t in texts]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_are_exactly_answers_questions_and_end_tokens(family):
    """Multi-turn, two images, a system prompt and a VUSER turn: zero label mismatches."""
    model, proc = tiny(family)
    sample = multi_turn_sample(with_vuser=family != "llava")
    feat = proc.encode(sample, images=images())
    middle = "Which organ is shown?"
    expected = ["No mass is seen.", "The left lung.", "They look the same."]
    if family != "llava":  # llava's vicuna_v1 has no VUSER role (v1_sq has: tested below)
        expected.insert(1, middle)
    assert learned_spans(proc, feat) == _expected(family, expected)
    # Every image token survives; the learned tokens never touch an image marker.
    assert not any(int(t) in proc.marker_ids for t, lab in zip(feat["input_ids"], feat["labels"]) if lab != -100)
    for key in proc.spec.token_tensors:
        assert feat[key].shape == feat["input_ids"].shape


def test_llava_v1_sq_learns_vuser_questions():
    from transformers import LlavaForConditionalGeneration  # noqa: F401  (family class present)

    from medvlm.data.templates import get_template
    from medvlm.model.families.processing import FamilyProcessor

    _, proc = tiny("llava")
    sq = FamilyProcessor(proc.spec, proc.processor, get_template("v1_sq").to_jinja(), template="v1_sq")
    feat = sq.encode(multi_turn_sample(with_vuser=True), images=images())
    assert learned_spans(sq, feat) == [
        " No mass is seen.</s>",
        " Which organ is shown?</s>",
        " The left lung.</s>",
        " They look the same.</s>",
    ]
    with pytest.raises(MedvlmError, match="vuser"):
        proc.encode(multi_turn_sample(with_vuser=True), images=images())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generation_prompt_has_no_labels_and_ends_with_the_answer_cue(family):
    _, proc = tiny(family)
    s = Sample("p", msgs(("user", "<image>\nWhat is shown?")), images=["a.jpg"])
    feat = proc.encode(s, images=images()[:1], add_generation_prompt=True)
    assert "labels" not in feat
    train = proc.encode(single_sample("A lung.", question="What is shown?"), images=images()[:1])
    # The prompt is a prefix of the training sequence: generation continues exactly where training learned.
    n = feat["input_ids"].numel()
    assert torch.equal(train["input_ids"][:n], feat["input_ids"])
    assert (train["labels"][:n] == -100).all() and (train["labels"][n:] != -100).any()


# Stock templates shipped by TRL (the hub templates of these families); ours must write the same text.
_STOCK = {
    "qwen2_5_vl": "qwen2_5_vl.jinja",
    "qwen3_vl": "qwen3_vl.jinja",
    "gemma3": "gemma3.jinja",
    "idefics3": "smolvlm.jinja",
}


@pytest.mark.parametrize("family", sorted(_STOCK))
def test_marked_template_renders_the_stock_template_text(family):
    _, proc = tiny(family)
    stock = resources.files("trl").joinpath("chat_templates", _STOCK[family]).read_text()
    convs = [
        multi_turn_sample(with_vuser=False).messages,
        multi_turn_sample(with_vuser=False).messages[1:],
        single_sample().messages,
    ]
    for conv in convs:
        hf = [m.to_dict() for m in conv]
        for gen in (False, True):
            c = hf[:-1] if gen else hf
            ours = proc.processor.apply_chat_template(c, chat_template=proc.chat_template, add_generation_prompt=gen)
            theirs = proc.processor.apply_chat_template(c, chat_template=stock, add_generation_prompt=gen)
            assert ours == theirs


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_truncation_never_cuts_image_tokens(family):
    _, proc = tiny(family)
    s = Sample(
        "t", msgs(("user", "Look.\n<image>"), ("assistant", "A long answer about the image " * 3)), images=["a.jpg"]
    )
    full = proc.encode(s, images=images()[:1])
    last_marker = max(i for i, t in enumerate(full["input_ids"].tolist()) if t in proc.marker_ids)
    cut = proc.encode(s, images=images()[:1], max_length=last_marker + 2)
    assert cut["input_ids"].numel() == last_marker + 2
    for key in ("attention_mask", "labels", *proc.spec.token_tensors):
        assert torch.equal(cut[key], full[key][: last_marker + 2])
    with pytest.raises(ImageTruncationError, match="sample 't'.*image tokens"):
        proc.encode(s, images=images()[:1], max_length=last_marker)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_bad_input_is_refused_with_the_sample_named(family):
    _, proc = tiny(family)
    two_parts = Sample("x", msgs(("user", "<image>\n<image>\nSame?"), ("assistant", "Yes.")), images=["a", "b"])
    with pytest.raises(MedvlmError, match="sample 'x'.*2 image part.*1 image"):
        proc.encode(two_parts, images=images()[:1])
    marker = proc.spec.image_markers[1 if family == "qwen2_5_vl" else 0]  # idefics3: not "<image>"
    injected = Sample("y", msgs(("user", f"<image>\nWhat is {marker}?"), ("assistant", "No.")), images=["a"])
    with pytest.raises(MedvlmError, match="sample 'y'.*image marker"):
        proc.encode(injected, images=images()[:1])
    ends_with_user = Sample("z", msgs(("user", "<image>\nQ?")), images=["a"])
    with pytest.raises(MedvlmError, match="sample 'z'.*must end with an assistant turn"):
        proc.encode(ends_with_user, images=images()[:1])
    answer_image = Sample("w", [*msgs(("user", "Q?")), *msgs(("assistant", "<image>\nA."))], images=["a"])
    with pytest.raises(MedvlmError, match="sample 'w'.*only allowed in user turns"):
        proc.encode(answer_image, images=images()[:1])


def test_text_only_samples_encode_without_image_tensors():
    _, proc = tiny("qwen2_5_vl")
    feat = proc.encode(Sample("t", msgs(("user", "Define effusion."), ("assistant", "Fluid."))))
    assert "pixel_values" not in feat and learned_spans(proc, feat) == ["Fluid.<|im_end|>"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_text_reads_only_image_sizes_and_matches_encode(family):
    """Dataset indexing counts tokens from the image headers: exactly what encoding the real images gives."""
    from family_helpers import SHARED_IMAGES

    _, proc = tiny(family)
    sample = multi_turn_sample(with_vuser=family != "llava")
    sample.images = ["synpic32933.jpg", "bio_patch.png"]
    real = proc.encode(sample, image_folder=SHARED_IMAGES)
    text = proc.encode_text(sample, image_folder=SHARED_IMAGES)
    assert text.input_ids == real["input_ids"].tolist() and text.labels == real["labels"].tolist()
    assert text.num_images == 2


def test_a_template_error_names_the_sample():
    from medvlm.model.families.processing import FamilyProcessor

    _, proc = tiny("qwen2_5_vl")
    strict = FamilyProcessor(proc.spec, proc.processor, "{{ raise_exception('no system turns here') }}")
    with pytest.raises(MedvlmError, match="sample 'one': the qwen2_5_vl processor refused it.*no system turns here"):
        strict.encode(single_sample(), images=images()[:1])
