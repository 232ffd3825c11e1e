"""Per-question metrics: LLaVA-Med's originals (quirks reproduced) and their strict counterparts.

The ``llava_*`` functions take strings the caller has already passed through :func:`vqa_normalize`
once and normalise them a second time inside, exactly as LLaVA-Med's ``evaluate_metrics.py`` does; the
second pass matters (e.g. it removes up to 32 more periods). Token counting is
``lower().strip().split()`` (:func:`token_counts`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from medvlm.eval.normalize import token_counts, vqa_normalize

BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu": (0.25, 0.25, 0.25, 0.25),
    "bleu_1": (1, 0, 0, 0),
    "bleu_2": (0, 1, 0, 0),
    "bleu_3": (0, 0, 1, 0),
}
"""The four BLEU variants LLaVA-Med reports (nltk's default weights, then unigram/bigram/trigram only)."""


# --- LLaVA-Med (reproduced) ---------------------------------------------------------------------------


def llava_f1(pred: str, gold: str) -> tuple[float, float, float]:
    """``calculate_f1score``: ``(f1, precision, recall)``; tp counts the *prediction's* occurrences.

    tp = sum of C[w] over words in both, fp = sum of C[w] over words only in the prediction, fn = sum of
    R[w] over words only in the gold; all three are 0 when either side is empty or tp == 0.
    """
    c = token_counts(vqa_normalize(pred))
    r = token_counts(vqa_normalize(gold))
    if not c or not r:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in c.items() if w in r)
    fp = sum(n for w, n in c.items() if w not in r)
    fn = sum(n for w, n in r.items() if w not in c)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_exact_match(pred: str, gold: str) -> float:
    """``calculate_exactmatch``: distinct gold words found in the prediction / number of prediction words."""
    c = token_counts(vqa_normalize(pred))
    r = token_counts(vqa_normalize(gold))
    total = sum(c.values())
    if total == 0:
        return 0.0
    return sum(1 for w in r if w in c) / total


def normalize_candidates(candidates: Sequence[str]) -> list[str]:
    """Each candidate answer through :func:`vqa_normalize` once (as the original does inside its loop)."""
    return [vqa_normalize(c) for c in candidates]


def llava_candidate_hit(pred: str, gold: str, normalized_candidates: Sequence[str]) -> float:
    """``calculate_appearance_with_normalization``: pick the candidate best covered by the prediction.

    A candidate's similarity is the share of its distinct words that occur among the prediction's words;
    the first candidate with the highest similarity wins (the first candidate when all are 0) and the
    item is a hit when that normalised candidate equals the (twice normalised) gold.
    """
    pred_words = token_counts(vqa_normalize(pred))
    gold_norm = vqa_normalize(gold)
    best, best_sim = 0, -1.0
    for i, cand in enumerate(normalized_candidates):
        cand_words = token_counts(cand)
        sim = sum(1 for w in pred_words if w in cand_words) / len(cand_words) if cand_words else 0.0
        if sim > best_sim:
            best, best_sim = i, sim
    return 1.0 if normalized_candidates[best] == gold_norm else 0.0


def nltk_bleu(reference: list[str], hypothesis: list[str]) -> dict[str, float]:
    """LLaVA-Med's BLEU: unsmoothed nltk ``sentence_bleu`` for the four weightings, nltk's own values.

    A short answer with no 2/3/4-gram overlap gets nltk's near-zero value (e.g. 1e-231), exactly as the
    paper's numbers did; only nltk's warning about it is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: float(sentence_bleu([reference], hypothesis, weights=w)) for name, w in BLEU_WEIGHTS.items()}


def strict_bleu(reference: list[str], hypothesis: list[str]) -> dict[str, float]:
    """Cumulative BLEU-4 / BLEU-1..3 whose order is capped by the shorter side, Chen & Cherry smoothing.

    ``bleu_k`` is the cumulative BLEU up to order ``min(k, len(reference), len(hypothesis))`` with uniform
    weights (coco-caption's meaning of BLEU-k), so an exact one-word answer scores 1 instead of ~0;
    zero n-gram counts are smoothed (nltk ``method1``). 0 when either side is empty.
    """
    if not reference or not hypothesis:
        return dict.fromkeys(BLEU_WEIGHTS, 0.0)
    smooth = SmoothingFunction().method1
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, k in (("bleu", 4), ("bleu_1", 1), ("bleu_2", 2), ("bleu_3", 3)):
            n = min(k, len(reference), len(hypothesis))
            out[name] = float(sentence_bleu([reference], hypothesis, weights=(1 / n,) * n, smoothing_function=smooth))
    return out


def contains_yes_or_no(pred: str) -> bool:
    """The single-dataset scorer's closed gate: ``"yes" in pred or "no" in pred`` (plain substrings)."""
    return "yes" in pred or "no" in pred


# --- strict -------------------------------------------------------------------------------------------


def clipped_prf(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` with clipped counts: overlap = sum over words of min(C[w], R[w])."""
    c, r = Counter(pred_tokens), Counter(gold_tokens)
    overlap = sum(min(n, r[w]) for w, n in c.items() if w in r)
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / sum(c.values())
    recall = overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall), precision, recall


def contains_phrase(tokens: Sequence[str], phrase: Sequence[str]) -> bool:
    """Whether ``phrase`` occurs as a contiguous run of whole tokens in ``tokens`` (empty phrase: False)."""
    n = len(phrase)
    if n == 0:
        return False
    phrase = list(phrase)
    return any(list(tokens[i : i + n]) == phrase for i in range(len(tokens) - n + 1))


def yes_no_answer(tokens: Sequence[str]) -> str | None:
    """``"yes"`` or ``"no"`` if exactly one of the two words occurs; ``None`` for both or neither."""
    has_yes, has_no = "yes" in tokens, "no" in tokens
    if has_yes == has_no:
        return None
    return "yes" if has_yes else "no"
