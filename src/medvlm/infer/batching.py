"""Many independent requests in one ``generate`` call: per-row limits, stops, streaming and cancellation.

The serving layer batches requests that arrive at about the same time. They may differ in
``max_new_tokens``, stop strings and whether they stream; they must share the *sampling* settings
(temperature, top-p, top-k, seed, repetition penalty: one ``generate`` call has one logits pipeline and
one RNG). :func:`sampling_key` gives the key a batcher groups by.

Per row, a :class:`BatchRequest` carries its own token limit, stop strings, delta callback and a
cancel event. A streamer that sees every new column of token ids (it runs inside ``generate``, before
the stopping criteria of the same step) decodes each live row, delivers text deltas, and marks the
row finished on EOS, on a stop string, at its token limit or when cancelled; a stopping criterion then
tells ``generate`` that the row is done, so the call ends as soon as every row is finished. A row's
``on_done`` fires the moment it finishes, not when the whole batch ends.

Prompts are encoded exactly as :meth:`InferenceEngine.generate` encodes them (``processor.encode`` with
the generation prompt, left-padded by ``VLMCollator``) and decoded with the same ``visible_text``
rule, so under greedy decoding a batched answer equals the one-at-a-time answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from medvlm.data.collate import VLMCollator
from medvlm.data.schema import IMAGE_PLACEHOLDER, Sample
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine, visible_text
from medvlm.model.tokenizer import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN


@dataclass
class PreparedPrompt:
    """An encoded prompt, ready to be batched."""

    input_ids: torch.Tensor
    """LongTensor[L]: the prompt ending with the generation prompt, image tokens expanded."""
    pixel_values: torch.Tensor | None
    """FloatTensor[n_img, 3, H, W] or None for text-only prompts."""

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens (image tokens included)."""
        return int(self.input_ids.shape[0])


@dataclass
class BatchResult:
    """The outcome of one request."""

    text: str
    """The answer (stop text cut, outer whitespace stripped)."""
    finish_reason: str
    """``stop`` (EOS or a stop string), ``length`` (token limit) or ``cancelled``."""
    prompt_tokens: int
    """Prompt length in tokens."""
    completion_tokens: int
    """Tokens generated for this row (up to and including its stop)."""


@dataclass
class BatchRequest:
    """One request inside a batch."""

    prompt: PreparedPrompt
    """The encoded prompt."""
    max_new_tokens: int = 64
    """This row's token limit."""
    stop: tuple[str, ...] = ()
    """This row's extra stop strings (the template's stops always apply)."""
    on_delta: Callable[[str], None] | None = None
    """Called with each new piece of answer text (from the generating thread)."""
    on_done: Callable[[BatchResult], None] | None = None
    """Called once with the result when this row finishes (from the generating thread)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set it to stop this row (e.g. the client disconnected); the rest of the batch goes on."""


def sampling_key(settings: GenerationSettings) -> tuple:
    """Requests whose settings give equal keys can share one ``generate`` call.

    Greedy decoding ignores temperature/top-p/top-k/seed, so all greedy requests share a key.
    """
    if settings.temperature == 0:
        return ("greedy", settings.repetition_penalty)
    return ("sample", settings.temperature, settings.top_p, settings.top_k, settings.seed, settings.repetition_penalty)


def prepare_sample(engine: InferenceEngine, sample: Sample, images: list[Image.Image] | None = None,
                   image_folder: str | None = None) -> PreparedPrompt:
    """Encode a conversation (ending with a user turn) as :meth:`InferenceEngine.generate` does."""
    prompt = engine.prompt_sample(sample)
    feats = engine.processor.encode(prompt, image_folder=image_folder, add_generation_prompt=True, images=images)
    return PreparedPrompt(input_ids=feats["input_ids"], pixel_values=feats["pixel_values"])


def prepare_text(engine: InferenceEngine, prompt: str, images: list[Image.Image]) -> PreparedPrompt:
    """Encode an already rendered prompt string whose ``<image>`` placeholders mark the images (LLaVA workers).

    Each placeholder is expanded to the model's image token layout and the string is tokenised once
    without added special tokens (templates write BOS themselves), as ``encode_conversation`` does.
    """
    proc = engine.processor
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n != len(images):
        raise MedvlmError(f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were given")
    for tok in (IM_START_TOKEN, IM_END_TOKEN):
        if tok in prompt:
            raise MedvlmError(f"the prompt contains {tok!r}; mark images with {IMAGE_PLACEHOLDER} only")
    layout = IMAGE_TOKEN * proc.image_seq_length
    if proc.mm_use_im_start_end:
        layout = IM_START_TOKEN + layout + IM_END_TOKEN
    text = prompt.replace(IMAGE_PLACEHOLDER, layout)  # IMAGE_PLACEHOLDER is the image token text itself
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MedvlmError("the prompt is empty")
    if sum(1 for t in ids if t == proc.image_token_id) != n * proc.image_seq_length:
        raise MedvlmError("the prompt's image placeholders did not tokenise as image tokens")
    pixels = proc.preprocess_images(images) if images else None  # [n_img, 3, H, W]
    return PreparedPrompt(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=pixels)


class _RowState:
    """Decoding state of one row."""

    def __init__(self, req: BatchRequest, stops: list[str], eos: int | None):
        self.req = req
        self.stops = stops
        self.eos = eos
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False


class _BatchStreamer(BaseStreamer):
    """Sees each new column of tokens [B] and drives every row: deltas, finishing, callbacks."""

    def __init__(self, engine: InferenceEngine, rows: list[_RowState]):
        self.engine = engine
        self.rows = rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        column = value.reshape(-1).tolist()  # [B] token ids of this step
        for row, tok in zip(self.rows, column):
            if row.done:
                continue
            if row.req.cancelled.is_set():
                self.finish(row, "cancelled")
                continue
            if tok == row.eos:
                self.finish(row, "stop")
                continue
            row.ids.append(tok)
            raw = self.engine.processor.decode(row.ids)
            if any(s in raw for s in row.stops):
                self.finish(row, "stop")
                continue
            if len(row.ids) >= row.req.max_new_tokens:
                self.finish(row, "length")
                continue
            self._emit(row, visible_text(raw, row.stops, final=False))

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self.finish(row, "cancelled" if row.req.cancelled.is_set() else "length")

    def _emit(self, row: _RowState, text: str) -> None:
        if text.startswith(row.emitted) and len(text) > len(row.emitted):
            delta, row.emitted = text[len(row.emitted):], text
            if row.req.on_delta is not None:
                row.req.on_delta(delta)

    def finish(self, row: _RowState, reason: str) -> None:
        row.done = True
        final = visible_text(self.engine.processor.decode(row.ids), row.stops, final=True)
        if reason != "cancelled":
            self._emit(row, final)
        completion = len(row.ids) + (1 if reason == "stop" and len(row.ids) < row.req.max_new_tokens else 0)
        result = BatchResult(text=final, finish_reason=reason, prompt_tokens=row.req.prompt.num_tokens,
                             completion_tokens=min(completion, row.req.max_new_tokens))
        if row.req.on_done is not None:
            row.req.on_done(result)


class _RowsDone(StoppingCriteria):
    """Tells ``generate`` which rows are finished (decided by the streamer) or cancelled."""

    def __init__(self, rows: list[_RowState]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = [r.done or r.req.cancelled.is_set() for r in self.rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)  # [B]


def generate_batch(engine: InferenceEngine, requests: list[BatchRequest],
                   settings: GenerationSettings | None = None) -> list[BatchResult]:
    """Answer ``requests`` in one ``generate`` call with the shared sampling ``settings``.

    ``settings.max_new_tokens`` and ``settings.stop`` are ignored: each request has its own. Results
    come back in order (and through each request's ``on_done`` as soon as its row finishes).
    """
    if not requests:
        return []
    for i, r in enumerate(requests):
        if r.max_new_tokens < 1:
            raise MedvlmError(f"request {i}: max_new_tokens must be >= 1 (got {r.max_new_tokens})")
    base = replace(settings or GenerationSettings(), stop=(),
                   max_new_tokens=max(r.max_new_tokens for r in requests)).validate()
    template_stops = engine.stop_strings(base)
    eos = engine.processor.tokenizer.eos_token_id
    rows = [_RowState(r, template_stops + [s for s in r.stop if s], eos) for r in requests]
    results: list[BatchResult | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        user_done = row.req.on_done

        def record(res: BatchResult, i: int = i, user_done=user_done) -> None:
            results[i] = res
            if user_done is not None:
                user_done(res)

        row.req = replace(row.req, on_done=record)
    collate = VLMCollator(pad_token_id=engine.processor.pad_token_id, padding_side="left")
    # input_ids / attention_mask [B, T] left padded; pixel_values [n_img, 3, H, W] in row order
    batch = collate([{"input_ids": r.prompt.input_ids, "pixel_values": r.prompt.pixel_values} for r in requests])
    streamer = _BatchStreamer(engine, rows)
    engine.run_batch(batch, base, extra_criteria=(_RowsDone(rows),), streamer=streamer)
    streamer.end()
    return [r for r in results if r is not None]
