"""Reading two 1-10 scores from an LLM judge reply.

Shared by the chat-benchmark judge and the STLLaVA-Med preference judge.

Both judges ask for "the score of Assistant 1, a space, the score of Assistant 2" on the first line and
an explanation after it; real replies drift from that, so labelled forms are accepted too.
"""

from __future__ import annotations

import re

_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_ON_LINE = re.compile(_NUM + r"(?:\s*/\s*10(?![\d.]))?")
# "Assistant 1: 8", "Assistant 1 (reference) - 8/10", "Assistant 1 score: 8", "Assistant 1 gets 8", but
# not "Assistant 1 gave 3 reasons" - the number must follow the label closely
_LABELLED = [
    re.compile(
        rf"assistant\s*{i}\b(?:\s*\([^)\n]{{0,30}}\))?(?:'s)?(?:\s*(?:overall\s+)?(?:score|rating)s?)?"
        rf"\s*(?:[:=\-\u2013]|is|gets|receives|scored|scores)?\s*\**\s*{_NUM}",
        re.IGNORECASE,
    )
    for i in (1, 2)
]


def parse_scores(reply: str) -> tuple[float, float] | None:
    """Two scores from a judge reply, or None if they cannot be read.

    Accepts ``8 7``, ``8, 7``, ``8/10 7/10``, ``**8** **7**`` on the first non-empty line, and labelled
    forms such as ``Assistant 1: 8 ... Assistant 2: 7`` (on one line or several). Scores must lie in 0..10.
    """
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    first = lines[0]
    pair: list[float] | None = None
    if "assistant" in first.lower() or not re.search(r"\d", first):
        m1, m2 = (p.search(reply) for p in _LABELLED)
        if m1 and m2:
            pair = [float(m1.group(1)), float(m2.group(1))]
    else:
        nums = _SCORE_ON_LINE.findall(first)
        if len(nums) == 2:
            pair = [float(nums[0]), float(nums[1])]
    if pair is None or not all(0 <= s <= 10 for s in pair):
        return None
    return pair[0], pair[1]
