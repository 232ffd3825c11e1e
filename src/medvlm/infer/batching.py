"""Continuous (iteration-level) batching with shared-prefix reuse: the one decoding loop of medvlm.

:class:`ContinuousBatcher` keeps a running batch of rows, each with its own prompt, settings, stops,
callbacks and cancel event. Every :meth:`~ContinuousBatcher.step`:

1. drops cancelled rows (their cache rows are freed at once);
2. admits waiting requests, oldest first, into free rows (so no request waits behind more than one
   batch's worth of steps): each prompt reuses the longest cached prefix (:class:`~medvlm.infer.kv.PrefixCache`,
   token ids + image digests), its image prefix (everything up to the end of its last image) is
   prefilled once for all admitted rows that share it, then only the rest of each prompt is run, with
   its true position ids and a column mask that hides the holes between prefix and question;
3. runs one decoding step for every row and lets finished rows leave. Plain-greedy rows take their
   tokens from one batched argmax; each row's text grows by :class:`~medvlm.infer.detok.IncrementalText`
   (only the new tokens are decoded and searched for stop strings), so a step's cost does not grow
   with the answers' length.

Rows live in the row slots of one preallocated cache (:class:`~medvlm.infer.kv.KVBuffer`: a joining row takes a free
slot, right-aligned, and a leaving row's slot is refilled by the last row, so the other rows are not copied); every
row ends at the last column and positions are per row, so a row's computation does not depend on its neighbours
(under greedy decoding a batched answer equals the answer alone).
``remember_answers`` stores each finished conversation (prompt + answer) in the prefix cache, so the
next chat turn only computes its new tokens.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from medvlm.data.schema import IMAGE_PLACEHOLDER, Sample
from medvlm.errors import MedvlmError
from medvlm.infer.decoding import GenerationSettings, TokenChooser, ends_with_any
from medvlm.infer.detok import IncrementalText
from medvlm.infer.kv import KVBuffer, Layers, compact_row, concat_rows, image_digest, select_rows
from medvlm.model.tokenizer import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN


@dataclass
class PreparedPrompt:
    """An encoded prompt, ready to be batched."""

    input_ids: torch.Tensor
    """LongTensor[L]: the prompt ending with the generation prompt, image tokens expanded."""
    pixel_values: torch.Tensor | None
    """FloatTensor[n_img, 3, H, W] or None for text-only prompts."""
    spans: tuple[tuple[int, int], ...] = ()
    """(start, end) columns of each image block (im_start/im_end included)."""
    digests: tuple[str, ...] = ()
    """Content digest of each image (prefix-cache key)."""
    extras: dict[str, Any] | None = None
    """Other processor outputs the model needs at prefill (transformers families: ``pixel_values`` of any shape,
    ``image_grid_thw``, ``token_type_ids``, ...; batch dim 1), passed to the family with a chunk that starts the
    prompt. A prompt with extras is never resumed from a cached prefix that ends before its last image."""
    position_offset: int = 0
    """Added to a text token's index after the last image to get its position (M-RoPE families: ``rope_deltas``)."""

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens (image tokens included)."""
        return int(self.input_ids.shape[0])

    @property
    def split(self) -> int:
        """End of the last image block: the image prefix that questions about the same images share."""
        return self.spans[-1][1] if self.spans else 0


def make_prompt(processor: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> PreparedPrompt:
    """A :class:`PreparedPrompt` with its image blocks located and digested."""
    ids = input_ids.reshape(-1).long()
    seq = processor.image_seq_length
    where = (ids == processor.image_token_id).nonzero().squeeze(1).tolist()
    n_img = 0 if pixel_values is None else int(pixel_values.shape[0])
    if len(where) != n_img * seq:
        raise MedvlmError(f"the prompt has {len(where)} image tokens for {n_img} image(s) x {seq}")
    spans = []
    for k in range(n_img):
        start, end = where[k * seq], where[(k + 1) * seq - 1] + 1
        if end - start != seq:
            raise MedvlmError(f"image {k + 1}: its {seq} image tokens are not contiguous")
        if processor.im_start_token_id is not None and start > 0 and int(ids[start - 1]) == processor.im_start_token_id:
            start -= 1
        if processor.im_end_token_id is not None and end < len(ids) and int(ids[end]) == processor.im_end_token_id:
            end += 1
        spans.append((start, end))
    digests = tuple(image_digest(pixel_values[k]) for k in range(n_img))
    return PreparedPrompt(input_ids=ids, pixel_values=pixel_values, spans=tuple(spans), digests=digests)


def prepare_sample(
    engine: Any, sample: Sample, images: list[Image.Image] | None = None, image_folder: str | None = None
) -> PreparedPrompt:
    """Encode a conversation (ending with a user turn) as :meth:`InferenceEngine.generate` does."""
    return engine.prepare(sample, images=images, image_folder=image_folder)


def prepare_text(engine: Any, prompt: str, images: list[Image.Image]) -> PreparedPrompt:
    """Encode an already rendered prompt string whose ``<image>`` placeholders mark the images (LLaVA workers).

    Each placeholder is expanded to the model's image token layout and the string is tokenised once
    without added special tokens (templates write BOS themselves), as ``encode_conversation`` does.
    """
    proc = engine.processor
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n != len(images):
        raise MedvlmError(
            f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) were given"
        )
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
    return make_prompt(proc, torch.tensor(ids, dtype=torch.long), pixels)


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
    """Tokens generated for this row (its stop token included)."""
    cached_tokens: int = 0
    """Prompt tokens whose keys/values came from the prefix cache (not recomputed)."""


@dataclass
class BatchRequest:
    """One request: prompt, settings (token limit, stops, sampling) and callbacks."""

    prompt: PreparedPrompt
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    """Per-request decoding settings (validated when added)."""
    seed: int | None = None
    """This row's sampling seed (None: ``settings.seed``)."""
    on_delta: Callable[[str], None] | None = None
    """Called with each new piece of answer text (from the decoding thread)."""
    on_done: Callable[[BatchResult], None] | None = None
    """Called once when the request ends (from the decoding thread)."""
    on_error: Callable[[BaseException], None] | None = None
    """Called if the batch fails (the server reports it and keeps serving)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set it (:meth:`cancel`) to end this request at the next step; its row is freed at once."""

    def cancel(self) -> None:
        self.cancelled.set()


PAD_SLACK = 1.25
"""Prompt chunks are prefilled in buckets whose padded size is at most this multiple of their real tokens."""


class _Row:
    def __init__(self, req: BatchRequest, engine: Any):
        s = req.settings
        self.req = req
        self.stops = engine.stop_strings(s)
        self.stop_seqs = engine.stop_sequences(s)
        self.chooser = TokenChooser(s, engine.suppress_ids, req.seed if req.seed is not None else s.seed)
        self.text = IncrementalText(engine.processor.decode, self.stops)
        self.ids = self.text.ids  # answer tokens (EOS excluded)
        self.sampled: list[int] = []  # every chosen token; the cache holds prompt + sampled[:-1]
        self.emitted = ""
        # Greedy without a repetition penalty: the next token is an argmax the batch computes for all such rows at once.
        self.plain_greedy = s.temperature == 0 and s.repetition_penalty == 1.0
        self.pos = 0  # position id of the next token fed
        self.start = 0  # prompt tokens already cached before this row's own prefill
        self.past: Layers | None = None
        self.cached = 0

    def seen(self) -> torch.Tensor:
        return torch.cat([self.req.prompt.input_ids, torch.tensor(self.sampled, dtype=torch.long)])


class ContinuousBatcher:
    """Iteration-level batching over an engine (see the module doc). Not thread-safe: one thread steps it."""

    def __init__(self, engine: Any, max_batch: int = 8, remember_answers: bool = False):
        if max_batch < 1:
            raise MedvlmError(f"max_batch must be >= 1 (got {max_batch})")
        self.engine = engine
        self.family = engine.family
        self.processor = engine.processor
        self.cache = engine.prefix_cache
        self.max_batch = max_batch
        self.remember_answers = remember_answers
        self.waiting: deque[BatchRequest] = deque()
        self.rows: list[_Row] = []  # row i lives in slot i of ``kv``
        self.kv: KVBuffer | None = None
        self.steps = 0
        """Decoding steps run (for stats)."""
        self.admitted = 0
        """Requests that entered the batch."""
        self.largest_batch = 0
        self.rows_decoded = 0
        """Sum over steps of the rows in the step (``rows_decoded / steps`` is the mean occupancy)."""
        self.prefill_forwards = 0
        """Forwards run for admissions (image prefixes, then the rest of the admitted prompts, in length buckets)."""
        self.admit_seconds = 0.0
        """Wall time in admissions (cache lookups, prefills, first tokens)."""
        self.decode_seconds = 0.0
        """Wall time in decoding steps."""

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def add(self, req: BatchRequest) -> None:
        """Queue a request (it joins at the next step with a free row)."""
        req.settings.validate()
        if req.prompt.num_tokens < 1:
            raise MedvlmError("the prompt is empty")
        self.waiting.append(req)

    # -- stepping ------------------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled rows, admit waiting requests into free rows, decode one token for every row."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._drop_cancelled()
            free = self.max_batch - len(self.rows)
            batch: list[BatchRequest] = []
            while free > len(batch) and self.waiting:
                req = self.waiting.popleft()
                if req.cancelled.is_set():
                    self._report(req, BatchResult("", "cancelled", req.prompt.num_tokens, 0))
                else:
                    batch.append(req)
            if batch:
                try:
                    self._admit(batch)
                except BaseException:
                    self.waiting.extendleft(reversed(batch))  # still owed an answer: fail_all reports them
                    raise
            t1 = time.perf_counter()
            self.admit_seconds += t1 - t0
            if self.rows:
                self._decode()
                self.decode_seconds += time.perf_counter() - t1

    def run(self) -> None:
        """Step until nothing is running or waiting."""
        while not self.idle:
            self.step()

    def fail_all(self, exc: BaseException) -> None:
        """Report ``exc`` to every running and waiting request and empty the batch."""
        reqs = [r.req for r in self.rows] + list(self.waiting)
        self.rows, self.kv = [], None
        self.waiting.clear()
        for req in reqs:
            if req.on_error is not None:
                req.on_error(exc)

    # -- internals -----------------------------------------------------------------------------
    def _report(self, req: BatchRequest, result: BatchResult) -> None:
        if req.on_done is not None:
            req.on_done(result)

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self.rows) if row.req.cancelled.is_set()]
        for i in gone:
            self._finish(self.rows[i], "cancelled", None, None, i)
        if gone:
            self._remove(gone)

    def _remove(self, gone: list[int]) -> None:
        """Free the slots of finished rows (the last live rows move into them)."""
        order = self.kv.remove_rows(gone)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.kv = None
        else:  # a step attends over every column: drop the dead ones once they are a quarter of them (one copy)
            self.kv.compact(slack=0.25)

    def _add_to_kv(self, layers: Layers, mask: torch.Tensor, room: int) -> None:
        if self.kv is None:
            rows = min(self.max_batch, 2 * int(mask.shape[0]))
            self.kv = KVBuffer(layers, room=room, mask=mask, rows=rows, max_rows=self.max_batch)
        else:
            self.kv.add_rows(layers, mask)

    def _chunk_forward(
        self, items: list[tuple[_Row, int, int, Layers | None]]
    ) -> tuple[torch.Tensor, Layers, torch.Tensor]:
        """Prefill ``prompt[start:end]`` of each row after its cached ``past`` (``start`` columns), batched.

        Pasts are left-padded to a common width, chunks too: the holes are masked out and each token
        gets its true position. Returns last-column logits ``[B, V]``, the cache and its column mask.
        """
        pad = self.processor.pad_token_id
        past_w = max(start for _, start, _, _ in items)
        chunk_w = max(end - start for _, start, end, _ in items)
        ref = next((p for _, _, _, p in items if p is not None), None)
        ids = torch.full((len(items), chunk_w), pad, dtype=torch.long)
        pos = torch.zeros((len(items), chunk_w), dtype=torch.long)
        mask = torch.zeros((len(items), past_w + chunk_w), dtype=torch.bool)
        pixels, pasts, extras = [], [], []
        for b, (row, start, end, past) in enumerate(items):
            prompt = row.req.prompt
            n = end - start
            extras.append(prompt.extras if start == 0 else None)
            ids[b, chunk_w - n :] = prompt.input_ids[start:end]
            # Text after the last image: index + offset (M-RoPE); a chunk from before it starts at 0 (offset 0 there).
            pos[b, chunk_w - n :] = torch.arange(start, end) + (prompt.position_offset if start >= prompt.split else 0)
            pos[b, : chunk_w - n] = start  # holes: any position, they are never attended to
            mask[b, past_w - start : past_w] = True
            mask[b, past_w + chunk_w - n :] = True
            for k, (s, e) in enumerate(prompt.spans):
                if start <= s and e <= end and prompt.pixel_values is not None:
                    pixels.append(prompt.pixel_values[k : k + 1])
                elif s < start < e or s < end < e:
                    raise MedvlmError("internal: a prompt chunk cuts through an image")
            if past_w:
                if past is None:
                    past = [
                        (k.new_zeros(1, k.shape[1], 0, k.shape[3]), v.new_zeros(1, v.shape[1], 0, v.shape[3]))
                        for k, v in ref
                    ]
                pasts.append((past, torch.ones(1, start, dtype=torch.bool)))
        past_layers = concat_rows(pasts)[0] if past_w else None
        pixel_values = torch.cat(pixels) if pixels else None
        has_extras = any(e is not None for e in extras)
        self.prefill_forwards += 1
        logits, layers = self.family.prefill(
            ids, pixel_values, mask, pos, past_layers, **({"extras": extras} if has_extras else {})
        )
        return logits, layers, mask

    def _bucketed_forward(
        self, items: list[tuple[_Row, int, int, Layers | None]]
    ) -> tuple[torch.Tensor, Layers, torch.Tensor]:
        """:meth:`_chunk_forward` in buckets of similar chunk length (padding costs compute), results in item order."""
        order = sorted(range(len(items)), key=lambda i: items[i][2] - items[i][1])
        buckets: list[list[int]] = [[]]
        for i in order:
            trial = buckets[-1] + [i]
            widths = [items[j][2] - items[j][1] for j in trial]
            if buckets[-1] and max(widths) * len(trial) > PAD_SLACK * sum(widths):
                buckets.append([i])
            else:
                buckets[-1] = trial
        if len(buckets) == 1:
            return self._chunk_forward(items)
        outs = [self._chunk_forward([items[i] for i in b]) for b in buckets]
        logits = torch.cat([o[0] for o in outs])
        layers, mask = concat_rows([(o[1], o[2]) for o in outs])
        flat = [i for b in buckets for i in b]
        back = torch.empty(len(flat), dtype=torch.long)
        back[torch.tensor(flat)] = torch.arange(len(flat))
        layers, mask = select_rows(layers, mask, back)
        return logits.index_select(0, back), layers, mask

    def _admit(self, reqs: list[BatchRequest]) -> None:
        """Prefill new requests (reusing cached prefixes), take their first tokens and put them into free slots."""
        rows = [_Row(r, self.engine) for r in reqs]
        cache = self.cache
        for row in rows:
            p = row.req.prompt
            if cache is not None:
                # Processor extras are given whole, so such a prompt's images are prefilled in one chunk from its start.
                floor = p.split if p.extras is not None else 0
                row.start, row.past = cache.lookup(p.input_ids, p.spans, p.digests, limit=p.num_tokens - 1, floor=floor)
                row.cached = row.start
        # Image prefixes: computed once per distinct (ids, images) among the admitted rows.
        groups: dict[tuple, list[_Row]] = {}
        for row in rows:
            p = row.req.prompt
            if 0 < p.split < p.num_tokens and row.start < p.split:
                groups.setdefault((tuple(p.input_ids[: p.split].tolist()), p.digests), []).append(row)
        todo = [g for g in groups.values() if len(g) > 1 or cache is not None]
        if todo:
            items = [(g[0], g[0].start, g[0].req.prompt.split, g[0].past) for g in todo]
            _, layers, mask = self._chunk_forward(items)
            for b, g in enumerate(todo):
                p = g[0].req.prompt
                prefix = compact_row(layers, mask, b)
                if cache is not None:
                    cache.insert(p.input_ids[: p.split], p.spans, p.digests, prefix)
                for row in g:
                    row.start, row.past = p.split, prefix
        # Counted before any row can finish (and answer its client).
        self.admitted += len(rows)
        self.largest_batch = max(self.largest_batch, len(self.rows) + len(rows))
        # The rest of each prompt runs in forwards of its own, bucketed by length. (Running it inside the decoding step
        # instead, right-aligned with the decoding rows, was measured slower on a CPU: every decoding row is padded to
        # the widest chunk, and an 8-row step of a 17-token chunk cost 4x a plain step; benchmarks/README.md.)
        logits, layers, mask = self._bucketed_forward([(r, r.start, r.req.prompt.num_tokens, r.past) for r in rows])
        keep = []
        greedy = self._greedy(logits, rows)
        for b, row in enumerate(rows):
            row.past = None
            row.pos = row.req.prompt.num_tokens + row.req.prompt.position_offset
            if not self._accept(row, b, logits[b], layers, mask, greedy[b]):
                keep.append(b)
        if keep:
            new_layers, new_mask = select_rows(layers, mask, torch.tensor(keep, dtype=torch.long))
            self._add_to_kv(new_layers, new_mask, room=self._room([rows[b] for b in keep]))
            self.rows += [rows[b] for b in keep]

    def _room(self, rows: list[_Row]) -> int:
        """Spare columns for a new cache: the most tokens any row may still generate (capped)."""
        left = max(r.req.settings.max_new_tokens - len(r.ids) for r in self.rows + rows)
        return max(1, min(left, 256))

    def _decode(self) -> None:
        kv, rows = self.kv, self.rows
        kv.reserve(1)
        end = kv.length + 1
        ids = torch.tensor([[r.sampled[-1]] for r in rows], dtype=torch.long)
        pos = torch.tensor([[r.pos] for r in rows], dtype=torch.long)
        kv.mask_buf[: len(rows), end - 1] = True
        logits = self.family.decode(ids, kv.mask(1), pos, kv)
        self.steps += 1
        self.rows_decoded += len(rows)
        gone = []
        layers, mask = kv.layers(), kv.mask()
        greedy = self._greedy(logits, rows)
        for b, row in enumerate(rows):
            row.pos += 1
            if self._accept(row, b, logits[b], layers, mask, greedy[b]):
                gone.append(b)
        if gone:
            self._remove(gone)

    def _greedy(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """The argmax token of every plain-greedy row (suppressed ids excluded) in one batched op; None for the others.

        The same scores per row as :class:`~medvlm.infer.decoding.TokenChooser` (float32, suppressed ids at
        -inf, first maximum), so answers do not change.
        """
        if not any(r.plain_greedy for r in rows):
            return [None] * len(rows)
        scores = logits.float()
        suppress = self.engine.suppress_ids
        if suppress:
            scores = scores.clone()
            scores[:, suppress] = -float("inf")
        best = scores.argmax(dim=-1).tolist()
        return [t if r.plain_greedy else None for t, r in zip(best, rows)]

    def _accept(
        self, row: _Row, b: int, logits: torch.Tensor, layers: Layers, mask: torch.Tensor, greedy: int | None = None
    ) -> bool:
        """Choose (unless ``greedy`` already did) and take row ``b``'s next token; True when the row has finished."""
        if row.req.cancelled.is_set():
            self._finish(row, "cancelled", layers, mask, b)
            return True
        if greedy is not None:
            tok = greedy
        else:
            seen = row.seen() if row.req.settings.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
            tok = row.chooser(logits, seen)
        row.sampled.append(tok)
        reason = None
        if tok == self.processor.tokenizer.eos_token_id:
            reason = "stop"
        else:
            delta = row.text.push(tok)  # appends to row.ids; decodes only the new tokens
            if row.text.stopped or ends_with_any(row.ids, row.stop_seqs):
                reason = "stop"
            elif len(row.ids) >= row.req.settings.max_new_tokens:
                reason = "length"
            elif delta:
                row.emitted += delta
                if row.req.on_delta is not None:
                    row.req.on_delta(delta)
        if reason is None:
            return False
        self._finish(row, reason, layers, mask, b)
        return True

    def _emit(self, row: _Row, text: str) -> None:
        if text.startswith(row.emitted) and len(text) > len(row.emitted):
            delta, row.emitted = text[len(row.emitted) :], text
            if row.req.on_delta is not None:
                row.req.on_delta(delta)

    def _finish(self, row: _Row, reason: str, layers: Layers | None, mask: torch.Tensor | None, b: int) -> None:
        final = row.text.final()
        if reason != "cancelled":
            self._emit(row, final)
            if self.remember_answers and self.cache is not None and layers is not None:
                p = row.req.prompt
                seen = torch.cat([p.input_ids, torch.tensor(row.sampled[:-1], dtype=torch.long)])
                self.cache.insert(seen, p.spans, p.digests, compact_row(layers, mask, b))
        self._report(row.req, BatchResult(final, reason, row.req.prompt.num_tokens, len(row.sampled), row.cached))
