"""Per-row decoding: settings, next-token choice (greedy or sampled, each row its own RNG), answer text.

Each row of a running batch chooses its next token from its own logits with its own settings, so
requests with different temperatures, top-p/top-k, seeds and repetition penalties share one forward
pass. The logits pipeline follows transformers' order (repetition penalty, suppressed tokens,
temperature, top-k, top-p) and its definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medvlm.errors import MedvlmError


@dataclass
class GenerationSettings:
    """Decoding settings shared by eval, chat and serving."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per answer."""
    temperature: float = 0.0
    """0 = greedy (deterministic); > 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus-sampling mass (sampling only; 1.0 = off)."""
    top_k: int = 0
    """Top-k sampling cut-off (sampling only; 0 = off)."""
    seed: int | None = None
    """Seed for sampling (None = not reseeded). Each answer draws from its own generator, so a seeded
    answer does not depend on which other requests share its batch."""
    stop: tuple[str, ...] = ()
    """Extra stop strings, on top of EOS and the chat template's own stops."""
    repetition_penalty: float = 1.0
    """HF repetition penalty over prompt and answer tokens (1.0 = off)."""

    def validate(self) -> GenerationSettings:
        """Raise a MedvlmError naming the bad field."""
        if self.max_new_tokens < 1:
            raise MedvlmError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise MedvlmError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise MedvlmError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise MedvlmError(f"top_k must be >= 0 (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise MedvlmError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        return self


def visible_text(raw: str, stops: list[str], final: bool, strip_left: bool = True) -> str:
    """The part of decoded text that is answer: cut at the first stop string, outer whitespace stripped.

    While streaming (``final`` False) a tail that could still become a stop string, trailing
    whitespace and an incomplete multi-byte character are held back, so the streamed text always
    extends to exactly the final answer. ``strip_left`` False keeps leading whitespace (for a tail of
    the text, whose start is not the answer's start).
    """
    cut = min((i for i in (raw.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        raw, final = raw[:cut], True
    text = raw.lstrip() if strip_left else raw
    if final:
        return text.rstrip()
    # A trailing U+FFFD is an incomplete multi-byte character that the next token completes.
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold].rstrip()


def ends_with_any(ids: list[int], sequences: list[list[int]]) -> bool:
    """True when ``ids`` ends with one of the (non-empty) token-id ``sequences``."""
    return any(s and len(ids) >= len(s) and ids[-len(s) :] == s for s in sequences)


class TokenChooser:
    """Chooses one row's next token from its logits ``[V]`` with that row's settings."""

    def __init__(self, settings: GenerationSettings, suppress: list[int], seed: int | None):
        self.settings = settings
        self.suppress = suppress
        self.generator: torch.Generator | None = None
        if settings.temperature > 0:
            self.generator = torch.Generator()
            if seed is not None:
                self.generator.manual_seed(seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """``logits`` [V] (float32), ``seen`` [n] the prompt and answer ids so far (for the repetition penalty)."""
        s = self.settings
        scores = logits.float().clone()
        if s.repetition_penalty != 1.0 and seen.numel():
            picked = scores.gather(0, seen)
            picked = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
            scores.scatter_(0, seen, picked)
        if self.suppress:
            scores[self.suppress] = -float("inf")
        if self.generator is None:
            return int(scores.argmax())
        scores = scores / s.temperature
        if s.top_k > 0:
            k = min(s.top_k, scores.shape[0])
            kth = torch.topk(scores, k).values[-1]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - s.top_p)
            remove[-1] = False  # keep at least one token
            scores = scores.masked_fill(remove.scatter(0, order, remove), -float("inf"))
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
