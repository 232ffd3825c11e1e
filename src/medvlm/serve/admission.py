"""Per-request limits shared by the API and the LLaVA worker, checked in the cheap-to-expensive order.

1. the queue (:class:`Admission`): a request that would not fit is answered 503 before its images are
   decoded or its prompt tokenised;
2. the prompt length in characters (:func:`check_prompt_chars`), before tokenising;
3. the image count, then every image's header (:mod:`medvlm.serve.images`), then the *sum* of the
   estimated decoded bytes of all the request's images (:meth:`DecodeGate.check`) - all before any pixel
   is decoded;
4. decoding and preprocessing run inside one of ``max_concurrent_decodes`` slots
   (:meth:`DecodeGate.slot`), so at most ``max_concurrent_decodes x max_decoded_bytes`` of decoded images
   exist at once. Text-only requests need no slot, and tokenising takes no lock shared with other
   requests (the fast tokenizer is only read), so one long prompt cannot stall the others.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from medvlm.errors import MedvlmError
from medvlm.serve.images import ImageProbe


class RequestRefused(MedvlmError):
    """A request refused by a limit; ``status`` is the HTTP status, ``code`` a short machine-readable reason."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status, self.code = status, code


def body_cap(max_images: int, max_image_bytes: int, max_prompt_chars: int) -> int:
    """The request-body cap that fits a request at its limits: every image in base64 (4/3 of its bytes plus
    JSON framing) and the text at 6 bytes a character (JSON ``\\uXXXX`` escapes), at least 1 MiB of text."""
    return max_images * (max_image_bytes * 4 // 3 + 1024) + max(1 << 20, 6 * max_prompt_chars + (64 << 10))


def check_prompt_chars(n_chars: int, limit: int) -> None:
    """Refuse (413) a prompt longer than ``limit`` characters; runs before anything is tokenised."""
    if n_chars > limit:
        raise RequestRefused(
            f"the prompt has {n_chars} characters; this server accepts at most {limit} (--max-prompt-chars)",
            413,
            "prompt_too_long",
        )


def check_image_count(n: int, limit: int) -> None:
    """Refuse (400) more than ``limit`` images."""
    if n > limit:
        raise RequestRefused(
            f"too many images: {n} (this server accepts at most {limit} per request)", 400, "too_many_images"
        )


class Admission:
    """Counts requests between admission and the batcher's queue, so the queue check comes first.

    ``with admission.enter(batcher_queue_length): ...`` raises :class:`RequestRefused` (503) when the
    requests already queued plus those being prepared reach ``max_in_flight``.
    """

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.preparing = 0
        self._lock = threading.Lock()

    @contextmanager
    def enter(self, queued: int) -> Iterator[None]:
        with self._lock:
            if self.preparing + queued >= self.max_in_flight:
                raise RequestRefused(
                    f"the request queue is full ({self.max_in_flight} requests); retry later", 503, "queue_full"
                )
            self.preparing += 1
        try:
            yield
        finally:
            with self._lock:
                self.preparing -= 1


class DecodeGate:
    """Bounds the decoded-image memory of one request and the number of requests decoding at once."""

    def __init__(self, max_decoded_bytes: int, max_concurrent: int, wait_s: float = 30.0):
        if max_decoded_bytes < 1 or max_concurrent < 1:
            raise MedvlmError("max_decoded_bytes and max_concurrent_decodes must be >= 1")
        self.max_decoded_bytes, self.max_concurrent, self.wait_s = max_decoded_bytes, max_concurrent, wait_s
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.active = 0
        """Requests decoding right now."""
        self.most_active = 0
        """The most requests that were decoding at the same time (for tests and /health)."""

    def check(self, probes: list[ImageProbe]) -> None:
        """Refuse (413) images whose estimated decoded size together passes the per-request budget."""
        total = sum(p.decoded_bytes for p in probes)
        if total > self.max_decoded_bytes:
            raise RequestRefused(
                f"the request's {len(probes)} image(s) would take about {total // 2**20} MiB to decode and "
                f"preprocess; the limit is {self.max_decoded_bytes // 2**20} MiB per request (--max-decoded-mb)",
                413,
                "image_too_large",
            )

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of the ``max_concurrent`` decode slots (503 if none frees up within ``wait_s``)."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise RequestRefused("the server is busy decoding other images; retry later", 503, "busy")
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1
            self._slots.release()
