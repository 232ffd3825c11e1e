"""Asking an LLM judge for two scores, re-asking replies whose scores cannot be read.

Shared by the chat-benchmark judge (:mod:`medvlm.eval.judge`) and the STLLaVA-Med preference judge
(:mod:`medvlm.infer.prefs`): both ask for "the score of Assistant 1, a space, the score of Assistant 2" on the
first line (read by :func:`medvlm.llm.scores.parse_scores`). A reply without readable scores gets a follow-up
message in the same conversation — a new request, so the response cache keeps both replies — up to
``parse_retries`` times; then the job carries an error. Nothing raises for a bad reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medvlm.llm.client import LLMClient, LLMRequest, LLMResult
from medvlm.llm.scores import parse_scores

RETRY_PROMPT = (
    "Your reply did not begin with the two scores. Reply again: the first line must hold only the score of "
    "Assistant 1 and the score of Assistant 2, numbers from 1 to 10 separated by a space; then give your reasons."
)


@dataclass
class ScoreJob:
    """One request for two scores through its re-asks: ``scores`` and ``reply``, or ``error``, once done."""

    messages: list[dict]
    """The conversation sent; each re-ask appends the unreadable reply and :data:`RETRY_PROMPT`."""
    tag: Any = None
    """The caller's identity for the job (a question and an answer order, an image and a question ...)."""
    tries: int = 0
    """Re-asks sent so far."""
    scores: tuple[float, float] | None = None
    reply: str | None = None
    """The last reply (the judge's reasons follow its score line)."""
    error: str | None = None
    """Why the job ended without scores (a request error, or replies still unreadable after every re-ask)."""

    @property
    def done(self) -> bool:
        """True once the job has scores or an error."""
        return self.scores is not None or self.error is not None


def ask_for_scores(
    client: LLMClient,
    jobs: list[ScoreJob],
    parse_retries: int,
    *,
    on_done: Callable[[ScoreJob], None] | None = None,
    desc: str = "judging",
) -> int:
    """Send every job, re-asking unreadable replies up to ``parse_retries`` times; returns the re-asks sent.

    ``on_done(job)`` is called as each job finishes (in the calling thread), so a caller can write
    its results as they come.
    """
    retries = 0
    pending = list(jobs)
    again: list[ScoreJob] = []  # the jobs of the next round, filled by on_result

    def on_result(res: LLMResult) -> None:
        job: ScoreJob = res.tag
        if not res.ok:
            job.error = res.error
        else:
            job.reply, job.scores = res.text, parse_scores(res.text or "")
            if job.scores is None and job.tries < parse_retries:
                job.tries += 1
                job.messages = job.messages + [
                    {"role": "assistant", "content": res.text},
                    {"role": "user", "content": RETRY_PROMPT},
                ]
                again.append(job)
                return
            if job.scores is None:
                job.error = f"unreadable judge scores after {job.tries + 1} replies: {(res.text or '')[:80]!r}"
        if on_done is not None:
            on_done(job)

    while pending:
        client.complete_many(
            [LLMRequest(messages=j.messages, tag=j) for j in pending],
            on_result=on_result,
            keep_results=False,
            desc=desc,
        )
        retries += len(again)
        pending = list(again)
        again.clear()
    return retries
