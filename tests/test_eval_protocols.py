"""Scoring protocols: LLaVA-Med's metrics reproduced (expected values derived by hand from its rules), the
strict and exact-match protocols, pairing/aggregation/bootstrap, the metric fixture and real answer files."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from medvlm.errors import MedvlmError
from medvlm.eval import metrics as M
from medvlm.eval.commands import app
from medvlm.eval.protocols import PROTOCOLS, read_candidates, score_files

FIX = "data/metric_fixture"
OPEN_KEYS = ("accuracy", "f1", "precision", "recall", "exact_match")


# --- metric functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gold, f1, precision, recall",
    [
        ("left left", "left lung", 0.8, 1.0, 2 / 3),  # tp counts the prediction's 2 "left"s
        ("mass mass mass mass", "mass", 1.0, 1.0, 1.0),
        ("mass", "mass mass", 1.0, 1.0, 1.0),  # fn only counts gold words absent from the pred
        ("kidney kidney liver liver liver", "kidney", 4 / 7, 0.4, 1.0),
        ("effusion effusion effusion", "pleural effusion", 6 / 7, 1.0, 0.75),
        ("", "liver", 0.0, 0.0, 0.0),  # empty prediction
        ("liver", "the", 0.0, 0.0, 0.0),  # gold empty after normalisation
        ("abc", "xyz", 0.0, 0.0, 0.0),  # tp == 0
        ("." * 38 + "liver", "liver", 0.0, 0.0, 0.0),  # the second pass leaves 6 periods
        ("liv.er", "liver", 1.0, 1.0, 1.0),  # ... but removes a leftover one
    ],
)
def test_llava_f1(pred, gold, f1, precision, recall):
    got = M.llava_f1(pred, gold)
    assert got == pytest.approx((f1, precision, recall), abs=1e-12)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("left left", "left lung", 0.5),  # distinct gold words found (1) / pred words (2)
        ("mass mass mass mass", "mass", 0.25),
        ("kidney right kidney", "right kidney", 2 / 3),
        ("mass", "mass mass", 1.0),
        ("", "liver", 0.0),
        ("liver", "", 0.0),
    ],
)
def test_llava_exact_match(pred, gold, expected):
    assert M.llava_exact_match(pred, gold) == pytest.approx(expected, abs=1e-12)


def test_llava_candidate_hit_first_best_wins():
    cands = M.normalize_candidates(["right", "left", "left lung", "lung", "X-Ray", "2", "the"])
    assert cands == ["right", "left", "left lung", "lung", "x ray", "2", ""]
    assert (
        M.llava_candidate_hit("left lung", "left lung", cands) == 0.0
    )  # "left" (1/1) ties "left lung" (2/2), first wins
    assert M.llava_candidate_hit("left lung", "left", cands) == 1.0
    assert M.llava_candidate_hit("left lung", "lung", cands) == 0.0
    assert M.llava_candidate_hit("", "right", cands) == 1.0  # all 0: the first candidate
    assert M.llava_candidate_hit("x ray", "x ray", cands) == 1.0
    assert M.llava_candidate_hit("2", "2", cands) == 1.0


def test_nltk_bleu_hand_values():
    r = M.nltk_bleu("left lower lobe consolidation with effusion".split(), "left lower lobe consolidation".split())
    for k in ("bleu", "bleu_1", "bleu_2", "bleu_3"):  # all n-gram precisions 1, brevity penalty exp(1 - 6/4)
        assert r[k] == pytest.approx(math.exp(-0.5), rel=1e-12)
    hyp = "there is left lower lobe consolidation with small effusion".split()
    r = M.nltk_bleu("left lower lobe consolidation".split(), hyp)
    assert r["bleu_1"] == pytest.approx(4 / 9) and r["bleu_2"] == pytest.approx(3 / 8)
    assert r["bleu_3"] == pytest.approx(2 / 7)
    assert r["bleu"] == pytest.approx((4 / 9 * 3 / 8 * 2 / 7 * 1 / 6) ** 0.25)
    # unsmoothed: no bigram overlap gives nltk's near-zero value, not 0 and not a smoothed one
    r = M.nltk_bleu(["left", "lung"], ["left", "left"])
    assert r["bleu_1"] == pytest.approx(0.5)
    assert 0 < r["bleu_2"] < 1e-300 and 0 < r["bleu"] < 1e-200
    assert M.nltk_bleu([], ["liver"])["bleu"] == 0 and M.nltk_bleu(["liver"], [])["bleu_1"] == 0


def test_strict_helpers():
    assert M.clipped_prf(["left", "left"], ["left", "lung"]) == pytest.approx((0.5, 0.5, 0.5))
    assert M.clipped_prf(["mass"] * 4, ["mass"]) == pytest.approx((0.4, 0.25, 1.0))
    assert M.yes_no_answer(["yes", "and", "no"]) is None
    assert M.yes_no_answer(["not", "sure"]) is None
    assert M.yes_no_answer(["no", "evidence"]) == "no"
    assert M.contains_phrase(["chest", "x", "ray"], ["x", "ray"])
    assert not M.contains_phrase(["clear", "lungs"], ["ear"])
    assert not M.contains_phrase(["a"], [])
    exact_one_word = M.strict_bleu(["liver"], ["liver"])
    assert all(v == pytest.approx(1.0) for v in exact_one_word.values())


# --- the metric fixture: hand-derived values per named edge case ---------------------------------------


@pytest.fixture(scope="module")
def fixture_results(shared_dir):
    d = shared_dir / FIX
    out = {p: score_files(d / "gt_test.json", d / "pred_answers.jsonl", p, d / "candidate.json") for p in PROTOCOLS}
    by_id = {p: {it["id"]: it for it in r["per_item"]} for p, r in out.items()}
    return out, by_id


# closed: (llava-med accuracy, llava-med recall_closed, llava-med-single accuracy, strict accuracy)
CLOSED_EXPECTED = {
    900002: (1, 0, 1, 0),  # "This is not a fracture." / no: "no" inside "not"
    900003: (1, 0, 1, 0),  # "no" inside "nodule"
    900006: (0, 0, 0, 0),  # "None" normalises to "0"
    900008: (1, 1, 1, 0),  # "Yes, and no." / yes: both words - original hit, strict miss
    900009: (1, 1, 1, 0),  # "Yes, and no." / no
    900010: (1, 0, 1, 0),  # "yes" inside "eyes"
    900014: (0, 0, 0, 0),  # empty prediction
    900016: (1, 1, 0, 1),  # "The lesion is on the left side." / left: no yes/no for the single scorer's gate
    900019: (1, 1, 0, 1),  # "This is a CT scan." / ct
    900024: (1, 0, 1, 0),  # gold "a" normalises to "" - a substring of everything
    900025: (1, 0, 0, 0),  # gold "the", pred "maybe"
    900026: (0, 0, 0, 0),  # "N/A" -> "n"
    900029: (0, 0, 0, 1),  # full-width "Ｙｅｓ": only NFKC (strict) reads it
    900031: (1, 1, 1, 1),  # NBSP around "no"
    900037: (1, 1, 1, 0),  # "yes-no" -> "yes no"
    900038: (1, 1, 1, 0),  # "yes - no" -> "yes no"
    900039: (1, 1, 1, 1),  # yes + 40 periods: 8 survive the first pass, the second pass removes them
    900040: (1, 0, 1, 1),  # yes + 70 periods: 6 survive the second pass, so recall_closed is 0
    900047: (1, 1, 1, 1),  # "n.o." -> "no"
    900055: (1, 0, 0, 0),  # "male" inside "female"
    900060: (1, 0, 1, 1),  # zero-width space glues "no" to "evidence" for str.split()
    900061: (1, 1, 1, 0),  # "Yes. ... there is no evidence ..." names both options
    900065: (1, 1, 1, 1),  # "1,000 yes"
}

# open: llava-med (accuracy, f1, precision, recall, exact_match)
OPEN_EXPECTED = {
    900071: (0, 0.8, 1, 2 / 3, 0.5),
    900072: (0, 6 / 7, 1, 0.75, 1 / 3),
    900073: (1, 1, 1, 1, 0.25),
    900075: (1, 1, 1, 1, 1),  # "x - ray" vs "x-ray"
    900076: (0, 0, 0, 0, 0),  # one spaced hyphen deletes all: "xray"
    900077: (1, 0.5, 1 / 3, 1, 1 / 3),  # "1,000"
    900078: (0, 0.8, 2 / 3, 1, 2 / 3),  # "3, 4 cm" vs "3 cm"
    900079: (0, 0, 0, 0, 0),  # "1.5cm" kept glued
    900080: (1, 0.8, 2 / 3, 1, 2 / 3),
    900081: (1, 0, 0, 0, 0),  # ".5" is a substring of "0.5"
    900082: (1, 1, 1, 1, 1),  # none -> 0
    900089: (1, 0, 0, 0, 0),  # gold "a" -> ""
    900090: (1, 0, 0, 0, 0),  # gold "the", empty prediction
    900092: (0, 0, 0, 0, 0),
    900095: (1, 0.8, 2 / 3, 1, 2 / 3),  # "dont know" -> "don't know"
    900097: (0, 0, 0, 0, 0),  # "im" never expands
    900124: (1, 1, 1, 1, 1),  # 33 leading periods: ".liver" after one pass, "liver" after two
    900125: (0, 1, 1, 1, 1),  # "liv.er" after one pass
    900126: (1, 0, 0, 0, 0),  # 70 leading periods: 6 remain after two passes
    900129: (1, 0, 0, 0, 0),  # "ear" inside "clear"
    900140: (0, 1, 1, 1, 1),  # word order
    900142: (0, 0.8, 2 / 3, 1, 2 / 3),  # gold "liver\nspleen"
    900146: (0, 1, 1, 1, 1),  # gold "mass mass", pred "mass"
    900147: (1, 1, 1, 1, 0.002),  # 500 x "left"
    900155: (1, 1, 1, 1, 1),  # "somebody'd" -> "somebodyd"
    900168: (1, 0.5, 1 / 3, 1, 1 / 3),  # emoji tokens count
    900174: (1, 0, 0, 0, 0),  # "mass.mass.mass" -> "massmassmass"
    900177: (1, 4 / 7, 0.4, 1, 0.2),
    900178: (1, 1, 1, 1, 2 / 3),
    900196: (1, 0, 0, 0, 0),  # "3,3" -> "33"
    900197: (1, 1, 1, 1, 1),
}

# llava-med-single open accuracy (candidate list of the fixture)
SINGLE_OPEN_EXPECTED = {
    900131: 0,  # "left lung": "left" ties "left lung" and comes first
    900093: 1,  # empty prediction: first candidate "right" == gold
    900092: 0,
    900180: 1,
    900181: 0,
    900132: 1,
    900133: 1,
    900134: 0,
    900179: 0,
    900182: 1,
    900183: 1,
    900184: 0,  # "with contrast" (2/2) comes before "contrast"
    900185: 1,
    900187: 0,
}

# strict open (accuracy, exact_match, f1)
STRICT_OPEN_EXPECTED = {
    900071: (0, 0, 0.5),
    900073: (1, 0, 0.4),
    900076: (1, 0, 4 / 7),
    900089: (0, 0, 0),
    900108: (1, 1, 1),
    900120: (1, 0, 2 / 3),
    900129: (0, 0, 0),
    900130: (0, 0, 0),
    900151: (1, 1, 1),
    900169: (1, 1, 1),
}


def test_fixture_closed_cases(fixture_results):
    _, by_id = fixture_results
    for qid, (acc, rec, single, strict) in CLOSED_EXPECTED.items():
        got = (
            by_id["llava-med"][qid]["accuracy"],
            by_id["llava-med"][qid]["recall"],
            by_id["llava-med-single"][qid]["accuracy"],
            by_id["strict"][qid]["accuracy"],
        )
        assert got == pytest.approx((acc, rec, single, strict)), qid


def test_fixture_open_cases(fixture_results):
    _, by_id = fixture_results
    for qid, exp in OPEN_EXPECTED.items():
        it = by_id["llava-med"][qid]
        assert tuple(it[k] for k in OPEN_KEYS) == pytest.approx(exp, abs=1e-12), qid
    for qid, exp in SINGLE_OPEN_EXPECTED.items():
        assert by_id["llava-med-single"][qid]["accuracy"] == exp, qid
    for qid, exp in STRICT_OPEN_EXPECTED.items():
        it = by_id["strict"][qid]
        assert (it["accuracy"], it["exact_match"], it["f1"]) == pytest.approx(exp, abs=1e-12), qid
    # BLEU on the once-normalised strings: ".liver" is not "liver"; 8 periods stay glued to "cm"
    assert by_id["llava-med"][900124]["bleu_1"] == 0
    assert by_id["llava-med"][900197]["bleu_1"] == pytest.approx(0.5)
    assert by_id["llava-med"][900100]["bleu"] == pytest.approx(1.0)


def test_fixture_exact_match_protocol(fixture_results):
    _, by_id = fixture_results
    em = by_id["exact-match"]
    assert em[900011]["accuracy"] == 1  # "YES" / yes
    assert em[900061]["accuracy"] == 0  # a sentence is not an exact answer
    assert em[900082]["accuracy"] == 1  # "0" / none
    assert em[900071]["exact_match"] == 0


def test_fixture_aggregates_are_plain_means(fixture_results):
    results, _ = fixture_results
    for p, r in results.items():
        assert r["counts"] == {"open": 306, "closed": 342}
        for g in ("open", "closed"):
            items = [it for it in r["per_item"] if it["type"] == g]
            for m, v in r[g].items():
                if v is None:
                    continue
                vals = [it[m] for it in items]
                assert v == sum(vals) / len(vals) * 100, (p, g, m)  # exact: same left-to-right order
                assert 0 <= v <= 100
    assert results["llava-med-single"]["closed"]["recall"] is None
    assert results["exact-match"]["open"]["f1"] is None


# --- pairing, answer types, aggregation on a hand-sized file ----------------------------------------


def _write_small(tmp_path, reverse_preds=False):
    def conv(q, a, typo=False):
        return {
            ("conversatons" if typo else "conversations"): [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        }

    gt = [
        {"id": 1, "answer_type": "OPEN", **conv("Where?", "left lung")},
        {"id": 2, "answer_type": "OPEN", **conv("What?", "mass", typo=True)},
        {
            "id": 3,
            "answer_type": "CLOSED",
            **conv("Is it? Please choose from the following two options: [yes, no]", "yes"),
        },
        {"id": 4, "answer_type": "CLOSED", **conv("Is it?", "no")},
        {"id": 5, "answer_type": "yes/no", **conv("Is it?", "no")},
        {"id": 6, "answer_type": "other", **conv("Which organ?", "liver")},
        {"id": 7, "answer_type": "weird", **conv("?", "x")},
    ]
    preds = [
        {"question_id": i, "text": t}
        for i, t in [
            (1, "left left"),
            (2, "mass mass mass mass"),
            (3, "Yes, and no."),
            (4, "not sure"),
            (5, "No"),
            (6, "the liver"),
            (7, "whatever"),
        ]
    ]
    if reverse_preds:
        preds.reverse()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return tmp_path / "gt.json", tmp_path / "pred.jsonl"


def test_small_file_by_hand(tmp_path):
    gt, pred = _write_small(tmp_path)
    r = score_files(gt, pred, "llava-med")
    assert r["counts"] == {"open": 3, "closed": 3}
    assert r["skipped"] == {"count": 1, "answer_types": {"weird": 1}}
    assert r["open"]["recall"] == pytest.approx((2 / 3 + 1 + 1) / 3 * 100)
    assert r["open"]["exact_match"] == pytest.approx((0.5 + 0.25 + 1) / 3 * 100)
    assert r["open"]["accuracy"] == pytest.approx(2 / 3 * 100)
    assert r["closed"]["accuracy"] == pytest.approx(100.0)  # "no" in "not sure" counts
    assert r["closed"]["recall"] == pytest.approx(2 / 3 * 100)
    s = score_files(gt, pred, "strict")
    assert s["closed"]["accuracy"] == pytest.approx(100 / 3)  # only "No" is a clean answer
    assert [it["id"] for it in r["per_item"]] == [1, 2, 3, 4, 5, 6]  # gt file order
    # pairing is by id: the answer file's order does not matter
    (tmp_path / "rev").mkdir()
    gt2, pred2 = _write_small(tmp_path / "rev", reverse_preds=True)
    r2 = score_files(gt2, pred2, "llava-med")
    assert {k: r2[k] for k in ("open", "closed")} == {k: r[k] for k in ("open", "closed")}


def test_bootstrap_ci_is_seeded(tmp_path, shared_dir):
    d = shared_dir / FIX
    a = score_files(d / "gt_test.json", d / "pred_answers.jsonl", "strict", bootstrap=200, seed=3)
    b = score_files(d / "gt_test.json", d / "pred_answers.jsonl", "strict", bootstrap=200, seed=3)
    assert a["ci95"] == b["ci95"] and a["ci95"]["resamples"] == 200
    for g in ("open", "closed"):
        for m, v in a[g].items():
            lo, hi = a["ci95"][g][m]
            assert lo <= v <= hi
    assert score_files(d / "gt_test.json", d / "pred_answers.jsonl", "strict")["ci95"] == {}


def test_pairing_errors(tmp_path):
    gt, pred = _write_small(tmp_path)
    lines = pred.read_text().splitlines()
    (tmp_path / "missing.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(MedvlmError, match="no answer for 1 question.*id 1"):
        score_files(gt, tmp_path / "missing.jsonl", "llava-med")
    (tmp_path / "dup.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(MedvlmError, match="dup.jsonl:8: duplicate question_id 1"):
        score_files(gt, tmp_path / "dup.jsonl", "llava-med")
    (tmp_path / "extra.jsonl").write_text("\n".join(lines + ['{"question_id": 99, "text": "x"}']) + "\n")
    with pytest.raises(MedvlmError, match="not in"):
        score_files(gt, tmp_path / "extra.jsonl", "llava-med")
    (tmp_path / "notext.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(MedvlmError, match="notext.jsonl:1: field 'text'"):
        score_files(gt, tmp_path / "notext.jsonl", "llava-med")
    with pytest.raises(MedvlmError, match="needs the candidate answer list"):
        score_files(gt, pred, "llava-med-single")
    with pytest.raises(MedvlmError, match="unknown protocol 'vqa'"):
        score_files(gt, pred, "vqa")
    (tmp_path / "bad_gt.json").write_text(
        json.dumps([{"id": 1, "answer_type": "OPEN", "conversations": [{"value": "q"}]}])
    )
    with pytest.raises(MedvlmError, match="record 0 .*at least 2 turns"):
        score_files(tmp_path / "bad_gt.json", pred, "llava-med")
    (tmp_path / "cands.json").write_text(json.dumps({"0": ["a", 1.5]}))
    with pytest.raises(MedvlmError, match="candidate 1"):
        read_candidates(tmp_path / "cands.json")


def test_candidates_ints_cast(shared_dir):
    cands = read_candidates(shared_dir / FIX / "candidate.json")
    assert cands[5:8] == ["2", "3", "0"]


# --- real answer files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["instruct", "finetuned_1epoch", "llava_zeroshot"])
def test_real_vqa_rad_answer_files(tmp_path, shared_dir, name):
    gt_all = json.loads((shared_dir / FIX / "gt_test.json").read_text())
    gt = tmp_path / "gt451.json"
    gt.write_text(json.dumps([g for g in gt_all if g["id"] < 900000]))  # the 451 real VQA-RAD questions
    pred = shared_dir / "data/llava_med_eval" / f"vqa_rad_answers_{name}.jsonl"
    cands = shared_dir / FIX / "candidate.json"
    res = {p: score_files(gt, pred, p, cands) for p in PROTOCOLS}
    for r in res.values():
        assert r["counts"] == {"open": 179, "closed": 272}
        for g in ("open", "closed"):
            assert all(0 <= v <= 100 for v in r[g].values() if v is not None)
    lm, single, strict = res["llava-med"], res["llava-med-single"], res["strict"]
    # the single scorer only adds a gate to the closed rule and swaps open accuracy; the rest is shared
    assert single["closed"]["accuracy"] <= lm["closed"]["accuracy"]
    for m in ("recall", "precision", "f1", "exact_match", "bleu"):
        assert single["open"][m] == lm["open"][m]
    # strict never credits a closed answer the substring rule rejects... and does reject some it credits
    lm_items = {it["id"]: it for it in lm["per_item"]}
    st_items = {it["id"]: it for it in strict["per_item"]}
    closed = [i for i, it in lm_items.items() if it["type"] == "closed"]
    assert any(lm_items[i]["accuracy"] == 1 and st_items[i]["accuracy"] == 0 for i in closed)


def test_cli_score_writes_json(tmp_path, shared_dir):
    d = shared_dir / FIX
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(
        app,
        [
            "score",
            "--gt",
            str(d / "gt_test.json"),
            "--pred",
            str(d / "pred_answers.jsonl"),
            "--protocol",
            "llava-med",
            "--out",
            str(out),
            "--bootstrap",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "llava-med" and data["counts"] == {"open": 306, "closed": 342}
    assert set(data["open"]) == {
        "recall",
        "precision",
        "f1",
        "exact_match",
        "bleu",
        "bleu_1",
        "bleu_2",
        "bleu_3",
        "accuracy",
    }
    assert set(data["closed"]) == {"accuracy", "recall"} and data["ci95"]["resamples"] == 50
    assert f"{data['open']['accuracy']:.4f}" in res.output


def test_cli_score_bad_input_is_a_medvlm_error(tmp_path):
    gt, pred = _write_small(tmp_path)
    res = CliRunner().invoke(app, ["score", "--gt", str(gt), "--pred", str(pred), "--protocol", "llava-med-single"])
    assert res.exit_code != 0 and isinstance(res.exception, MedvlmError)
    assert "--candidates" in str(res.exception)
    assert not (tmp_path / "scores.json").exists()
