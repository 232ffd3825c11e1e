"""VQA-v2 normalisation as LLaVA-Med applies it (every quirk, expected values derived by hand) and the strict tokens."""

from __future__ import annotations

import pytest

from medvlm.eval.normalize import CONTRACTIONS, PERIOD_CAP, strict_tokens, token_counts, vqa_normalize


@pytest.mark.parametrize(
    "text, expected",
    [
        # a punctuation char next to a space (in the INPUT) is deleted, otherwise replaced by a space
        ("yes - no", "yes no"),
        ("yes-no", "yes no"),
        ("x - ray", "x ray"),
        ("t1 / t2", "t1 t2"),
        ("left/ right", "left right"),
        ("t1/t2", "t1 t2"),
        # the condition looks at the whole input: one spaced hyphen deletes every hyphen
        ("well-defined mass - benign", "welldefined mass benign"),
        ("chest x-ray - pa view", "chest xray pa view"),
        # a digit-comma-digit anywhere deletes every punctuation char
        ("1,000 x-ray films", "1000 xray films"),
        ("about 1,000 cells", "about 1000 cells"),
        ("3,3", "33"),
        ("1,5", "15"),
        # ", " deletes the comma (no space inserted)
        ("left,right, both", "leftright both"),
        ("3, 4 cm", "3 4 cm"),
        ("yes, and no.", "yes and no"),
        # periods: removed unless a digit follows
        ("about 1.5 cm.", "about 1.5 cm"),
        ("1.5cm", "1.5cm"),
        ("see fig.2", "see fig.2"),
        (".5", ".5"),
        ("e.g.", "eg"),
        ("n.o.", "no"),
        ("mass.mass.mass", "massmassmass"),
        # other punctuation of the list
        ("yes!!!", "yes"),
        ('"brain"', "brain"),
        ("[no]", "no"),
        ("<5 mm", "5 mm"),
        ("a+b", "b"),  # "+" -> space, then the article "a" is dropped
        ("a + b", "b"),
        ("back\\slash", "back slash"),
        ("snake_case", "snake case"),
        ("@home", "home"),
        ("diagnosis: pneumonia", "diagnosis: pneumonia"),  # ":" is not in the list
        ("50%", "50%"),
        # number words, articles, case
        ("None of the above.", "0 of above"),
        ("There are two.", "there are 2"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("The liver", "liver"),
        ("a", ""),
        ("the the", ""),
        ("B R A I N", "b r i n"),
        ("RIGHT LOWER LOBE", "right lower lobe"),
        # contractions (VQA-v2 table): only exact lower-case keys expand
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("thats it", "that's it"),
        ("hes", "he's"),
        ("im", "im"),  # the table's key is "Im": unreachable after lower-casing
        ("somebody'd", "somebodyd"),  # the table maps this one backwards
        ("cant", "can't"),
        # whitespace: str.split() splits on NBSP and ideographic space but not on zero-width space
        ("\xa0no\xa0", "no"),
        ("left\u3000lung", "left lung"),
        ("no\u200bevidence", "no\u200bevidence"),
        ("  liver  ", "liver"),
        ("liver\nspleen", "liver spleen"),
        ("", ""),
    ],
)
def test_vqa_normalize_rules(text, expected):
    assert vqa_normalize(text) == expected


def test_period_cap_is_32_per_pass():
    assert PERIOD_CAP == 32
    assert vqa_normalize("." * 33 + "liver") == ".liver"
    once = vqa_normalize("." * 70 + "liver")
    assert once == "." * 38 + "liver"
    assert vqa_normalize(once) == "." * 6 + "liver"
    assert vqa_normalize("yes" + "." * 40) == "yes" + "." * 8
    # a period followed by a digit is not a match and does not use up the cap
    assert vqa_normalize("1.5 cm" + "." * 40) == "1.5 cm" + "." * 8


def test_contraction_table_is_vqa_v2():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't"
    assert CONTRACTIONS["Im"] == "I'm" and "im" not in CONTRACTIONS
    assert CONTRACTIONS["somebody'd"] == "somebodyd"
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"


def test_token_counts_is_lower_strip_split():
    assert token_counts("  Left left\tLUNG ") == {"left": 2, "lung": 1}
    assert token_counts("") == {}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, and no.", ["yes", "and", "no"]),
        ("Ｙｅｓ", ["yes"]),  # NFKC
        ("ﬁbrosis", ["fibrosis"]),  # ligature
        ("ΟΔΟΣ", ["οδοσ"]),  # case-folded final sigma
        ("There is no\u200bevidence", ["there", "is", "no", "evidence"]),
        ("I don't know", ["i", "dont", "know"]),
        ("It isn\u2019t.", ["it", "isnt"]),
        ("e.g.", ["eg"]),
        ("U.S.", ["us"]),
        ("1,000 x-ray films", ["1000", "x", "ray", "films"]),
        ("about 1.5cm.", ["about", "1.5", "cm"]),
        ("see fig.2", ["see", "fig", "2"]),
        ("50 %", ["50", "%"]),
        ("50%", ["50", "%"]),
        ("None of the above", ["0", "of", "above"]),
        ("The liver and A mass", ["liver", "and", "mass"]),
        ("C5 - C6", ["c5", "c6"]),
        ("snake_case", ["snake", "case"]),
        ("", []),
    ],
)
def test_strict_tokens(text, expected):
    assert strict_tokens(text) == expected
