"""The inference engine: the one generation path of eval, prefs, chat and serving.

Prompts are encoded by the processor with the generation prompt and decoded by a
:class:`~medvlm.infer.batching.ContinuousBatcher`: questions that share an image prefix (system
prompt + image tokens) prefill it once and reuse its KV cache, rows join and leave the running batch
at every decoding step, and each row stops on EOS, on the template's stop token sequences or stop
strings (cut from the answer), or at its token limit. Greedy when ``temperature == 0``, so batched
answers equal one-at-a-time answers. The engine owns one bounded :class:`~medvlm.infer.kv.PrefixCache`
(later chat turns and repeated images cost only their new tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from PIL import Image

from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError
from medvlm.infer.batching import BatchRequest, BatchResult, ContinuousBatcher, PreparedPrompt
from medvlm.infer.decoding import GenerationSettings, visible_text
from medvlm.infer.family import ModelFamily, family_for
from medvlm.infer.kv import PrefixCache

__all__ = ["GenerationSettings", "InferenceEngine", "visible_text"]

DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
"""Default prefix-cache budget (1 GiB of keys/values)."""


class InferenceEngine:
    """Answer conversations with a medvlm model and its processor."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        batch_size: int = 8,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        family: ModelFamily | None = None,
    ):
        if batch_size < 1:
            raise MedvlmError(f"batch_size must be >= 1 (got {batch_size})")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        """Most rows decoded together."""
        self.family = family or family_for(model, processor)
        reuse = prefix_cache_bytes > 0 and self.family.reuses_prefixes
        self.prefix_cache: PrefixCache | None = PrefixCache(prefix_cache_bytes) if reuse else None
        """Shared prompt prefixes (None when the budget is 0 or the family prefills whole prompts)."""
        self._template_stops = self.family.stop_sequences()
        self._template_stop_strings = self.family.stop_strings()
        # The model must never emit image-layout tokens as text.
        self.suppress_ids = self.family.suppress_ids()

    # -- building blocks (the serving batcher and preference generation reuse them) -------------------
    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """The strings that end an answer: the template's stops, then the request's own."""
        return self._template_stop_strings + [s for s in settings.stop if s]

    def stop_sequences(self, settings: GenerationSettings) -> list[list[int]]:
        """Token-id sequences that end an answer (EOS and template stops, then the request's stop strings)."""
        tok = self.processor.tokenizer
        extra = [tok.encode(s, add_special_tokens=False) for s in settings.stop if s]
        return [s for s in self._template_stops + extra if s]

    @staticmethod
    def prompt_sample(sample: Sample) -> Sample:
        """The sample without trailing assistant turns: the answer to generate replies to the last question."""
        messages = list(sample.messages)
        while messages and messages[-1].role == "assistant":
            messages.pop()
        if not messages:
            raise MedvlmError(f"sample {sample.id!r}: no user turn to answer")
        kept = sum(m.num_images for m in messages)
        return Sample(id=sample.id, messages=messages, images=list(sample.images[:kept]), meta=sample.meta)

    def prepare(
        self, sample: Sample, images: list[Image.Image] | None = None, image_folder: str | os.PathLike | None = None
    ) -> PreparedPrompt:
        """Encode a conversation (answering its last question) for the batcher."""
        if images is not None and len(images) != sample.num_image_parts:
            raise MedvlmError(
                f"sample {sample.id!r}: the conversation has {sample.num_image_parts} image part(s) but "
                f"{len(images)} image(s) were given"
            )
        prompt = self.prompt_sample(sample)
        if images is not None:
            images = images[: prompt.num_image_parts]
        feats = self.processor.encode(prompt, image_folder=image_folder, add_generation_prompt=True, images=images)
        return self.family.prompt(feats)

    def batcher(self, max_batch: int | None = None, remember_answers: bool = False) -> ContinuousBatcher:
        """A continuous batcher over this engine (the server steps one in its model thread)."""
        self.model.eval()
        return ContinuousBatcher(self, max_batch or self.batch_size, remember_answers=remember_answers)

    # -- answering ----------------------------------------------------------------------------------
    def generate(
        self,
        samples: list[Sample],
        settings: GenerationSettings | None = None,
        image_folder: str | os.PathLike | None = None,
        images: list[list[Image.Image]] | None = None,
    ) -> list[str]:
        """One answer per sample (to its last non-assistant turn), in order; up to ``batch_size`` rows at once.

        ``images[i]`` (already-loaded PIL images) replaces reading ``samples[i].images`` from disk.
        Samples sharing an image prefix are admitted together so it is prefilled once. With sampling,
        answer ``i`` draws from its own generator seeded from ``(settings.seed, i)``.
        """
        settings = (settings or GenerationSettings()).validate()
        if images is not None and len(images) != len(samples):
            raise MedvlmError(f"got {len(images)} image lists for {len(samples)} samples")
        prompts = [
            self.prepare(s, images[i] if images is not None else None, image_folder) for i, s in enumerate(samples)
        ]
        # Same image prefix -> adjacent (first-appearance order of each prefix), so a group is admitted together.
        first: dict[tuple, int] = {}
        for i, p in enumerate(prompts):
            first.setdefault((tuple(p.input_ids[: p.split].tolist()), p.digests), i)
        order = sorted(
            range(len(prompts)),
            key=lambda i: (first[(tuple(prompts[i].input_ids[: prompts[i].split].tolist()), prompts[i].digests)], i),
        )
        results: list[BatchResult | None] = [None] * len(samples)
        was_training = self.model.training
        batcher = self.batcher()
        try:
            for i in order:
                seed = None if settings.seed is None else (settings.seed * 1_000_003 + i) % (1 << 63)

                def done(res: BatchResult, i: int = i) -> None:
                    results[i] = res

                batcher.add(BatchRequest(prompt=prompts[i], settings=settings, seed=seed, on_done=done))
            batcher.run()
        finally:
            self.model.train(was_training)
        return [r.text for r in results]  # type: ignore[union-attr]

    def stream(
        self,
        sample: Sample,
        settings: GenerationSettings | None = None,
        image_folder: str | os.PathLike | None = None,
        images: list[Image.Image] | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text deltas while it is generated; their concatenation equals ``generate``'s answer.

        Decoding runs in the consumer's thread, one step per ``next``; closing the iterator early stops it.
        The finished conversation is kept in the prefix cache, so a next chat turn reuses it.
        """
        settings = (settings or GenerationSettings()).validate()
        prompt = self.prepare(sample, images, image_folder)
        deltas: list[str] = []
        req = BatchRequest(prompt=prompt, settings=settings, on_delta=deltas.append)
        batcher = self.batcher(max_batch=1, remember_answers=True)
        batcher.add(req)
        try:
            while not batcher.idle:
                batcher.step()
                while deltas:
                    yield deltas.pop(0)
        finally:
            req.cancel()
