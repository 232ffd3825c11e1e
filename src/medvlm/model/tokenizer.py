"""Tokenizers: the tiny offline byte-level BPE used by tests and the ``tiny`` preset, and image tokens.

``build_tiny_tokenizer`` trains a byte-level BPE in milliseconds on a small embedded corpus of
biomedical report / question text (``medvlm/resources/tiny_corpus.txt``), so that every test and
the ``tiny`` preset run fully offline. Byte-level means any unicode text round-trips exactly.
The special tokens include every template marker that must stay atomic (``###``, ``[INST]``,
``[/INST]``, ``<|im_start|>``, ``<|im_end|>``), so label spans never split inside a marker.

``add_image_tokens`` registers ``<image>`` (and ``<im_start>`` / ``<im_end>``) as special tokens on
any tokenizer, e.g. one of a real language model being composed into a medvlm model.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING

from medvlm.errors import MedvlmError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

# Fixed order = fixed ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4, <im_start>=5, <im_end>=6, ...
TINY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    IMAGE_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "###",
    "[INST]",
    "[/INST]",
)


def default_corpus() -> list[str]:
    """The embedded training corpus of the tiny tokenizer (one line per entry)."""
    text = resources.files("medvlm").joinpath("resources", "tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1024,
    extra_special_tokens: Iterable[str] = (),
) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer offline and wrap it as a transformers fast tokenizer.

    Deterministic: the same corpus and arguments give the same vocabulary and merges every call.
    ``bos``/``eos``/``pad``/``unk`` are ``<s>``/``</s>``/``<pad>``/``<unk>`` and ``tokenizer.image_token``
    is ``<image>``. ``extra_special_tokens`` are appended after the built-in specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = list(default_corpus() if corpus is None else corpus)
    if not lines:
        raise MedvlmError("build_tiny_tokenizer: the corpus is empty")
    specials = list(TINY_SPECIAL_TOKENS)
    for tok in extra_special_tokens:
        if tok not in specials:
            specials.append(tok)
    if vocab_size < len(specials) + 256:
        raise MedvlmError(
            f"build_tiny_tokenizer: vocab_size {vocab_size} is too small; it needs at least "
            f"{len(specials) + 256} (256 byte symbols + {len(specials)} special tokens)"
        )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    # LLaMA-like default: tokenizer(text) prepends <s>; templates call it with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    extra = [t for t in specials if t not in ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    # Keep the other markers flagged special too (skipped by decode(skip_special_tokens=True)).
    hf.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    return hf


def add_image_tokens(tokenizer: PreTrainedTokenizerBase, use_im_start_end: bool) -> list[str]:
    """Register ``<image>`` (and ``<im_start>``/``<im_end>`` when ``use_im_start_end``) as special tokens.

    Works on any transformers tokenizer. Returns the tokens that were newly added to the vocabulary
    (empty when all were present already); the caller resizes the LM's embeddings by that many.
    """
    wanted = [IMAGE_TOKEN] + ([IM_START_TOKEN, IM_END_TOKEN] if use_im_start_end else [])
    vocab = tokenizer.get_vocab()
    new = [t for t in wanted if t not in vocab]
    flag = [t for t in wanted if t not in tokenizer.all_special_tokens]
    if flag:
        tokenizer.add_special_tokens({"extra_special_tokens": flag}, replace_extra_special_tokens=False)
    for t in wanted:
        if len(tokenizer.encode(t, add_special_tokens=False)) != 1:
            raise MedvlmError(f"tokenizer does not keep {t!r} as one token after adding it")
    return new
