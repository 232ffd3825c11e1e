"""Dynamic batching of concurrent requests on one shared inference engine.

One thread owns the model. Requests wait in a bounded queue; when one arrives the thread waits at
most ``max_wait_ms`` for more, then runs the oldest request together with up to ``max_batch - 1``
other waiting requests that have the same sampling key (:func:`medvlm.infer.batching.sampling_key`):
all greedy requests batch together whatever their ``max_tokens`` / ``stop`` (handled per row);
sampling requests batch only with identical temperature / top-p / top-k / seed, because one
``generate`` call has one sampler and one RNG. Requests with another key wait for the next round
(the oldest request always goes first, so nobody starves). A full queue is refused at once
(:class:`QueueFullError`, HTTP 503), and a cancelled request leaves its batch at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from medvlm.errors import MedvlmError
from medvlm.infer.batching import BatchRequest, BatchResult, PreparedPrompt, generate_batch, sampling_key
from medvlm.infer.engine import GenerationSettings, InferenceEngine

log = logging.getLogger("medvlm.serve")


class QueueFullError(MedvlmError):
    """The request queue is full; the client should retry later (HTTP 503)."""


@dataclass(frozen=True)
class BatcherConfig:
    """How requests are grouped."""

    max_batch: int = 8
    """Most requests in one ``generate`` call (1 = one request at a time)."""
    max_wait_ms: float = 5.0
    """How long the first waiting request waits for others to join its batch."""
    max_queue: int = 64
    """Most requests waiting or running; more are refused with 503."""


@dataclass
class Job:
    """A submitted request: its prompt, settings and callbacks."""

    request: BatchRequest
    """The per-row request (prompt, limit, stops, callbacks, cancel event)."""
    settings: GenerationSettings
    """Sampling settings (grouping key)."""
    on_error: Callable[[BaseException], None] | None = None
    """Called if generation fails."""
    key: tuple = field(default=())

    def cancel(self) -> None:
        """Stop this request (dropped if still queued, its row ends if running)."""
        self.request.cancelled.set()


class DynamicBatcher:
    """Owns the engine's model in one thread and feeds it batches of compatible requests."""

    def __init__(self, engine: InferenceEngine, config: BatcherConfig | None = None):
        self.engine = engine
        self.config = config or BatcherConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 1:
            raise MedvlmError("max_batch and max_queue must be >= 1")
        self._pending: deque[Job] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        """How many ``generate`` calls started (for stats and tests)."""
        self.largest_batch = 0
        """The largest batch started so far."""
        self.requests_run = 0
        """Requests sent to ``generate`` (requests_run / batches_run = mean batch size)."""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "DynamicBatcher":
        """Start the model thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="medvlm-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel waiting and running requests and stop the thread."""
        with self._cond:
            self._stopped = True
            for job in self._pending:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_length(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self._pending) + self._running

    # -- submitting ------------------------------------------------------------------------
    def submit(self, prompt: PreparedPrompt, settings: GenerationSettings, *,
               on_delta: Callable[[str], None] | None = None,
               on_done: Callable[[BatchResult], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Job:
        """Queue a request; raises :class:`QueueFullError` when ``max_queue`` requests are in flight."""
        settings.validate()
        req = BatchRequest(prompt=prompt, max_new_tokens=settings.max_new_tokens, stop=tuple(settings.stop),
                           on_delta=on_delta, on_done=on_done)
        job = Job(request=req, settings=settings, on_error=on_error, key=sampling_key(settings))
        with self._cond:
            if self._stopped:
                raise QueueFullError("the server is shutting down")
            if len(self._pending) + self._running >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} requests); retry later")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    # -- the model thread ------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        """Wait for work, give late requests ``max_wait_ms`` to join, and pick one compatible group."""
        with self._cond:
            while not self._stopped and not self._pending:
                self._cond.wait(0.5)
            if self._stopped:
                return []
            deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
            while len(self._pending) < self.config.max_batch and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            while self._pending and self._pending[0].request.cancelled.is_set():
                self._pending.popleft()  # left before it started
            if not self._pending:
                return []
            key = self._pending[0].key
            batch, rest = [], deque()
            for job in self._pending:
                if job.request.cancelled.is_set():
                    continue
                if job.key == key and len(batch) < self.config.max_batch:
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if self._stopped:
                        return
                continue
            # Counted when the batch starts: answers reach their clients inside generate_batch, so stats
            # counted afterwards could lag behind an answer a client already holds.
            self.batches_run += 1
            self.requests_run += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                generate_batch(self.engine, [j.request for j in batch], batch[0].settings)
            except Exception as e:  # reported to each request; the server keeps serving
                log.error("generation failed for a batch of %d: %s: %s", len(batch), type(e).__name__, e)
                for job in batch:
                    if job.on_error is not None:
                        job.on_error(e)
            finally:
                with self._cond:
                    self._running = 0
