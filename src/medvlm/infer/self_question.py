"""Test-time self-questioning (STLLaVA-Med's optional inference mode).

Before answering a question about an image, the model describes the image, then asks (at a VUSER
turn) and answers ``k`` questions of its own; the real question is then asked as a USER turn with
that dialogue as context (native ``v1_sq`` models and model families that ask questions, see
:func:`medvlm.infer.prefs.require_questions`). All auxiliary turns are greedy, so the result is
deterministic; the final answer uses the caller's settings. :class:`SelfQuestioningAnswerer` has the
engine's ``generate`` signature, so evaluation code can use it in place of an
:class:`~medvlm.infer.engine.InferenceEngine`.
"""

from __future__ import annotations

import os
from typing import Any

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.prefs import DESCRIBE_PROMPT, SelfQuestioningEngine, require_questions


class SelfQuestioningAnswerer:
    """Answers each question after a self-asked dialogue of ``k`` questions about its image."""

    def __init__(self, engine: InferenceEngine, k: int, describe_prompt: str = DESCRIBE_PROMPT, aux_tokens: int = 128):
        if k < 0:
            raise MedvlmError(f"self_question must be >= 0, got {k}")
        require_questions(engine.processor, f"--self-question {k}")
        self.engine = SelfQuestioningEngine(engine.model, engine.processor, batch_size=engine.batch_size)
        self.k = k
        self.describe_prompt = describe_prompt
        self.aux = GenerationSettings(max_new_tokens=aux_tokens)
        self.dialogues: list[list[Message]] = []
        """The self-asked dialogue (without the real question) of each sample of the last call."""

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def processor(self) -> Any:
        return self.engine.processor

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def generate(
        self,
        samples: list[Sample],
        settings: GenerationSettings | None = None,
        image_folder: str | os.PathLike | None = None,
        images: list | None = None,
    ) -> list[str]:
        """One answer per sample (single-image questions), after the self-questioning dialogue."""
        questions: list[str] = []
        for s in samples:
            users = [m for m in s.messages if m.role == "user"]
            if len(s.images) != 1 or not users:
                raise MedvlmError(
                    f"sample {s.id!r}: self-questioning answers single-image questions (got {len(s.images)} image(s))"
                )
            questions.append(users[-1].text.strip())
        dialogues = [[Message("user", [image_part(), text_part(self.describe_prompt)])] for _ in samples]

        def ask() -> list[str]:
            convs = [Sample(s.id, d, list(s.images[:1]), s.meta) for s, d in zip(samples, dialogues)]
            return self.engine.generate(
                convs,
                self.aux,
                image_folder=image_folder,
                images=[im[:1] for im in images] if images is not None else None,
            )

        for d, text in zip(dialogues, ask()):
            d.append(Message("assistant", [text_part(text)]))
        for _ in range(self.k):
            for d, q in zip(dialogues, ask()):  # the conversation ends with an answer: the model asks (VUSER)
                d.append(Message("vuser", [text_part(q)]))
            for d, a in zip(dialogues, ask()):
                d.append(Message("assistant", [text_part(a)]))
        self.dialogues = [list(d) for d in dialogues]
        final = [
            Sample(s.id, d + [Message("user", [text_part(q)])], list(s.images[:1]), s.meta)
            for s, d, q in zip(samples, dialogues, questions)
        ]
        return self.engine.generate(
            final, settings, image_folder=image_folder, images=[im[:1] for im in images] if images is not None else None
        )
