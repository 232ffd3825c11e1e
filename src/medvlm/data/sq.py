"""STLLaVA-Med's self-questioning conversion: later human turns become VUSER turns the model learns to ask.

While a multimodal training sample is loaded, every user turn after the first becomes a ``vuser``
turn with probability ``rate`` (STLLaVA-Med's ``sq_r``, 0.5); the first turn (the one that carries
the image) never does, nor does any later turn that holds an image part (a VUSER question is text the
model writes, it cannot contain pixels). With the ``v1_sq`` template a VUSER question is learned
like an answer (its text and its end token), so the model learns to ask as well as to answer.

The draw is seeded per ``(seed, epoch, sample index)``: the same run sees the same conversions, a
new epoch draws anew, and the result does not depend on data-loader workers or sample order.
"""

from __future__ import annotations

import random

from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError


def sq_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's draw (string seeds are hashed with SHA-512: stable across processes)."""
    return random.Random(f"medvlm-sq:{seed}:{epoch}:{index}")


def to_self_questioning(sample: Sample, rate: float, rng: random.Random) -> Sample:
    """A copy of ``sample`` whose user turns after the first are VUSER turns with probability ``rate`` each.

    Text-only samples are returned unchanged (self-questioning is about an image). Raises a
    MedvlmError when ``rate`` is outside [0, 1].
    """
    if not 0.0 <= rate <= 1.0:
        raise MedvlmError(f"sq_r must be in [0, 1], got {rate}")
    if not sample.images:
        return sample
    messages: list[Message] = []
    seen_user = False
    for m in sample.messages:
        if m.role == "user":
            # One draw per later user turn, also for turns that cannot convert, so the pattern of the
            # other turns does not depend on where images sit.
            convert = seen_user and rng.random() < rate and m.num_images == 0
            seen_user = True
            if convert:
                m = Message("vuser", [dict(p) for p in m.content])
        messages.append(m)
    return Sample(id=sample.id, messages=messages, images=list(sample.images), meta=sample.meta)


def vuser_turns(sample: Sample) -> int:
    """How many VUSER turns a sample holds."""
    return sum(1 for m in sample.messages if m.role == "vuser")
