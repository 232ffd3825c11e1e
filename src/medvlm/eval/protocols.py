"""VQA scoring protocols: read a converted ``test.json`` and an answer file, pair them, score, aggregate.

Protocols (named explicitly, never guessed):

``llava-med``
    LLaVA-Med's batch scorer (``run_eval_batch.py``), the one behind the paper's numbers: open accuracy
    and closed accuracy = the normalised gold is a substring of the normalised prediction; recall /
    precision / F1 count the prediction's repeats; "exact match" is its word-overlap ratio; BLEU is
    nltk's unsmoothed ``sentence_bleu``; closed recall is reported too.
``llava-med-single``
    The README's single-dataset scorer (``run_eval.py``) with its closed-accuracy fix: a closed hit needs
    "yes" or "no" somewhere in the prediction and then the gold substring; open accuracy picks the
    candidate answer (``--candidates``) best covered by the prediction and compares it with the gold.
``strict``
    What the metrics should be: whole-word tokens (:func:`strict_tokens`); a closed answer must name
    exactly one of the question's offered options (``[yes, no]`` suffix) - or, without options, exactly
    one of yes/no - and it must be the gold (other closed golds: whole-word phrase containment);
    clipped token recall/precision/F1; exact match of the normalised token sequences; whole-word
    phrase containment for open accuracy; length-capped cumulative BLEU with smoothing.
``exact-match``
    Normalised exact match (VQA-v2 normalisation) for every question. Close to, not the same as, lmms-eval's
    ``slake`` task (0.7), whose normalisation also drops parentheticals and maps aliases and yes/no synonyms.

Every aggregate is a plain left-to-right ``sum(values) / len(values)`` times 100 (0 for an empty
group); per-item values stay in [0, 1].
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.eval import metrics as M
from medvlm.eval.bootstrap import METHOD, group_cis
from medvlm.eval.normalize import strict_tokens, vqa_normalize
from medvlm.utils.io import iter_jsonl, read_json

PROTOCOLS: tuple[str, ...] = ("llava-med", "llava-med-single", "strict", "exact-match")
OPEN_METRICS: tuple[str, ...] = (
    "recall",
    "precision",
    "f1",
    "exact_match",
    "bleu",
    "bleu_1",
    "bleu_2",
    "bleu_3",
    "accuracy",
)
CLOSED_METRICS: tuple[str, ...] = ("accuracy", "recall")

PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "llava-med": "LLaVA-Med's batch scorer as used for the paper (substring accuracy, prediction-count recall, "
    "unsmoothed nltk BLEU) - reproduces its numbers, quirks included",
    "llava-med-single": "LLaVA-Med's README single-dataset scorer with its closed-accuracy fix (closed: yes/no "
    "gate then substring; open accuracy: best-matching candidate answer must equal the gold)",
    "strict": "whole-word matching: a closed answer must name exactly one option (or one of yes/no) and it must "
    "be the gold; clipped token recall/precision/F1; exact match of normalised tokens",
    "exact-match": "normalised (VQA-v2 rules) exact match for every question (close to lmms-eval's slake task, "
    "which also maps aliases and yes/no synonyms)",
}

# Bumped whenever a protocol's per-question values or aggregation change, so recorded numbers
# (bench.json, exported lmms-eval tasks) say which scorer produced them.
PROTOCOL_VERSIONS: dict[str, str] = {
    "llava-med": "1.0",
    "llava-med-single": "1.0",
    "strict": "1.0",
    "exact-match": "1.0",
}

# answer_type -> group. VQA-RAD / SLAKE conversions use OPEN/CLOSED; LLaVA-Med's PathVQA files use
# "yes/no" for closed and "other" / "number" for open questions.
ANSWER_TYPES: dict[str, str] = {
    "OPEN": "open",
    "CLOSED": "closed",
    "yes/no": "closed",
    "other": "open",
    "number": "open",
}

# Which metrics each protocol defines; the others are reported as null.
_DEFINED: dict[str, dict[str, tuple[str, ...]]] = {
    "llava-med": {"open": OPEN_METRICS, "closed": CLOSED_METRICS},
    "llava-med-single": {"open": OPEN_METRICS, "closed": ("accuracy",)},
    "strict": {"open": OPEN_METRICS, "closed": CLOSED_METRICS},
    "exact-match": {"open": ("exact_match", "accuracy"), "closed": ("accuracy",)},
}


def defined_metrics(protocol: str) -> dict[str, tuple[str, ...]]:
    """The metrics ``protocol`` defines per group (``open`` / ``closed``); the others are reported as null."""
    if protocol not in _DEFINED:
        raise MedvlmError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return {g: tuple(ms) for g, ms in _DEFINED[protocol].items()}


@dataclass
class ScoreItem:
    """One gold/prediction pair."""

    id: Any
    """The gt ``id`` (== the answer's ``question_id``)."""
    group: str
    """``open`` or ``closed``."""
    answer_type: str
    """The gt ``answer_type`` as written in the file."""
    gold: str
    """Second turn of ``conversations`` (or ``conversatons``)."""
    pred: str
    """The answer's ``text``."""
    options: list[str] | None = None
    """Answer options offered by the question's suffix (``... options: [yes, no]``), if any."""
    question_type: str | None = None
    """The gt ``question_type`` (SLAKE / VQA-RAD conversions may carry one; used by reports)."""


@dataclass
class ScoreConfig:
    """How to score an answer file."""

    protocol: str
    """One of :data:`PROTOCOLS`."""
    candidates: list[str] | None = None
    """Candidate answers for ``llava-med-single`` open accuracy (ints already cast to str)."""
    bootstrap: int = 0
    """Percentile-bootstrap resamples for the CI95 of every metric (0 = no intervals)."""
    seed: int = 0
    """numpy seed of the bootstrap, fixed so intervals are reproducible."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Answer types :func:`pair_items` skipped, with counts (reported in the output)."""


# --- reading ------------------------------------------------------------------------------------------


def read_gt(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The converted ``test.json`` (a JSON array); checks the fields scoring needs."""
    data = read_json(path)
    if not isinstance(data, list):
        raise MedvlmError(f"{path}: expected a JSON array of questions, got {type(data).__name__}")
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise MedvlmError(f"{where}: expected an object")
        if "id" not in rec:
            raise MedvlmError(f"{where}: missing field 'id'")
        if not isinstance(rec.get("answer_type"), str):
            raise MedvlmError(f"{where} (id {rec['id']!r}): field 'answer_type' missing or not a string")
    return data


def gold_answer(rec: dict[str, Any], where: str) -> str:
    """The gold answer: the second turn's ``value`` of ``conversations`` (or the typo ``conversatons``)."""
    conv = rec.get("conversations", rec.get("conversatons"))
    if not isinstance(conv, list) or len(conv) < 2:
        raise MedvlmError(f"{where}: 'conversations' (or 'conversatons') must be a list of at least 2 turns")
    turn = conv[1]
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise MedvlmError(f"{where}: conversations[1].value missing or not a string")
    return turn["value"]


_OPTIONS = re.compile(r"options?\s*:\s*\[([^\[\]]*)\]\s*$", re.IGNORECASE)


def question_options(rec: dict[str, Any]) -> list[str] | None:
    """Options of a closed question's suffix, e.g. ``Please choose from ... options: [yes, no]``."""
    conv = rec.get("conversations", rec.get("conversatons"))
    first = conv[0].get("value") if isinstance(conv, list) and conv and isinstance(conv[0], dict) else None
    m = _OPTIONS.search(first.strip()) if isinstance(first, str) else None
    if m is None:
        return None
    opts = [o.strip() for o in m.group(1).split(",") if o.strip()]
    return opts or None


def _question_type(rec: dict[str, Any]) -> str | None:
    qt = rec.get("question_type")
    return None if qt is None else str(qt)


def read_predictions(path: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """Answer file -> ``{str(question_id): (line, text)}``; duplicate ids and bad fields are errors."""
    out: dict[str, tuple[int, str]] = {}
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise MedvlmError(f"{where}: missing field 'question_id'")
        if not isinstance(rec.get("text"), str):
            raise MedvlmError(f"{where}: field 'text' missing or not a string")
        key = str(rec["question_id"])
        if key in out:
            raise MedvlmError(f"{where}: duplicate question_id {rec['question_id']!r} (first on line {out[key][0]})")
        out[key] = (lineno, rec["text"])
    return out


def read_candidates(path: str | os.PathLike) -> list[str]:
    """Candidate answers: ``{"0": [...]}`` as LLaVA-Med ships them (or a bare list); ints cast to str."""
    data = read_json(path)
    if isinstance(data, dict):
        if "0" not in data:
            raise MedvlmError(f"{path}: expected the candidate list under key \"0\"")
        data = data["0"]
    if not isinstance(data, list) or not data:
        raise MedvlmError(f"{path}: expected a non-empty list of candidate answers")
    out = []
    for i, c in enumerate(data):
        if isinstance(c, int):  # the original casts ints (and so bools) with str()
            c = str(c)
        if not isinstance(c, str):
            raise MedvlmError(f"{path}: candidate {i}: expected a string or an integer, got {type(c).__name__}")
        out.append(c)
    return out


def pair_items(
    gt: list[dict[str, Any]], preds: dict[str, tuple[int, str]], gt_name: str = "gt", pred_name: str = "pred"
) -> tuple[list[ScoreItem], dict[str, int]]:
    """Pair gt records with answers by ``id`` == ``question_id`` in gt file order.

    Records with an ``answer_type`` outside :data:`ANSWER_TYPES` are skipped and counted. Every scored
    gt id needs exactly one answer and every answer a gt record, else a :class:`MedvlmError` lists them.
    """
    items: list[ScoreItem] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    missing: list[str] = []
    for i, rec in enumerate(gt):
        key = str(rec["id"])
        if key in seen:
            raise MedvlmError(f"{gt_name}: record {i}: duplicate id {rec['id']!r}")
        seen.add(key)
        group = ANSWER_TYPES.get(rec["answer_type"])
        if group is None:
            skipped[rec["answer_type"]] += 1
            continue
        gold = gold_answer(rec, f"{gt_name}: record {i} (id {rec['id']!r})")
        if key not in preds:
            missing.append(repr(rec["id"]))
            continue
        items.append(
            ScoreItem(
                id=rec["id"],
                group=group,
                answer_type=rec["answer_type"],
                gold=gold,
                pred=preds[key][1],
                options=question_options(rec),
                question_type=_question_type(rec),
            )
        )
    extra = [k for k in preds if k not in seen]
    if missing:
        raise MedvlmError(
            f"{pred_name}: no answer for {len(missing)} question(s) of {gt_name}, e.g. id {', '.join(missing[:5])}"
        )
    if extra:
        raise MedvlmError(
            f"{pred_name}: {len(extra)} answer(s) whose question_id is not in {gt_name}, e.g. {', '.join(extra[:5])}"
        )
    return items, dict(skipped)


# --- per-item scoring ---------------------------------------------------------------------------------


def _score_llava(item: ScoreItem, single: bool, cands_norm: Sequence[str] | None) -> dict[str, Any]:
    gold = vqa_normalize(item.gold.lower())
    pred = vqa_normalize(item.pred.lower())
    out: dict[str, Any] = {"gold_norm": gold, "pred_norm": pred}
    if item.group == "open":
        if single:
            assert cands_norm is not None
            out["accuracy"] = M.llava_candidate_hit(pred, gold, cands_norm)
        else:
            out["accuracy"] = 1.0 if gold in pred else 0.0
        out["exact_match"] = M.llava_exact_match(pred, gold)
        out["f1"], out["precision"], out["recall"] = M.llava_f1(pred, gold)
        out.update(M.nltk_bleu(gold.lower().split(), pred.lower().split()))
    else:
        hit = gold in pred
        if single:
            hit = M.contains_yes_or_no(pred) and hit
        else:
            out["recall"] = M.llava_f1(pred, gold)[2]
        out["accuracy"] = 1.0 if hit else 0.0
    return out


def _score_strict(item: ScoreItem) -> dict[str, Any]:
    gold, pred = strict_tokens(item.gold), strict_tokens(item.pred)
    out: dict[str, Any] = {"gold_norm": " ".join(gold), "pred_norm": " ".join(pred)}
    f1, precision, recall = M.clipped_prf(pred, gold)
    if item.group == "open":
        out["accuracy"] = 1.0 if M.contains_phrase(pred, gold) else 0.0
        out["exact_match"] = 1.0 if gold and pred == gold else 0.0
        out["f1"], out["precision"], out["recall"] = f1, precision, recall
        out.update(M.strict_bleu(gold, pred))
    else:
        options = [strict_tokens(o) for o in item.options or []]
        if gold and gold in options:
            # the answer must name exactly one of the offered options, and that one must be the gold
            named = [o for o in options if M.contains_phrase(pred, o)]
            hit = named == [gold]
        elif gold in (["yes"], ["no"]):
            hit = M.yes_no_answer(pred) == gold[0]
        else:
            hit = M.contains_phrase(pred, gold)
        out["accuracy"] = 1.0 if hit else 0.0
        out["recall"] = recall
    return out


def _score_exact(item: ScoreItem) -> dict[str, Any]:
    gold, pred = vqa_normalize(item.gold), vqa_normalize(item.pred)
    hit = 1.0 if pred == gold else 0.0
    out: dict[str, Any] = {"gold_norm": gold, "pred_norm": pred, "accuracy": hit}
    if item.group == "open":
        out["exact_match"] = hit
    return out


def score_item(item: ScoreItem, protocol: str, cands_norm: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-question values (0..1) of one protocol, plus the normalised strings it compared."""
    if protocol == "llava-med":
        return _score_llava(item, single=False, cands_norm=None)
    if protocol == "llava-med-single":
        if cands_norm is None:
            raise MedvlmError("protocol 'llava-med-single' needs the candidate answer list (--candidates FILE)")
        return _score_llava(item, single=True, cands_norm=cands_norm)
    if protocol == "strict":
        return _score_strict(item)
    if protocol == "exact-match":
        return _score_exact(item)
    raise MedvlmError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


# --- aggregation --------------------------------------------------------------------------------------


def mean_x100(values: Sequence[float]) -> float:
    """``sum(values) / len(values) * 100`` left to right as the original; 0.0 for an empty list."""
    return sum(values) / len(values) * 100 if values else 0.0


def score_items(items: Sequence[ScoreItem], config: ScoreConfig) -> dict[str, Any]:
    """Score paired items under ``config.protocol``; returns the ``scores.json`` object."""
    if config.protocol not in PROTOCOLS:
        raise MedvlmError(f"unknown protocol {config.protocol!r}; known: {', '.join(PROTOCOLS)}")
    cands = M.normalize_candidates(config.candidates) if config.candidates is not None else None
    if config.protocol == "llava-med-single" and not cands:
        raise MedvlmError("protocol 'llava-med-single' needs a non-empty candidate answer list (--candidates FILE)")
    per_item = []
    values: dict[str, dict[str, list[float]]] = {
        g: {m: [] for m in _DEFINED[config.protocol][g]} for g in ("open", "closed")
    }
    for it in items:
        row = score_item(it, config.protocol, cands)
        for m in values[it.group]:
            values[it.group][m].append(row[m])
        per_item.append(
            {"id": it.id, "type": it.group, "answer_type": it.answer_type, "question_type": it.question_type, **row}
        )
    result: dict[str, Any] = {
        "protocol": config.protocol,
        "counts": {
            "open": sum(1 for it in items if it.group == "open"),
            "closed": sum(1 for it in items if it.group == "closed"),
        },
        "skipped": {"count": sum(config.skipped.values()), "answer_types": dict(config.skipped)},
    }
    metric_names = {"open": OPEN_METRICS, "closed": CLOSED_METRICS}
    for g in ("open", "closed"):
        result[g] = {m: (mean_x100(values[g][m]) if m in values[g] else None) for m in metric_names[g]}
    result["per_item"] = per_item
    if config.bootstrap > 0:
        cis = group_cis({g: values[g] for g in ("open", "closed")}, config.bootstrap, config.seed, overall=())
        result["ci95"] = {
            "method": METHOD,
            "resamples": config.bootstrap,
            "seed": config.seed,
            **{g: cis[g] for g in ("open", "closed")},
        }
    else:
        result["ci95"] = {}
    return result


def score_files(
    gt_path: str | os.PathLike,
    pred_path: str | os.PathLike,
    protocol: str,
    candidates_path: str | os.PathLike | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Read, pair and score: the library function behind ``medvlm eval score``."""
    if protocol not in PROTOCOLS:
        raise MedvlmError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    if protocol == "llava-med-single" and candidates_path is None:
        raise MedvlmError("protocol 'llava-med-single' needs the candidate answer list (--candidates FILE)")
    gt = read_gt(gt_path)
    preds = read_predictions(pred_path)
    items, skipped = pair_items(gt, preds, str(gt_path), str(pred_path))
    cands = read_candidates(candidates_path) if candidates_path is not None else None
    config = ScoreConfig(protocol=protocol, candidates=cands, bootstrap=bootstrap, seed=seed, skipped=skipped)
    result = score_items(items, config)
    result["inputs"] = {
        "gt": str(gt_path),
        "pred": str(pred_path),
        "candidates": None if candidates_path is None else str(candidates_path),
    }
    return result
