"""Answer normalisation: the VQA-v2 rules LLaVA-Med's scorer uses, quirks included, and a strict variant.

``vqa_normalize`` reproduces ``normalize_word`` of LLaVA-Med's ``eval_metrics/glossary.py`` (itself the
``processPunctuation`` + ``processDigitArticle`` pair of the official VQA-v2 ``vqaEval.py``) character for
character, including what makes it odd:

- each punctuation character is deleted if the *input* string has it next to a space (``p + " "`` or
  ``" " + p``) or if the input contains a digit-comma-digit anywhere, and is otherwise replaced by a
  space - the conditions look at the input while the replacements go to a working copy;
- periods not followed by a digit are removed, but at most 32 per call (the original passes
  ``re.UNICODE`` - the integer 32 - positionally as ``count``);
- number words ``none``/``zero`` .. ``ten`` become digits, the articles ``a``/``an``/``the`` are dropped,
  contractions are expanded with VQA-v2's table (ASCII-apostrophe form, as in LLaVA-Med's glossary; its
  keys ``Im``, ``Ive``, ``Id've`` can never match a lower-cased word and ``somebody'd`` maps backwards),
  and finally every comma is deleted.

``strict_tokens`` is what a correct normalisation looks like (Unicode-aware, whole words, no caps).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# VQA-v2's contraction table with ASCII apostrophes, exactly as LLaVA-Med's glossary.py carries it.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Order matters: the replacements are applied one character after the other to the working copy.
PUNCT: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The original pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a mistyped look-behind that, placed
# before a ".", can never fail - so it means "a period not followed by a digit".
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
PERIOD_CAP = 32
"""How many periods one call removes: the original passes ``re.UNICODE`` (== 32) as ``count``."""


def vqa_normalize(text: str) -> str:
    """LLaVA-Med's ``normalize_word`` (VQA-v2 rules with their quirks); see the module docstring."""
    work = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCT:
        # the conditions test the input string, not the working copy (as the original does)
        if p + " " in text or " " + p in text or digit_comma:
            work = work.replace(p, "")
        else:
            work = work.replace(p, " ")
    work = _PERIOD_STRIP.sub("", work, count=PERIOD_CAP)
    words = [NUMBER_WORDS.get(w, w) for w in work.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def token_counts(text: str) -> Counter[str]:
    """Token counter the way LLaVA-Med counts words: ``text.lower().strip().split()``."""
    return Counter(text.lower().strip().split())


# --- strict normalisation ---------------------------------------------------------------------------

# A zero-width space separates words visually, so it becomes a space; a BOM is dropped.
_INVISIBLE = {0x200B: " ", 0xFEFF: None}
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")
# dotted abbreviations ("e.g.", "u.s.") are written without their dots
_ABBREVIATION = re.compile(r"(?<!\w)(?:[^\W\d_]\.){2,}")
# a number with decimal points / thousands commas, a run of letters and digits (no underscore), or "%"
_STRICT_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+|%")


def strict_tokens(text: str) -> list[str]:
    """Whole-word tokens for the ``strict`` protocol.

    NFKC (full-width letters and ligatures become plain ones), case-folded, zero-width spaces treated as
    spaces, apostrophes inside words dropped (``don't`` == ``dont``), dotted abbreviations joined
    (``e.g.`` == ``eg``), ``%`` a token of its own, every other punctuation mark a word boundary; commas
    inside numbers dropped (``1,000`` -> ``1000``), decimal points kept; number words ``zero``..``ten``
    (and ``none``) become digits, articles are dropped.
    """
    t = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()
    t = _INNER_APOSTROPHE.sub("", t)
    t = _ABBREVIATION.sub(lambda m: m.group(0).replace(".", ""), t)
    out: list[str] = []
    for tok in _STRICT_TOKEN.findall(t):
        if tok[0].isdigit():
            tok = tok.replace(",", "")
        tok = NUMBER_WORDS.get(tok, tok)
        if tok not in ARTICLES:
            out.append(tok)
    return out
