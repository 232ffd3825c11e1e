"""Retry delays: exponential backoff with jitter, one formula for every client (the LLM client, the downloader)."""

from __future__ import annotations

import random


def backoff_delay(
    retry: int, base: float, cap: float, *, hint: float | None = None, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``retry`` (0-based).

    ``base * 2**retry`` capped at ``cap``, then "equal jitter" (uniform in [half, whole]) so that clients failing
    together do not retry together; a server's ``hint`` (Retry-After) raises it, ``cap`` still bounds it.
    """
    d = min(cap, base * 2.0 ** min(retry, 64))
    d = d / 2 + (rng or random).uniform(0, d / 2)
    if hint is not None:
        d = max(d, hint)
    return min(d, cap)
