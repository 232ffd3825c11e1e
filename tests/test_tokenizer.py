"""The tiny offline tokenizer and ``add_image_tokens``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from medvlm.errors import MedvlmError
from medvlm.model.tokenizer import TINY_SPECIAL_TOKENS, add_image_tokens, build_tiny_tokenizer

UNICODE_TEXTS = [
    "Axial CT shows a 3.4 cm mass in the left kidney.",
    "Lésion hépatique de 12 mm, côté droit; ß-HCG normal.",
    "Scale bar 50 µm, Ø 2 mm, ≥ 3 nodules, T₂-weighted, α/β ratio.",
    "肺部CT显示右下叶结节。胸部X線写真。흉부 엑스레이",
    "Emoji 😀🫁🧠 and ZWJ 👩‍⚕️, tabs\tand\nnewlines\r\n  double  spaces ",
    "مرحبا عالم — עברית — हिन्दी",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_special_tokens_and_ids(tok):
    ids = tok.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS))
    assert ids == list(range(len(TINY_SPECIAL_TOKENS)))
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.image_token == "<image>" and tok.image_token_id == 4
    assert len(tok) == 1024 and tok.is_fast
    # Template markers are atomic and skipped when decoding for display.
    for marker in ("<image>", "<im_start>", "<im_end>", "<|im_start|>", "<|im_end|>", "###", "[INST]", "[/INST]"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker
    ids = tok.encode("[INST] Which side? [/INST] Left.</s>###", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == " Which side?  Left."


def test_default_call_prepends_bos_like_llama(tok):
    assert tok("The lung.").input_ids[0] == tok.bos_token_id
    assert tok("The lung.", add_special_tokens=False).input_ids[0] != tok.bos_token_id


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_any_unicode_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_corpus_covers_the_domain(tok):
    """Common report/question words are single tokens (the embedded corpus is biomedical)."""
    for word in ("lung", "liver", "kidney", "left", "right", "CT", "MRI", "yes", "no", "image", "shows"):
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    assert len(tok.encode(" ultrasound", add_special_tokens=False)) <= 2


def test_deterministic_within_and_across_processes(tok):
    digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()
    assert hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest() == digest
    code = (
        "import hashlib; from medvlm.model.tokenizer import build_tiny_tokenizer; "
        "print(hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest


def test_custom_corpus_vocab_and_extra_specials():
    lines = ["the left lung is clear", "the right kidney has a cyst"] * 20
    small = build_tiny_tokenizer(lines, vocab_size=300, extra_special_tokens=("<seg>",))
    assert len(small) <= 300
    assert small.convert_tokens_to_ids("<seg>") == len(TINY_SPECIAL_TOKENS)
    assert small.encode("a<seg>b", add_special_tokens=False)[1] == small.convert_tokens_to_ids("<seg>")
    assert small.decode(small.encode("µ 肺", add_special_tokens=False)) == "µ 肺"
    with pytest.raises(MedvlmError, match="too small"):
        build_tiny_tokenizer(lines, vocab_size=100)
    with pytest.raises(MedvlmError, match="empty"):
        build_tiny_tokenizer([])


def test_save_and_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "USER: <image>\nWhat organ? ASSISTANT: Lung 😀.</s>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.image_token == "<image>" and again.image_token_id == 4
    assert again.pad_token_id == 3


def _word_tokenizer():
    """A tokenizer of another kind (word-level BPE, whitespace pre-tokenizer), standing in for a real LM's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(
        ["the image shows the lung", "an image of a kidney"],
        trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]", "[EOS]"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]")


def test_add_image_tokens_to_any_tokenizer():
    t = _word_tokenizer()
    n0 = len(t)
    assert len(t.encode("<image>", add_special_tokens=False)) > 1  # split before
    assert add_image_tokens(t, use_im_start_end=True) == ["<image>", "<im_start>", "<im_end>"]
    assert len(t) == n0 + 3
    for marker in ("<image>", "<im_start>", "<im_end>"):
        assert t.encode(marker, add_special_tokens=False) == [t.convert_tokens_to_ids(marker)]
    ids = t.encode("the<image>lung", add_special_tokens=False)
    assert t.convert_tokens_to_ids("<image>") in ids
    assert "<image>" not in t.decode(ids, skip_special_tokens=True)
    # Idempotent: nothing new the second time.
    assert add_image_tokens(t, use_im_start_end=True) == []
    assert len(t) == n0 + 3


def test_add_image_tokens_without_start_end():
    t = _word_tokenizer()
    assert add_image_tokens(t, use_im_start_end=False) == ["<image>"]
    assert "<im_start>" not in t.get_vocab()
    tiny = build_tiny_tokenizer()
    assert add_image_tokens(tiny, use_im_start_end=True) == []  # the tiny tokenizer has them all
