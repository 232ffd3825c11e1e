"""The GPT-judged chat benchmark (LLaVA-Med's ``llava_med_eval_qa50_qa.jsonl``): ask an LLM to score answers.

For every question the judge sees the figure's caption and mentions, the question, the GPT-4 reference
answer as Assistant 1 and the model's answer as Assistant 2, and gives each a 1-10 score on its first
line. ``swap`` also asks with the two answers in the other order and averages, cancelling position
bias. Replies whose first line cannot be read as two scores are re-asked with a follow-up message (a
new request, so the response cache keeps both) and reported when they stay unreadable; nothing crashes.

The output JSONL is appended to as questions finish (a killed run keeps them) and compacted at the end
(one line per question, question order). A rerun skips questions already scored, and the persistent
response cache of :mod:`medvlm.llm` answers every request it has seen before, so it costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.data.readers.figures import normalize_mentions, primary_domain
from medvlm.errors import MedvlmError
from medvlm.eval.protocols import read_predictions
from medvlm.llm import LLMClient, LLMConfig
from medvlm.llm.judge import ScoreJob, ask_for_scores
from medvlm.utils.io import append_jsonl, iter_jsonl, write_jsonl_atomic

SYSTEM_PROMPT = (
    "You review answers to questions about figures from biomedical papers. You cannot see the figure; "
    "its caption and the sentences of the paper that mention it tell you what it shows. Judge fairly "
    "and precisely."
)

INSTRUCTION = (
    "Rate how helpful, relevant, accurate and detailed each assistant's answer is, taking the context "
    "above as the truth about the figure. Give each assistant one overall score from 1 to 10, where a "
    "higher score means a better answer. Write the two scores on the first line and nothing else: the "
    "score of Assistant 1, a space, the score of Assistant 2 (for example: 7 9). From the second line on, "
    "explain your scores. Do not let the order of the answers or their length sway you."
)


@dataclass
class ChatQuestion:
    """One question of the chat benchmark."""

    question_id: Any
    question: str
    """The question text without the ``<image>`` placeholder."""
    reference: str
    """The GPT-4 reference answer (``gpt4_answer``)."""
    caption: str
    fig_label: str
    mentions: list[str]
    type: str
    """``conversation`` or ``detailed_description``."""
    domain: str | None
    """Primary domain (chest_xray > mri > histology > gross > ct_scan; first true wins), None if none."""
    domains: dict[str, bool] = field(default_factory=dict)


def read_chat_questions(path: str | os.PathLike) -> list[ChatQuestion]:
    """Read ``llava_med_eval_qa50_qa.jsonl``; errors name the line and field."""
    out: list[ChatQuestion] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise MedvlmError(f"{where}: expected an object")
        for key in ("question_id", "text", "gpt4_answer", "type"):
            if key not in rec or (key != "question_id" and not isinstance(rec[key], str)):
                raise MedvlmError(f"{where}: field {key!r} missing or not a string")
        if str(rec["question_id"]) in seen:
            raise MedvlmError(f"{where}: duplicate question_id {rec['question_id']!r}")
        seen.add(str(rec["question_id"]))
        domains = rec.get("domain") or {}
        if not isinstance(domains, dict):
            raise MedvlmError(f"{where}: field 'domain' must be an object of booleans")
        flags = {k: bool(v) for k, v in domains.items()}
        out.append(
            ChatQuestion(
                question_id=rec["question_id"],
                question=rec["text"].replace("<image>", "").strip(),
                reference=rec["gpt4_answer"],
                caption=str(rec.get("fig_caption") or ""),
                fig_label=str(rec.get("fig_label") or ""),
                mentions=normalize_mentions(rec.get("in_text_mention"), f"{where}: "),
                type=rec["type"],
                domain=primary_domain(flags),
                domains=flags,
            )
        )
    return out


def read_chat_answers(path: str | os.PathLike) -> dict[str, str]:
    """Model answers JSONL (``question_id``, ``text``) -> ``{str(question_id): text}`` (same checks as scoring)."""
    return {key: text for key, (_, text) in read_predictions(path).items()}


def judge_messages(q: ChatQuestion, answer_1: str, answer_2: str) -> list[dict]:
    """The chat messages asking the judge to score Assistant 1 and Assistant 2 for question ``q``."""
    label = f" ({q.fig_label})" if q.fig_label else ""
    mentions = "\n".join(f"- {m}" for m in q.mentions) if q.mentions else "(none)"
    user = (
        f"[Context]\nFigure caption{label}: {q.caption}\nSentences of the paper mentioning the figure:\n"
        f"{mentions}\n\n[Question]\n{q.question}\n\n"
        f"[Assistant 1]\n{answer_1}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer_2}\n[End of Assistant 2]\n\n[Instruction]\n{INSTRUCTION}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


@dataclass
class ChatJudgeResult:
    """What a ``judge_chat`` run did."""

    judged: int = 0
    """Questions scored in this run."""
    resumed: int = 0
    """Questions already scored in the output file (skipped)."""
    failed: list[str] = field(default_factory=list)
    """``"question_id: reason"`` for questions left without scores (request errors, unreadable replies)."""
    parse_retries: int = 0
    """Follow-up requests sent because a reply's scores could not be read."""
    usage: str = ""
    """The LLM client's request/token/cost summary."""


def _record(q: ChatQuestion, answer: str, dirs: dict[str, ScoreJob], judge_model: str, swap: bool) -> dict:
    """The output line of one question from its ``forward`` (and ``swapped``) judge jobs."""
    rec: dict[str, Any] = {
        "question_id": q.question_id,
        "type": q.type,
        "domain": q.domain,
        "domains": q.domains,
        "question": q.question,
        "answer": answer,
        "judge_model": judge_model,
        "swap": swap,
        "reviews": {name: d.reply for name, d in dirs.items()},
        "scores": {name: list(d.scores) if d.scores else None for name, d in dirs.items()},
        "reference_score": None,
        "model_score": None,
        "error": None,
    }
    errors = [f"{name}: {d.error}" for name, d in dirs.items() if d.error]
    if errors:
        rec["error"] = "; ".join(errors)
        return rec
    fwd = dirs["forward"].scores
    ref, mod = [fwd[0]], [fwd[1]]
    if "swapped" in dirs:
        sw = dirs["swapped"].scores
        ref.append(sw[1])
        mod.append(sw[0])
    rec["reference_score"] = sum(ref) / len(ref)
    rec["model_score"] = sum(mod) / len(mod)
    return rec


def load_judged(path: str | os.PathLike) -> dict[str, dict]:
    """Records of a judged JSONL by ``str(question_id)``: the last scored one wins over failed ones.

    A torn last line (a killed run) is ignored.
    """
    out: dict[str, dict] = {}
    if not Path(path).exists():
        return out
    for _, rec in iter_jsonl(path, skip_bad=True, bad=[]):
        if not isinstance(rec, dict) or "question_id" not in rec:
            continue
        key = str(rec["question_id"])
        if rec.get("error") is None or key not in out or out[key].get("error") is not None:
            out[key] = rec
    return out


def judge_chat(
    questions_path: str | os.PathLike,
    answers_path: str | os.PathLike,
    out_path: str | os.PathLike,
    llm: LLMConfig,
    *,
    swap: bool = False,
    parse_retries: int = 2,
    client: LLMClient | None = None,
) -> ChatJudgeResult:
    """Score every answered question with the LLM judge; appends to and then compacts ``out_path``."""
    if parse_retries < 0:
        raise MedvlmError(f"parse_retries must be >= 0, got {parse_retries}")
    questions = read_chat_questions(questions_path)
    answers = read_chat_answers(answers_path)
    qkeys = {str(q.question_id) for q in questions}
    missing = [str(q.question_id) for q in questions if str(q.question_id) not in answers]
    extra = [k for k in answers if k not in qkeys]
    if missing:
        raise MedvlmError(f"{answers_path}: no answer for {len(missing)} question(s), e.g. {', '.join(missing[:5])}")
    if extra:
        raise MedvlmError(
            f"{answers_path}: {len(extra)} answer(s) for unknown question_id, e.g. {', '.join(extra[:5])}"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_judged(out_path)
    result = ChatJudgeResult()
    todo = [q for q in questions if str(q.question_id) not in done or done[str(q.question_id)].get("error") is not None]
    result.resumed = len(questions) - len(todo)
    by_id = {str(q.question_id): q for q in todo}
    # one job per question and answer order: ``forward`` (reference = Assistant 1), ``swapped`` (model answer first)
    dirs: dict[str, dict[str, ScoreJob]] = {}
    for q in todo:
        key, ans = str(q.question_id), answers[str(q.question_id)]
        dirs[key] = {"forward": ScoreJob(judge_messages(q, q.reference, ans), tag=key)}
        if swap:
            dirs[key]["swapped"] = ScoreJob(judge_messages(q, ans, q.reference), tag=key)
    own_client = client is None
    client = client or LLMClient(llm)
    try:

        def on_done(job: ScoreJob) -> None:  # a question is written once all its orders are done
            qd = dirs[job.tag]
            if not all(x.done for x in qd.values()):
                return
            q = by_id[job.tag]
            rec = _record(q, answers[job.tag], qd, client.config.model, swap)
            append_jsonl(out_path, rec)
            done[job.tag] = rec
            if rec["error"]:
                result.failed.append(f"{q.question_id}: {rec['error']}")
            else:
                result.judged += 1

        result.parse_retries = ask_for_scores(
            client, [d for qd in dirs.values() for d in qd.values()], parse_retries, on_done=on_done
        )
        result.usage = client.usage.summary(client.config)
    finally:
        # compact: one line per question in question order (the appended lines are the crash-safe copy)
        order = [str(q.question_id) for q in questions]
        write_jsonl_atomic(out_path, [done[k] for k in order if k in done])
        if own_client:
            client.close()
    return result
