"""Continuous batching of concurrent requests on one shared inference engine.

One thread owns the model and steps a :class:`~medvlm.infer.batching.ContinuousBatcher`: a request
joins the running batch at the next decoding step that has a free row (up to ``max_batch`` rows,
oldest request first, so nobody waits behind more than one batch's worth of steps) and leaves it the
moment it ends, streaming included. Rows may differ in every setting (token limit, stops,
temperature, top-p/top-k, seed): each row chooses its tokens with its own settings and generator.
Prompts reuse the engine's prefix cache (an image asked about again, a chat's earlier turns), and
each finished conversation is remembered for the next turn. When the batch is empty the first
request waits at most ``max_wait_ms`` for others to prefill with it. A full queue is refused at once
(:class:`QueueFullError`, HTTP 503); a cancelled request (client gone) frees its row at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from medvlm.errors import MedvlmError
from medvlm.infer.batching import BatchRequest, BatchResult, PreparedPrompt
from medvlm.infer.engine import GenerationSettings, InferenceEngine

log = logging.getLogger("medvlm.serve")


class QueueFullError(MedvlmError):
    """The request queue is full; the client should retry later (HTTP 503)."""


@dataclass(frozen=True)
class BatcherConfig:
    """How requests share the model."""

    max_batch: int = 8
    """Most requests decoded together (1 = one request at a time)."""
    max_wait_ms: float = 5.0
    """When nothing is running, how long the first request waits for others to prefill with it."""
    max_queue: int = 64
    """Most requests waiting or running; more are refused with 503."""


@dataclass
class Job:
    """A submitted request."""

    request: BatchRequest
    """The row's prompt, settings, callbacks and cancel event."""

    def cancel(self) -> None:
        """Stop this request (dropped if still queued, its row freed at the next step if running)."""
        self.request.cancel()


class DynamicBatcher:
    """Owns the engine's model in one thread and decodes every request in flight continuously."""

    def __init__(self, engine: InferenceEngine, config: BatcherConfig | None = None):
        self.engine = engine
        self.config = config or BatcherConfig()
        if self.config.max_batch < 1 or self.config.max_queue < 1:
            raise MedvlmError("max_batch and max_queue must be >= 1")
        self._incoming: deque[BatchRequest] = deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._batcher = engine.batcher(max_batch=self.config.max_batch, remember_answers=True)
        self.after_step: list[Callable[[], None]] = []
        """Called in the model thread after every step (the API server delivers the step's events in one go)."""

    @property
    def requests_run(self) -> int:
        """Requests that entered the running batch."""
        return self._batcher.admitted

    @property
    def largest_batch(self) -> int:
        """Most rows decoded together so far."""
        return self._batcher.largest_batch

    @property
    def batches_run(self) -> int:
        """Decoding steps run (each step decodes every running row once)."""
        return self._batcher.steps

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> DynamicBatcher:
        """Start the model thread (idempotent)."""
        if self._thread is None:
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="medvlm-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel waiting and running requests and stop the thread."""
        with self._cond:
            self._stopped = True
            for req in self._incoming:
                req.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_length(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return self._inflight

    def stats(self) -> dict:
        """Counters for ``/health``: batching and the prefix cache."""
        cache = self.engine.prefix_cache
        return {
            "queue_length": self.queue_length,
            "decode_steps": self.batches_run,
            "requests_run": self.requests_run,
            "largest_batch": self.largest_batch,
            "running": len(self._batcher.rows),
            "max_batch": self.config.max_batch,
            "prefix_cache": cache.info() if cache is not None else None,
        }

    # -- submitting ------------------------------------------------------------------------
    def submit(
        self,
        prompt: PreparedPrompt,
        settings: GenerationSettings,
        *,
        on_delta: Callable[[str], None] | None = None,
        on_done: Callable[[BatchResult], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> Job:
        """Queue a request; raises :class:`QueueFullError` when ``max_queue`` requests are in flight."""
        settings.validate()
        settled = threading.Event()

        def settle() -> None:
            if not settled.is_set():
                settled.set()
                with self._cond:
                    self._inflight -= 1

        def done(result: BatchResult) -> None:
            settle()
            if on_done is not None:
                on_done(result)

        def failed(exc: BaseException) -> None:
            settle()
            if on_error is not None:
                on_error(exc)

        req = BatchRequest(prompt=prompt, settings=settings, on_delta=on_delta, on_done=done, on_error=failed)
        with self._cond:
            if self._stopped:
                raise QueueFullError("the server is shutting down")
            if self._inflight >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} requests); retry later")
            self._inflight += 1
            self._incoming.append(req)
            self._cond.notify_all()
        return Job(request=req)

    # -- the model thread ------------------------------------------------------------------
    def _take_incoming(self) -> list[BatchRequest] | None:
        """New requests (waiting for work when idle, ``max_wait_ms`` for company when the batch is empty);
        None = stop."""
        b = self._batcher
        with self._cond:
            while not self._stopped and not self._incoming and b.idle:
                self._cond.wait(0.5)
            if self._stopped:
                return None
            if b.idle and self._incoming:
                deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
                while len(self._incoming) < self.config.max_batch and not self._stopped:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            new = list(self._incoming)
            self._incoming.clear()
            return new

    def _loop(self) -> None:
        b = self._batcher
        while True:
            new = self._take_incoming()
            if new is None:  # stopping: every request in flight ends as cancelled
                with self._cond:
                    for req in self._incoming:
                        b.add(req)
                    self._incoming.clear()
                for req in [r.req for r in b.rows] + list(b.waiting):
                    req.cancel()
                while not b.idle:
                    b.step()  # cancelled rows and requests are reported without running the model
                self._after_step()
                return
            b.max_batch = self.config.max_batch
            for req in new:
                b.add(req)
            try:
                b.step()
            except Exception as e:  # reported to each request; the server keeps serving
                log.error(
                    "generation failed for a batch of %d: %s: %s", len(b.rows) + len(b.waiting), type(e).__name__, e
                )
                b.fail_all(e)
            self._after_step()

    def _after_step(self) -> None:
        for hook in list(self.after_step):  # the event loop may register a new one meanwhile
            try:
                hook()
            except Exception as e:  # a listener's failure must not stop the model thread
                log.error("after-step hook failed: %s: %s", type(e).__name__, e)
