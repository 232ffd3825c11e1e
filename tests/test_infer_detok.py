"""Incremental detokenisation: per-step text, stop strings and streamed deltas equal the full-decode rules."""

from __future__ import annotations

import random

import pytest

from medvlm.infer.decoding import visible_text
from medvlm.infer.detok import IncrementalText


def byte_decode(ids: list[int]) -> str:
    """A byte-level "tokenizer": each token is one byte, so multi-byte characters span tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(decode, ids: list[int], stops: list[str]):
    """Push ``ids`` one by one, checking every step against a full decode; return (deltas, stop step)."""
    inc = IncrementalText(decode, stops)
    deltas, shown = [], ""
    for n, tok in enumerate(ids, 1):
        delta = inc.push(tok)
        raw = decode(ids[:n])
        assert inc.raw == raw
        if any(s in raw for s in stops):
            assert inc.stopped and delta == ""
            return deltas, n, inc
        assert not inc.stopped
        # What the old full-decode path streamed at this step.
        vis = visible_text(raw, stops, final=False)
        expect = vis[len(shown) :] if vis.startswith(shown) and len(vis) > len(shown) else ""
        assert delta == expect, (n, raw)
        shown += delta
        deltas.append(delta)
    return deltas, None, inc


def test_multibyte_characters_split_across_tokens_are_held_back():
    text = "  Le cœur: 🩺 normal — épanchement absent.  "
    ids = list(text.encode())
    deltas, stop, inc = feed(byte_decode, ids, [])
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text.strip() == inc.final()


def test_stop_string_spanning_tokens_ends_the_answer_at_the_right_token():
    text = "Réponse: oui ✓\n###Human: suite"
    ids = list(text.encode())
    deltas, stop, inc = feed(byte_decode, ids, ["###", "</s>"])
    assert stop == len("Réponse: oui ✓\n###".encode())
    assert "".join(deltas) == "Réponse: oui ✓"  # the '#' prefix of the stop string was never streamed
    assert inc.final() == "Réponse: oui ✓"


def test_stop_string_with_multibyte_characters():
    stop = "→ fin"
    text = "a→ b → fi → fin après"
    deltas, n, inc = feed(byte_decode, list(text.encode()), [stop])
    assert n == len("a→ b → fi → fin".encode())
    assert inc.final() == "a→ b → fi"


@pytest.mark.parametrize("seed", range(5))
def test_random_text_matches_full_decode(seed):
    rng = random.Random(seed)
    alphabet = list("ab #\n:") + ["é", "🩺", "—", "###", "  "]
    text = "".join(rng.choice(alphabet) for _ in range(60))
    feed(byte_decode, list(text.encode()), ["###", "\n:"])


def test_real_tokenizer_matches_full_decode():
    from medvlm.model.build import build_preset

    _, proc = build_preset("tiny", projector="linear", seed=0)
    text = " The lesion, épaisse (≈ 2 cm), is benign 🩺.\nASSISTANT: no"
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    deltas, stop, inc = feed(proc.decode, ids, ["ASSISTANT:"])
    assert stop is not None and not inc.full_mode
    assert inc.final() == visible_text(proc.decode(ids), ["ASSISTANT:"], final=True)
    assert "".join(deltas) == inc.final()[: len("".join(deltas))]


def test_a_tokenizer_that_rewrites_earlier_text_falls_back_to_full_decodes():
    # Clean-up style decode: " ." becomes "." once the dot arrives, changing already decoded text.
    vocab = {1: "a", 2: " ", 3: ".", 4: "b"}

    def decode(ids):
        return "".join(vocab[i] for i in ids).replace(" .", ".")

    deltas, stop, inc = feed(decode, [1, 2, 3, 2, 4], [])
    assert inc.full_mode and "".join(deltas) == "a. b" == inc.final()
