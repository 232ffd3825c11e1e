"""The GPT-judged chat benchmark: reply parsing, the prompt, group counts on the real qa50 file, and an
end-to-end `eval chat` against the local OpenAI-compatible test server (retries, resume, cache)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medvlm.eval.chat_summary import GROUPS, summarize_judged, summarize_records
from medvlm.eval.commands import app
from medvlm.eval.judge import judge_chat, judge_messages, read_chat_questions
from medvlm.llm import LLMConfig
from medvlm.llm.judge import RETRY_PROMPT
from medvlm.llm.scores import parse_scores
from openai_test_server import last_user_text, openai_server_factory  # noqa: F401  (pytest fixture)

DOMAIN_ORDER = ["chest_xray", "mri", "histology", "gross", "ct_scan"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 7\nAssistant 1 is more detailed.", (8, 7)),
        ("8, 7", (8, 7)),
        ("8/10 7/10", (8, 7)),
        ("**8** **7**", (8, 7)),
        ("Scores: 9 6", (9, 6)),
        ("8.5 6", (8.5, 6)),
        ("\n\n7 7\n", (7, 7)),
        ("Assistant 1: 8 - accurate and complete.\nAssistant 2: 7 - misses the stain.", (8, 7)),
        ("Assistant 1: 8, Assistant 2: 4", (8, 4)),
        ("Assistant 1 score: 8/10; Assistant 2 score: 6/10", (8, 6)),
        ("Assistant 1 (reference): 9\nAssistant 2 (model) - 3", (9, 3)),
        ("I cannot decide.\nAssistant 1 gave 3 reasons and Assistant 2 gave 2.", None),  # numbers not scores
        ("Both answers are fine.", None),
        ("8", None),
        ("7 8 9", None),
        ("11 7", None),  # out of range
        ("", None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_judge_prompt(shared_dir):
    q = read_chat_questions(shared_dir / "formats/qa50_sample.jsonl")[0]
    msgs = judge_messages(q, q.reference, "MODEL ANSWER")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "<image>" not in user and "[Question]\nWhat is the organ in the image?" in user
    assert "Figure caption (Fig. 3): The gross histopathologic finding" in user
    assert "- Inflammatory cells were not found in the vicinity" in user  # the mention, unwrapped from tokens
    assert user.index("[Assistant 1]\n" + q.reference) < user.index("[Assistant 2]\nMODEL ANSWER")
    assert "1 to 10" in user and "first line" in user


def _hand_counts(path):
    """Group counts straight from the file, independently of medvlm."""
    counts = dict.fromkeys(GROUPS, 0)
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            counts["overall"] += 1
            counts[rec["type"]] += 1
            for d in DOMAIN_ORDER:
                if rec["domain"][d]:
                    counts[d] += 1
                    break
    return counts


@pytest.mark.parametrize("rel", ["formats/qa50_sample.jsonl", "data/llava_med_eval/llava_med_eval_qa50_qa.jsonl"])
def test_group_counts(shared_dir, rel):
    path = shared_dir / rel
    qs = read_chat_questions(path)
    records = [
        {
            "question_id": q.question_id,
            "type": q.type,
            "domain": q.domain,
            "reference_score": 8.0,
            "model_score": 6.0,
            "error": None,
        }
        for q in qs
    ]
    summary = summarize_records(records)
    assert {g: summary[g]["count"] for g in GROUPS} == _hand_counts(path)
    if rel.endswith("qa50_qa.jsonl"):
        assert len(qs) == 193
        assert summary["conversation"]["count"] == 143 and summary["detailed_description"]["count"] == 50
        assert sum(summary[d]["count"] for d in DOMAIN_ORDER) == 193
    else:  # the first records are histology AND gross: histology wins
        assert summary["histology"]["count"] == 6 and summary["gross"]["count"] == 0
    assert summary["overall"]["relative_score"] == pytest.approx(75.0)


def test_relative_score_is_mean_of_ratios():
    recs = [
        {
            "question_id": i,
            "type": "conversation",
            "domain": "mri",
            "reference_score": r,
            "model_score": m,
            "error": None,
        }
        for i, (r, m) in enumerate([(8, 4), (5, 5), (10, 5)])
    ]
    recs.append(
        {
            "question_id": 9,
            "type": "conversation",
            "domain": "mri",
            "reference_score": None,
            "model_score": None,
            "error": "unreadable",
        }
    )
    s = summarize_records(recs)["mri"]
    assert s["count"] == 3 and s["failed"] == 1
    assert s["relative_score"] == pytest.approx((0.5 + 1 + 0.5) / 3 * 100)
    assert s["ratio_of_means"] == pytest.approx((14 / 3) / (23 / 3) * 100)
    assert s["reference_mean"] == pytest.approx(23 / 3) and s["model_mean"] == pytest.approx(14 / 3)
    lo, hi = s["relative_score_ci95"]
    assert lo <= s["relative_score"] <= hi
    assert (
        summarize_records(recs)["ct_scan"]["count"] == 0
        and summarize_records(recs)["ct_scan"]["relative_score"] is None
    )


UNSURE_Q = "Are there any inflammatory cells present?"  # question 2: first reply unreadable, then fixed
HOPELESS_Q = "What type of cells are lining the cystic wall?"  # question 1: never readable


def _respond(body):
    user = last_user_text(body)
    first_user = body["messages"][1]["content"]
    if user == RETRY_PROMPT:
        return "no scores here either" if HOPELESS_Q in first_user else "7 5\nSecond try."
    if UNSURE_Q in user or HOPELESS_Q in user:
        return "I cannot decide.\nBoth are reasonable."
    if "[Assistant 1]\nMODEL ANSWER" in user:  # swapped order
        return "5 9\nAssistant 2 is better."
    return "8 6\nAssistant 1 is more complete."


def _answers(tmp_path, questions):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question_id": q.question_id, "text": f"MODEL ANSWER {q.question_id}"}) + "\n"
            for q in questions
        )
    )
    return path


def test_eval_chat_end_to_end(tmp_path, shared_dir, openai_server_factory):  # noqa: F811
    qpath = shared_dir / "formats/qa50_sample.jsonl"
    questions = read_chat_questions(qpath)
    answers = _answers(tmp_path, questions)
    server = openai_server_factory(_respond)
    out = tmp_path / "judged.jsonl"
    args = [
        "chat",
        "--questions",
        str(qpath),
        "--answers",
        str(answers),
        "--out",
        str(out),
        "--judge-model",
        "judge-test",
        "--base-url",
        server.base_url,
        "--api-key-env",
        "",
        "--no-progress",
        "--parse-retries",
        "1",
        "--backoff-base",
        "0",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # 8 questions + 1 follow-up for UNSURE_Q + 1 follow-up for HOPELESS_Q
    assert len(server.requests) == 10
    assert all(r.body["temperature"] == 0 and r.body["model"] == "judge-test" for r in server.requests)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [q.question_id for q in questions]
    by_q = {r["question"]: r for r in recs}
    assert by_q[UNSURE_Q]["scores"]["forward"] == [7, 5] and by_q[UNSURE_Q]["error"] is None
    assert by_q[HOPELESS_Q]["error"].startswith("forward: unreadable judge scores after 2 replies")
    assert by_q[HOPELESS_Q]["reference_score"] is None
    assert by_q["What is the organ in the image?"]["reference_score"] == 8
    assert "judged 7 question(s)" in res.output and "1 question(s) left without scores" in res.output

    # a rerun skips the scored questions; the failed one is re-asked but every request is in the cache
    server.reset_log()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(server.requests) == 0
    assert "7 already in" in res.output
    assert len(out.read_text().splitlines()) == 8

    # starting from scratch with the same cache also costs nothing and gives the same records
    out.unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and len(server.requests) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs

    summary_path = tmp_path / "summary.json"
    res = CliRunner().invoke(app, ["chat-summary", str(out), "--out", str(summary_path)])
    assert res.exit_code == 0, res.output
    summary = json.loads(summary_path.read_text())
    assert list(summary) == list(GROUPS)
    assert summary["overall"]["count"] == 7 and summary["overall"]["failed"] == 1
    # 6 questions at 8/6, one at 7/5
    assert summary["overall"]["relative_score"] == pytest.approx((6 * 6 / 8 + 5 / 7) / 7 * 100)
    assert summary["overall"]["reference_mean"] == pytest.approx((6 * 8 + 7) / 7)
    assert "detailed_description" in res.output and "histology" in res.output
    assert f"{summary['overall']['relative_score']:.1f}" in res.output


def test_swap_averages_both_orders(tmp_path, shared_dir, openai_server_factory):  # noqa: F811
    qpath = tmp_path / "q.jsonl"
    lines = (shared_dir / "formats/qa50_sample.jsonl").read_text().splitlines()
    qpath.write_text("\n".join(lines[3:6]) + "\n")  # three questions without scripted trouble
    questions = read_chat_questions(qpath)
    server = openai_server_factory(_respond)
    llm = LLMConfig(
        model="judge-test",
        base_url=server.base_url,
        api_key_env="",
        progress=False,
        cache_path=tmp_path / "cache.sqlite",
        backoff_base=0,
    )
    res = judge_chat(qpath, _answers(tmp_path, questions), tmp_path / "judged.jsonl", llm, swap=True)
    assert res.judged == 3 and not res.failed and len(server.requests) == 6
    for r in (json.loads(line) for line in (tmp_path / "judged.jsonl").read_text().splitlines()):
        assert r["scores"] == {"forward": [8, 6], "swapped": [5, 9]}
        assert r["reference_score"] == 8.5 and r["model_score"] == 5.5
    summary = summarize_judged(tmp_path / "judged.jsonl")
    assert summary["overall"]["relative_score"] == pytest.approx(5.5 / 8.5 * 100)


def test_missing_answers_is_an_error(tmp_path, shared_dir):
    from medvlm.errors import MedvlmError

    qpath = shared_dir / "formats/qa50_sample.jsonl"
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 0, "text": "x"}) + "\n")
    llm = LLMConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="", progress=False)
    with pytest.raises(MedvlmError, match="no answer for 7 question"):
        judge_chat(qpath, tmp_path / "a.jsonl", tmp_path / "j.jsonl", llm)
