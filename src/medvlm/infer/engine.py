"""Batched generation with a medvlm model: the one inference path of eval, chat and serving.

Prompts are encoded by the processor with the generation prompt, left-padded and run through
``model.generate`` (KV cache). Generation stops per row on EOS or on the template's stop token
sequences (and any user stop strings); the stop text is cut from the answer. Greedy when
``temperature == 0``, so batched answers equal one-at-a-time answers.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from medvlm.data.collate import VLMCollator
from medvlm.data.schema import Sample
from medvlm.data.templates import stop_token_id_sequences
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
    """Seed for sampling (None = not reseeded)."""
    stop: tuple[str, ...] = ()
    """Extra stop strings, on top of EOS and the chat template's own stops."""
    repetition_penalty: float = 1.0
    """HF repetition penalty (1.0 = off)."""

    def validate(self) -> "GenerationSettings":
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


class StopOnTokenSequences(StoppingCriteria):
    """Per row: stop once the generated tokens end with one of the given token-id sequences."""

    def __init__(self, sequences: list[list[int]], prompt_length: int):
        self.sequences = [list(s) for s in sequences if s]  # an empty sequence would stop everything
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]  # [B, n_new]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for seq in self.sequences:
            n = len(seq)
            if generated.shape[1] < n:
                continue
            target = torch.tensor(seq, dtype=input_ids.dtype, device=input_ids.device)
            done |= (generated[:, -n:] == target).all(dim=1)
        return done


class _StopOnEvent(StoppingCriteria):
    """Stops all rows when the event is set (the stream's consumer went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueStreamer(BaseStreamer):
    """Receives new token ids from ``generate`` (the prompt is skipped) and hands them to a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def visible_text(raw: str, stops: list[str], final: bool) -> str:
    """The part of decoded text that is answer: cut at the first stop string, outer whitespace stripped.

    While streaming (``final`` False) a tail that could still become a stop string, trailing
    whitespace and an incomplete multi-byte character are held back, so the streamed text always
    extends to exactly the final answer.
    """
    cut = min((i for i in (raw.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        raw, final = raw[:cut], True
    text = raw.lstrip()
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


class InferenceEngine:
    """Answer conversations with a medvlm model and its processor."""

    def __init__(self, model: Any, processor: Any, batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        tok = processor.tokenizer
        self._template_stops = stop_token_id_sequences(tok, processor.chat_template)
        self._template_stop_strings = [s for s in processor.chat_template.stop_strings if s]
        # The model must never emit image-layout tokens as text.
        self._suppress = [i for i in (processor.image_token_id, processor.im_start_token_id,
                                      processor.im_end_token_id) if i is not None]

    # -- building blocks (public: the serving batcher and preference generation reuse them) --------------
    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """The strings that end an answer: the template's stops, then the request's own."""
        return self._template_stop_strings + [s for s in settings.stop if s]

    def _stop_sequences(self, settings: GenerationSettings) -> list[list[int]]:
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

    def _encode_batch(self, samples: list[Sample], image_folder, images) -> dict[str, torch.Tensor]:
        feats = []
        for i, s in enumerate(samples):
            prompt = self.prompt_sample(s)
            imgs = None
            if images is not None:
                imgs = images[i][: prompt.num_image_parts]
            feats.append(self.processor.encode(prompt, image_folder=image_folder, add_generation_prompt=True,
                                               images=imgs))
        collate = VLMCollator(pad_token_id=self.processor.pad_token_id, padding_side="left")
        # input_ids / attention_mask [B, T] (left padded: prompts end at the same column), pixel_values [n_img, 3, H, W]
        return collate([{"input_ids": f["input_ids"], "pixel_values": f["pixel_values"]} for f in feats])

    def _generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        tok = self.processor.tokenizer
        sample = settings.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            pad_token_id=self.processor.pad_token_id,
            eos_token_id=tok.eos_token_id,
            repetition_penalty=settings.repetition_penalty,
            suppress_tokens=self._suppress or None,
        )
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        return GenerationConfig(**kwargs)

    def run_batch(self, batch: dict[str, torch.Tensor], settings: GenerationSettings, extra_criteria=(),
                  streamer=None) -> torch.Tensor:
        """Generate for an encoded, left-padded batch; returns only the new token ids ``[B, n_new]``.

        Used by :meth:`generate`, :meth:`stream` and the serving batcher, which adds its own stopping
        criteria (per-row stops) and streamer.
        """
        device = self.model.device
        batch = {k: v.to(device) for k, v in batch.items()}
        prompt_len = batch["input_ids"].shape[1]
        criteria = StoppingCriteriaList([StopOnTokenSequences(self._stop_sequences(settings), prompt_len),
                                         *extra_criteria])
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            out = self.model.generate(**batch, generation_config=self._generation_config(settings),
                                      stopping_criteria=criteria, streamer=streamer)
        return out[:, prompt_len:]  # [B, n_new]

    def _answer(self, new_ids: list[int], settings: GenerationSettings) -> str:
        eos = self.processor.tokenizer.eos_token_id
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
        return visible_text(self.processor.decode(new_ids), self.stop_strings(settings), final=True)

    # -- answering ----------------------------------------------------------------------------------
    def generate(
        self,
        samples: list[Sample],
        settings: GenerationSettings | None = None,
        image_folder: str | os.PathLike | None = None,
        images: list[list[Image.Image]] | None = None,
    ) -> list[str]:
        """One answer per sample (to its last non-assistant turn), in order; batched by ``batch_size``.

        ``images[i]`` (already-loaded PIL images) replaces reading ``samples[i].images`` from disk.
        """
        settings = (settings or GenerationSettings()).validate()
        if images is not None and len(images) != len(samples):
            raise MedvlmError(f"got {len(images)} image lists for {len(samples)} samples")
        answers: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start : start + self.batch_size]
                chunk_images = images[start : start + self.batch_size] if images is not None else None
                new = self.run_batch(self._encode_batch(chunk, image_folder, chunk_images), settings)
                answers.extend(self._answer(row.tolist(), settings) for row in new)
        finally:
            self.model.train(was_training)
        return answers

    def stream(
        self,
        sample: Sample,
        settings: GenerationSettings | None = None,
        image_folder: str | os.PathLike | None = None,
        images: list[Image.Image] | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text deltas while it is generated; their concatenation equals ``generate``'s answer.

        Closing the iterator early stops generation.
        """
        settings = (settings or GenerationSettings()).validate()
        batch = self._encode_batch([sample], image_folder, [images] if images is not None else None)
        streamer, stop_event = _QueueStreamer(), threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.run_batch(batch, settings, extra_criteria=(_StopOnEvent(stop_event),), streamer=streamer)
            except BaseException as e:  # re-raised in the consumer thread below
                errors.append(e)
                streamer.end()

        self.model.eval()
        thread = threading.Thread(target=work, name="medvlm-generate", daemon=True)
        thread.start()
        eos = self.processor.tokenizer.eos_token_id
        stops = self.stop_strings(settings)
        ids: list[int] = []
        emitted = ""
        try:
            while True:
                chunk = streamer.queue.get()
                if chunk is None:
                    break
                if eos in chunk:
                    ids.extend(chunk[: chunk.index(eos)])
                    stop_event.set()
                    break
                ids.extend(chunk)
                text = visible_text(self.processor.decode(ids), stops, final=False)
                if text.startswith(emitted) and len(text) > len(emitted):
                    yield text[len(emitted) :]
                    emitted = text
            if errors:
                raise errors[0]
            final = visible_text(self.processor.decode(ids), stops, final=True)
            if final.startswith(emitted) and len(final) > len(emitted):
                yield final[len(emitted) :]
        finally:
            stop_event.set()
            thread.join()
