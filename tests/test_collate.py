"""VLMCollator: exact padding, labels, attention masks and image concatenation."""

from __future__ import annotations

import pytest
import torch

from medvlm.data.collate import VLMCollator
from medvlm.errors import MedvlmError

PAD = 3


def feat(ids, labels=None, n_img=0, fill=0.0, size=4):
    f = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels if labels is not None else ids),
        "pixel_values": torch.full((n_img, 3, size, size), fill) if n_img else None,
    }
    return f


def test_right_padding_exact():
    batch = VLMCollator(PAD)(
        [feat([1, 4, 4, 9, 2], [-100, -100, -100, 9, 2], n_img=1, fill=1.0), feat([1, 7], [-100, 7])]
    )
    assert batch["input_ids"].tolist() == [[1, 4, 4, 9, 2], [1, 7, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9, 2], [-100, 7, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (1, 3, 4, 4)


def test_left_padding_for_generation():
    batch = VLMCollator(PAD, padding_side="left")([{"input_ids": [1, 5, 6]}, {"input_ids": [1]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [PAD, PAD, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in batch and "pixel_values" not in batch


def test_pad_to_multiple_of():
    batch = VLMCollator(PAD, pad_to_multiple_of=4)([feat([1, 2, 3, 4, 5]), feat([1])])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, PAD, PAD, PAD]
    assert batch["attention_mask"].sum(1).tolist() == [5, 1]
    assert batch["labels"][1].tolist() == [1] + [-100] * 7


def test_images_concatenated_in_sample_order_with_text_only_samples():
    batch = VLMCollator(PAD)([feat([1, 4], n_img=2, fill=1.0), feat([1, 8]), feat([1, 4, 4], n_img=1, fill=3.0)])
    pv = batch["pixel_values"]
    assert pv.shape == (3, 3, 4, 4)
    assert [float(x[0, 0, 0]) for x in pv] == [1.0, 1.0, 3.0]


def test_given_attention_mask_is_padded():
    batch = VLMCollator(PAD)([{"input_ids": [1, 2, 3], "attention_mask": [0, 1, 1]}, {"input_ids": [1]}])
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "features,match",
    [
        ([], "empty"),
        ([feat([1, 2], [1])], "'labels' has shape"),
        ([feat([1, 2], n_img=1, size=4), feat([1, 2], n_img=1, size=8)], "image size"),
        ([{"input_ids": [1], "labels": [1]}, {"input_ids": [1]}], "some features have labels"),
        ([{"input_ids": [1], "pixel_values": torch.zeros(3, 4, 4)}], r"\[n_img, C, H, W\]"),
        ([{"input_ids": []}], "non-empty 1-D"),
        ([{"labels": [1]}], "missing 'input_ids'"),
        ([{"input_ids": [1], "image_sizes": [4]}], "unknown keys"),
    ],
)
def test_bad_features(features, match):
    with pytest.raises(MedvlmError, match=match):
        VLMCollator(PAD)(features)


def test_bad_options():
    with pytest.raises(MedvlmError, match="padding_side"):
        VLMCollator(PAD, padding_side="middle")
    with pytest.raises(MedvlmError, match="pad_to_multiple_of"):
        VLMCollator(PAD, pad_to_multiple_of=0)


def test_collates_real_encoded_conversations():
    """Features from encode_conversation (tiny tokenizer) collate into a batch whose labels match per sample."""
    from medvlm.data.schema import Message
    from medvlm.data.templates import encode_conversation
    from medvlm.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    convs = [
        [Message.from_text("user", "<image>\nWhich organ?"), Message.from_text("assistant", "The lung.")],
        [Message.from_text("user", "What is CT?"), Message.from_text("assistant", "Computed tomography.")],
    ]
    encs = [encode_conversation(c, tok, "vicuna_v1", image_seq_length=4) for c in convs]
    feats = [
        {
            "input_ids": torch.tensor(e.input_ids),
            "labels": torch.tensor(e.labels),
            "pixel_values": torch.zeros(e.num_images, 3, 8, 8) if e.num_images else None,
        }
        for e in encs
    ]
    batch = VLMCollator(tok.pad_token_id)(feats)
    for row, e in enumerate(encs):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row, :n].tolist() == e.labels
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == 1
    assert int((batch["input_ids"] == tok.image_token_id).sum()) == 4
