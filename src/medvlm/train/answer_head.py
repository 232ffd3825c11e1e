"""Stage ``vision``'s parts: the training answers as classes, and the light classifier that reads them from the tower.

A random vision tower trained only through a random LM (``align``/``sft``) learns what a mean over its tokens shows
(the modality) and little of what needs a selective look (how many lesions, on which side). Here the tower learns
first through a short path: a question-conditioned attention pool over its tokens and a small MLP that picks the
answer among the answers the training file holds, as medical VQA classifiers do (VQA-RAD / SLAKE baselines). The
classifier is thrown away; only the tower is kept (:mod:`medvlm.train.recipes.vision`).

Measured on ``medvlm data synth`` (seed 0, 400 train images; benchmarks/README.md): the documented CLI sequence went
from 66.5 closed / 76.0 open to 81.0 / 90.0. A tower trained the same way on the generator's true factor labels
instead (an upper bound no user has) reached 77.0 / 89.0: the answers carry what the tower needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medvlm.data.benchmarks.group import answer_key
from medvlm.data.readers import read_samples
from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError

MIN_SHARED_FRACTION = 0.5
"""At least this share of the questions must have an answer that another question also has: answers as classes
need repeated answers (VQA-style files), which captions and long conversations do not have."""


@dataclass
class QuestionSet:
    """The (image, question, answer) triples of the training files, grouped by image."""

    images: list[str] = field(default_factory=list)
    """Image paths as the records name them (relative to ``image_folder`` unless absolute), one entry per image."""
    questions: list[list[str]] = field(default_factory=list)
    """Per image: its question texts (the user turns without the image placeholder)."""
    answers: list[list[int]] = field(default_factory=list)
    """Per image: the class index of each question's answer."""
    classes: list[str] = field(default_factory=list)
    """Answer classes (:func:`medvlm.data.benchmarks.group.answer_key`, as the yes/no grouping compares answers), most
    frequent first."""
    class_counts: list[int] = field(default_factory=list)
    """Questions per class, aligned with :attr:`classes`."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Records left out and why (``no_image``, ``several_images``)."""

    @property
    def n_questions(self) -> int:
        return sum(len(q) for q in self.questions)


def question_pairs(sample: Sample) -> list[tuple[str, str]]:
    """Each user turn followed by an assistant turn, as ``(question, answer)`` texts (image parts dropped)."""
    pairs = []
    msgs = [m for m in sample.messages if m.role != "system"]
    for user, reply in zip(msgs, msgs[1:]):
        if user.role == "user" and reply.role == "assistant":
            pairs.append((user.text.strip(), reply.text))
    return pairs


def read_question_set(paths: list[str], data_format: str = "auto") -> QuestionSet:
    """Index the questions of single-image records of ``paths``; a MedvlmError when the answers do not repeat."""
    by_image: dict[str, list[tuple[str, str]]] = {}
    skipped: Counter[str] = Counter()
    for path in paths:
        if not Path(path).is_file():
            raise MedvlmError(f"data_path {path}: file not found")
        for sample in read_samples(path, data_format):
            if not sample.images:
                skipped["no_image"] += 1
                continue
            if len(sample.images) > 1:
                skipped["several_images"] += 1
                continue
            by_image.setdefault(sample.images[0], []).extend(question_pairs(sample))
    counts = Counter(answer_key(a) for pairs in by_image.values() for _, a in pairs)
    total = sum(counts.values())
    where = ", ".join(paths)
    if total == 0:
        raise MedvlmError(f"stage vision: {where} holds no question about a single image (skipped: {dict(skipped)})")
    shared = sum(n for n in counts.values() if n > 1)
    if len(counts) < 2 or shared < MIN_SHARED_FRACTION * total:
        raise MedvlmError(
            f"stage vision learns the answers as classes, but in {where} only {shared} of {total} answers occur more "
            f"than once ({len(counts)} distinct): captions or free-text answers cannot be classes. Run stage vision "
            "on a VQA file with short answers (yes / no, a word or two), or skip it"
        )
    classes = [a for a, _ in counts.most_common()]
    index = {a: i for i, a in enumerate(classes)}
    out = QuestionSet(classes=classes, class_counts=[counts[a] for a in classes], skipped=dict(skipped))
    for image, pairs in by_image.items():
        if pairs:
            out.images.append(image)
            out.questions.append([q for q, _ in pairs])
            out.answers.append([index[answer_key(a)] for _, a in pairs])
    return out


class AnswerHead(nn.Module):
    """Question-conditioned attention pooling over image tokens, then an MLP over the answer classes.

    The question is a mean of learned token embeddings (word order is not needed to pick which factor to look at);
    it sets ``heads`` queries over the tower's tokens, and the pooled tokens with the question vector give the logits.
    Only pooling, as the LM's attention reads the tokens: given the tokens' layout side by side as well, the
    classifier counted from *where* the tokens differ (its own open count 39 -> 88 % on ``medvlm data synth``), the
    tower learned less of what attention can read, and the whole sequence fell from 81.0 / 90.0 to 74.5 / 79.0.
    """

    def __init__(self, vocab_size: int, vision_width: int, n_classes: int, heads: int = 4, width: int = 64):
        super().__init__()
        self.heads, self.vision_width = heads, vision_width
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.query = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, heads * vision_width))
        self.out = nn.Sequential(
            nn.Linear(heads * vision_width + width, 4 * width), nn.GELU(), nn.Linear(4 * width, n_classes)
        )

    def forward(
        self, tokens: torch.Tensor, token_ids: torch.Tensor, offsets: torch.Tensor, image_of: torch.Tensor
    ) -> torch.Tensor:
        """``tokens`` ``[n_img, T, D]``; questions as flat ``token_ids`` with ``offsets`` ``[n_q]`` and ``image_of``
        ``[n_q]`` (which image each asks about) -> logits ``[n_q, n_classes]``."""
        question = self.embed(token_ids, offsets)  # [n_q, W]
        q = self.query(question).view(-1, self.heads, self.vision_width)  # [n_q, h, D]
        seen = tokens[image_of]  # [n_q, T, D]
        weights = torch.softmax(torch.einsum("nhd,ntd->nht", q, seen) / self.vision_width**0.5, dim=-1)
        pooled = torch.einsum("nht,ntd->nhd", weights, seen).flatten(1)  # [n_q, h * D]
        return self.out(torch.cat([pooled, question], dim=1))
