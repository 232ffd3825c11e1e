"""The pixel-truth judge of ``bench_stllava_dpo.py``: a fake image-aware LLM judge that knows the synthetic images.

Served by ``tests/openai_test_server.py`` as an OpenAI-compatible chat endpoint, it reads the judge prompt
``medvlm.infer.prefs_judge`` builds (image as a data URL, the question, two answers), recognises the image by
its bytes and the question by the synthetic generator's templates, and scores both answers against the gold.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

_ANS = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]", re.S)
_Q = re.compile(r"\[Question about the image\]\n(.*?)\n\n\[Assistant 1\]", re.S)


def norm(text: str) -> str:
    """Lower case, punctuation (except the hyphen of x-ray) dropped, spaces collapsed."""
    return " ".join(re.findall(r"[a-z0-9-]+", text.lower()))


class PixelJudge:
    """A gold judge: image by content hash -> generating factors; question by template -> gold answer."""

    def __init__(self, data: Path):
        # The question templates and truth functions of the synthetic generator (this judge must agree with
        # the generator exactly, so it reuses its definitions instead of copying them).
        from medvlm.data.synth.render import Factors
        from medvlm.data.synth.text import (
            CLOSED_PREDICATES,
            OPEN_TEMPLATES,
            closed_templates,
            closed_truth,
            open_answer,
        )

        self.truth, self.answer = closed_truth, open_answer
        self.questions: dict[str, tuple[str, object, object]] = {}
        for preds in CLOSED_PREDICATES.values():
            for pred, param in preds:
                for q in closed_templates(pred, param):
                    self.questions[norm(q)] = ("closed", pred, param)
        for kind, qs in OPEN_TEMPLATES.items():
            for q in qs:
                self.questions[norm(q)] = ("open", kind, None)
        self.factors: dict[str, object] = {}
        for line in (data / "factors.jsonl").read_text().splitlines():
            row = json.loads(line)
            f = Factors(**{k: row[k] for k in ("modality", "count", "side", "size", "intensity")})
            digest = hashlib.sha256((data / "images" / row["image"]).read_bytes()).hexdigest()
            self.factors[digest] = f
        self.asked = self.recognised = 0

    def gold(self, factors, question: str) -> str | None:
        """The pixel-true answer of a question the dataset's templates can ask, else None."""
        q = self.questions.get(norm(question))
        if q is None:
            return None
        if q[0] == "closed":
            return "yes" if self.truth(q[1], q[2], factors) else "no"
        return self.answer(q[1], factors)

    @staticmethod
    def score(gold: str, answer: str) -> int:
        a = norm(answer)
        if gold in ("yes", "no"):  # closed: the first word decides
            first = a.split()[0] if a else ""
            return 9 if first == gold else (2 if first in ("yes", "no") else 1)
        return 9 if a == gold else (5 if gold in a.split() else 2)

    def __call__(self, body) -> str:
        user = next(m for m in body["messages"] if m["role"] == "user")
        url = next(p["image_url"]["url"] for p in user["content"] if p.get("type") == "image_url")
        text = "\n".join(p["text"] for p in user["content"] if p.get("type") == "text")
        factors = self.factors.get(hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest())
        question = _Q.search(text).group(1)
        answers = dict(_ANS.findall(text))
        self.asked += 1
        gold = self.gold(factors, question) if factors is not None else None
        if gold is None:
            return "5 5\nI cannot verify this question against the image."
        self.recognised += 1
        return f"{self.score(gold, answers['1'])} {self.score(gold, answers['2'])}\nThe image shows: {gold}."
