"""Incremental detokenisation: an answer's text, stop-string checks and streamed deltas in O(new tokens) per step.

Decoding a row's whole answer after every token (and scanning all of it for stop strings) makes a
decoding step cost grow with answer length times rows. :class:`IncrementalText` decodes only the
newest tokens with a few earlier ones as context (``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])``, the scheme of TGI and vLLM), so tokenizers that drop a leading space
or merge bytes see the same context as a full decode. Text ending in an incomplete multi-byte
character (U+FFFD) stays pending until the next token completes it. Stop strings are searched only
in the new text plus ``longest stop - 1`` characters before it, and the streamed part is computed
on the unsent tail, with exactly :func:`~medvlm.infer.decoding.visible_text`'s rules (leading
whitespace, a tail that could still become a stop string, trailing whitespace and incomplete
characters held back). A tokenizer whose decoded text of earlier tokens changes with later ones
(space clean-up) falls back to full decodes from then on (the old O(answer) path), so the text always
equals the full decode.
"""

from __future__ import annotations

from collections.abc import Callable

from medvlm.infer.decoding import visible_text

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 16
"""A decoding window grows to at most about this many tokens before it moves up (one decode a step, mostly)."""


class IncrementalText:
    """One row's answer text, fed token by token."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=1)
        self.ids: list[int] = []
        self.text = ""
        """Decoded text of ``ids`` up to ``read`` (complete characters)."""
        self.pending = ""
        """Decoded text of the tokens after ``read`` (ends with an incomplete character)."""
        self.prefix = 0  # first token of the decoding context
        self.read = 0  # tokens whose text is in ``text``
        self.before = ""  # decode(ids[prefix:read])
        self.lead = -1  # leading whitespace characters of the answer (-1: all whitespace so far)
        self.sent = 0  # end (in raw text columns) of the visible text returned so far
        self.stopped = False
        """True once a stop string appeared (the answer is complete)."""
        self.full_mode = False  # this tokenizer's text of earlier tokens changed: decode everything each step
        self.shown = ""  # visible text returned so far (used in full mode)

    @property
    def raw(self) -> str:
        """The decoded text of every token so far (what ``decode(ids)`` gives)."""
        return self.text + self.pending

    def push(self, token: int) -> str:
        """Add one token; return the newly visible answer text (may be ''). Sets :attr:`stopped` on a stop string."""
        self.ids.append(token)
        now = "" if self.full_mode else self.decode(self.ids[self.prefix :])
        if self.full_mode or not now.startswith(self.before):
            return self._push_full()
        searched_from = len(self.text)
        self.pending = now[len(self.before) :]
        tail_start = max(0, searched_from - self.window + 1)
        tail = self.text[tail_start:] + self.pending
        if any(s in tail for s in self.stops):
            self.stopped = True
            return ""
        delta = self._visible_delta()
        self.shown += delta
        if self.pending and not self.pending.endswith(REPLACEMENT):
            self.text += self.pending
            self.pending = ""
            if len(self.ids) - self.prefix > CONTEXT_TOKENS and self.read > self.prefix:
                # Move the context window up to the previous commit (a character boundary): one extra decode.
                self.prefix, self.read = self.read, len(self.ids)
                self.before = self.decode(self.ids[self.prefix : self.read])
            else:  # same window: its text is what was just decoded
                self.read, self.before = len(self.ids), now
        return delta

    def _push_full(self) -> str:
        """The O(answer) path: decode everything, search all of it, diff against what was shown."""
        self.full_mode = True
        raw = self.decode(self.ids)
        self.text, self.pending = raw, ""
        if any(s in raw for s in self.stops):
            self.stopped = True
            return ""
        vis = visible_text(raw, self.stops, final=False)
        if vis.startswith(self.shown) and len(vis) > len(self.shown):
            delta, self.shown = vis[len(self.shown) :], vis
            return delta
        return ""

    def _visible_delta(self) -> str:
        raw_len = len(self.text) + len(self.pending)
        if self.lead < 0:
            raw = self.raw
            stripped = raw.lstrip()
            if not stripped.rstrip(REPLACEMENT):  # an incomplete character may still complete to whitespace
                return ""
            self.lead = len(raw) - len(stripped)
            self.sent = self.lead
        # Only the tail can change what is held back: the unsent text plus window - 1 characters before it.
        start = max(self.lead, self.sent - self.window)
        tail = self._slice(start, raw_len)
        end = start + len(visible_text(tail, self.stops, final=False, strip_left=False))
        if end <= self.sent:
            return ""
        delta = self._slice(self.sent, end)
        self.sent = end
        return delta

    def _slice(self, a: int, b: int) -> str:
        n = len(self.text)
        if a >= n:
            return self.pending[a - n : b - n]
        return self.text[a:b] if b <= n else self.text[a:] + self.pending[: b - n]

    def final(self) -> str:
        """The whole answer (stop text cut, outer whitespace stripped), from one full decode."""
        return visible_text(self.decode(self.ids), self.stops, final=True)
