"""Questions, answers, captions and conversations of the synthetic demo dataset (:mod:`medvlm.data.synth`).

Answers are functions of :class:`~medvlm.data.synth.render.Factors`, which the renderer draws.
Closed (yes/no) answers are balanced *per question text*: an image's closed questions and their
answers are drawn first and its factors are then sampled conditioned on them, so a model that reads
only the question cannot beat ~0.5 on closed questions. Open answers follow the factor distribution
(modality 1 of 5, count/side 1 of 3, size 1 of 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from medvlm.data.synth.render import COUNTS, INTENSITIES, MODALITIES, SIZES, Factors

NUM_WORD = {1: "one", 2: "two", 3: "three"}
MODALITY_ANSWER = {"xray": "x-ray", "ct": "ct", "mri": "mri", "histology": "histology", "gross": "gross"}
"""Short open answer for the modality question."""
_MOD_NOUN = {
    "xray": "a chest x-ray",
    "ct": "a ct scan",
    "mri": "an mri scan",
    "histology": "a histology slide",
    "gross": "a gross pathology photograph",
}
_MOD_SENTENCE = {
    "xray": "a frontal chest X-ray",
    "ct": "an axial CT scan",
    "mri": "an axial MRI of the head",
    "histology": "an H&E-stained histology section",
    "gross": "a gross pathology photograph of a resected specimen",
}
_MOD_CAPTION = {
    "xray": ("Chest X-ray", "Frontal chest radiograph (X-ray)"),
    "ct": ("Axial CT image", "Contrast-enhanced axial CT scan"),
    "mri": ("Axial MRI of the head", "Axial T2-weighted MRI"),
    "histology": ("H&E-stained histology section", "Histopathology image (H&E stain)"),
    "gross": ("Gross pathology photograph", "Gross photograph of a resected specimen"),
}
_MOD_DETAIL = {
    "xray": "The lung fields, the rib cage and the spine are visible, with bright rib arcs over both lungs.",
    "ct": "The round body outline with its bright rim and the vertebra at the bottom of the slice are visible.",
    "mri": "The head outline with a bright rim and smooth grey structures inside it is visible.",
    "histology": "The tissue is stained pink by eosin with scattered purple nuclei.",
    "gross": "The tan-brown specimen lies on a blue-green surgical drape.",
}

# VQA question kinds use VQA-RAD's question_type names.
OPEN_KINDS: tuple[str, ...] = ("MODALITY", "COUNT", "POS", "SIZE")
CLOSED_KINDS: tuple[str, ...] = ("MODALITY", "COUNT", "POS", "SIZE", "ATTRIB")
# Binary size is asked less often, so the blind open baseline stays near 1/3.
_OPEN_WEIGHTS = np.array([1.0, 1.0, 1.0, 0.6])

OPEN_TEMPLATES: dict[str, tuple[str, ...]] = {  # the wordings of each open question kind
    "MODALITY": (
        "What modality is this?",
        "What imaging modality is shown?",
        "What type of image is this?",
        "What kind of image is this?",
    ),
    "COUNT": ("How many lesions are there?", "How many lesions are visible?", "What is the number of lesions?"),
    "POS": (
        "Which side of the image is affected?",
        "On which side are the lesions located?",
        "Which side contains the abnormality?",
    ),
    "SIZE": ("What is the size of the lesions?", "How large are the lesions?", "What size are the lesions?"),
}
# the (predicate, parameter) pairs each closed kind asks about; closed_truth decides them from the factors
CLOSED_PREDICATES: dict[str, tuple[tuple[str, object], ...]] = {
    "MODALITY": tuple(("is", m) for m in MODALITIES),
    "COUNT": tuple(("count", n) for n in COUNTS),
    "POS": (("has", "left"), ("has", "right"), ("both", None), ("only", "left"), ("only", "right")),
    "SIZE": tuple(("size", z) for z in SIZES),
    "ATTRIB": tuple(("intensity", b) for b in INTENSITIES),
}


def closed_templates(pred: str, param: object) -> tuple[str, ...]:
    """The yes/no wordings of one closed predicate (the answer comes from :func:`closed_truth`)."""
    if pred == "is":
        noun = _MOD_NOUN[str(param)]
        return (f"Is this {noun}?", f"Is this image {noun}?", f"Does this image show {noun}?")
    if pred == "count":
        n = int(param)  # type: ignore[call-overload]
        if n == 1:
            return (
                "Is there exactly one lesion?",
                "Does the image show a single lesion?",
                "Is the number of lesions one?",
            )
        return (
            f"Are there exactly {NUM_WORD[n]} lesions?",
            f"Does the image show {NUM_WORD[n]} lesions?",
            f"Is the number of lesions {NUM_WORD[n]}?",
        )
    if pred == "has":
        return (
            f"Is there a lesion on the {param} side?",
            f"Is the {param} side of the image affected?",
            f"Does the {param} half of the image contain a lesion?",
        )
    if pred == "both":
        return ("Are there lesions on both sides?", "Are both sides of the image affected?")
    if pred == "only":
        return (f"Are the lesions only on the {param} side?", f"Is only the {param} side of the image affected?")
    if pred == "size":
        return (
            f"Is the lesion size {param}?",
            f"Are the lesions {param} in size?",
            f"Would you describe the lesions as {param}?",
        )
    if pred == "intensity":
        return (
            f"Do the lesions appear {param}?",
            f"Is the lesion intensity {param}?",
            f"Are the lesions {param} compared with the surrounding tissue?",
        )
    raise ValueError(f"unknown closed predicate {pred!r}")


def closed_truth(pred: str, param: object, f: Factors) -> bool:
    """The yes/no answer of a closed predicate on factors ``f``."""
    if pred == "is":
        return f.modality == param
    if pred == "count":
        return f.count == param
    if pred == "has":
        return f.side in (param, "both")
    if pred == "both":
        return f.side == "both"
    if pred == "only":
        return f.side == param
    if pred == "size":
        return f.size == param
    if pred == "intensity":
        return f.intensity == param
    raise ValueError(f"unknown closed predicate {pred!r}")


def open_answer(kind: str, f: Factors) -> str:
    """The short open answer of question kind ``kind`` on factors ``f``."""
    return {"MODALITY": MODALITY_ANSWER[f.modality], "COUNT": NUM_WORD[f.count], "POS": f.side, "SIZE": f.size}[kind]


@lru_cache(maxsize=1)
def _combos() -> tuple[list[Factors], np.ndarray]:
    """Every factor combination with its prior weight (count and side marginals both uniform)."""
    count_side = [
        (1, "left", 2),
        (1, "right", 2),
        (2, "both", 2),
        (2, "left", 1),
        (2, "right", 1),
        (3, "both", 2),
        (3, "left", 1),
        (3, "right", 1),
    ]
    combos, weights = [], []
    for m in MODALITIES:
        for n, s, w in count_side:
            for z in SIZES:
                for b in INTENSITIES:
                    combos.append(Factors(m, n, s, z, b))
                    weights.append(float(w))
    return combos, np.array(weights)


@cache
def _truth_mask(pred: str, param: object) -> np.ndarray:
    combos, _ = _combos()
    return np.array([closed_truth(pred, param, c) for c in combos])


@dataclass(frozen=True)
class QA:
    """One VQA question with its short answer."""

    kind: str
    """VQA-RAD-style ``question_type`` (``MODALITY``, ``COUNT``, ``POS``, ``SIZE``, ``ATTRIB``)."""
    answer_type: str
    """``OPEN`` | ``CLOSED``."""
    question: str
    answer: str
    """Short lower-case answer (``yes``/``no`` for closed)."""


def sample_item(rng: np.random.Generator, n_closed: int = 2, n_open: int = 2) -> tuple[Factors, list[QA]]:
    """Draw an image's closed questions and answers, then its factors conditioned on them, then open questions."""
    combos, prior = _combos()
    while True:
        kinds = rng.choice(len(CLOSED_KINDS), size=n_closed, replace=False)
        chosen = []
        mask = np.ones(len(combos), dtype=bool)
        for k in kinds:
            kind = CLOSED_KINDS[int(k)]
            preds = CLOSED_PREDICATES[kind]
            pred, param = preds[int(rng.integers(len(preds)))]
            yes = bool(rng.integers(2))
            truth = _truth_mask(pred, param)
            mask &= truth if yes else ~truth
            chosen.append((kind, pred, param, yes))
        if mask.any():  # contradictory pairs (e.g. "both sides" yes + "exactly one" yes) are redrawn
            break
    w = prior * mask
    f = combos[int(rng.choice(len(combos), p=w / w.sum()))]
    qas = []
    for kind, pred, param, yes in chosen:
        templates = closed_templates(pred, param)
        qas.append(QA(kind, "CLOSED", templates[int(rng.integers(len(templates)))], "yes" if yes else "no"))
    for k in rng.choice(len(OPEN_KINDS), size=n_open, replace=False, p=_OPEN_WEIGHTS / _OPEN_WEIGHTS.sum()):
        kind = OPEN_KINDS[int(k)]
        templates = OPEN_TEMPLATES[kind]
        qas.append(QA(kind, "OPEN", templates[int(rng.integers(len(templates)))], open_answer(kind, f)))
    order = rng.permutation(len(qas))
    return f, [qas[int(i)] for i in order]


def extra_closed_items(f: Factors, asked: set[str], n: int, rng: np.random.Generator) -> list[QA]:
    """``n`` more closed questions about image ``f``, of closed kinds not in ``asked`` (at most the free kinds).

    Each is drawn as :func:`closed_items_of_kinds` draws it. Unlike :func:`sample_item`'s questions, the answer
    of one question text is not balanced (e.g. "both sides?" is "yes" only on images with lesions on both
    sides), so these go to training data only, never to a test split.
    """
    free = [k for k in CLOSED_KINDS if k not in asked]
    return closed_items_of_kinds(f, [free[int(k)] for k in rng.permutation(len(free))[:n]], rng)


def closed_items_of_kinds(f: Factors, kinds: list[str] | tuple[str, ...], rng: np.random.Generator) -> list[QA]:
    """One closed question about image ``f`` per entry of ``kinds`` (training data only, see above).

    Drawn given the image: yes or no with probability 1/2 each, then a predicate of the kind with that answer
    and one of its wordings.
    """
    out = []
    for kind in kinds:
        if kind not in CLOSED_PREDICATES:
            raise ValueError(f"unknown closed question kind {kind!r}; choose from {', '.join(CLOSED_KINDS)}")
        yes = bool(rng.integers(2))
        preds = [pp for pp in CLOSED_PREDICATES[kind] if closed_truth(pp[0], pp[1], f) == yes]
        pred, param = preds[int(rng.integers(len(preds)))]
        templates = closed_templates(pred, param)
        out.append(QA(kind, "CLOSED", templates[int(rng.integers(len(templates)))], "yes" if yes else "no"))
    return out


def _lesions(f: Factors) -> str:
    return f"{NUM_WORD[f.count]} {f.size} {f.intensity} lesion{'s' if f.count > 1 else ''}"


def _side_phrase(f: Factors) -> str:
    return "on both sides" if f.side == "both" else f"on the {f.side} side"


def caption(f: Factors, rng: np.random.Generator) -> str:
    """A one-sentence caption naming every factor.

    E.g. ``Axial CT image showing two large bright lesions on the left side.``
    """
    mod = _MOD_CAPTION[f.modality][int(rng.integers(2))]
    template = ("{mod} showing {les} {side}.", "{mod} with {les} {side}.", "{mod}: {les} {side}.")[int(rng.integers(3))]
    return template.format(mod=mod, les=_lesions(f), side=_side_phrase(f))


def description(f: Factors) -> str:
    """A detailed multi-sentence description naming every factor."""
    plural = f.count > 1
    return (
        f"This is {_MOD_SENTENCE[f.modality]} showing {_lesions(f)} {_side_phrase(f)} of the image. "
        f"{_MOD_DETAIL[f.modality]} The lesion{'s are' if plural else ' is'} {f.size} and "
        f"appear{'' if plural else 's'} {f.intensity} relative to the surrounding tissue."
    )


def mention(f: Factors) -> str:
    """An in-text mention sentence in the tokenised style of the real fig-captions file."""
    return f"{_MOD_CAPTION[f.modality][0]} demonstrated {_lesions(f)} {_side_phrase(f)} ( Figure 1 ) ."


ALIGNMENT_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Write a terse but informative summary of the picture.",
)
DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Can you elaborate on the elements of the picture provided?",
    "Explain the various aspects of the image before you.",
)
_CHAT_QUESTIONS = {
    "modality": (
        "Can you tell me what kind of image this is?",
        "Which imaging technique was used to acquire this image?",
    ),
    "count": ("Can you count the lesions in this image?", "How many abnormalities can you see in the image?"),
    "side": ("Where are the lesions located in the image?", "Can you tell me on which side the abnormality is found?"),
    "size": ("How would you describe the size of the lesions?", "Can you comment on the lesion size?"),
    "intensity": (
        "How do the lesions appear compared with the surrounding tissue?",
        "What is the appearance of the lesions?",
    ),
}
CHAT_KINDS: tuple[str, ...] = tuple(_CHAT_QUESTIONS)


def chat_answer(kind: str, f: Factors) -> str:
    """A full-sentence answer (containing the short answer word) for a conversational question kind."""
    plural = f.count > 1
    it = "The lesions are" if plural else "The lesion is"
    if kind == "modality":
        return f"This is {_MOD_SENTENCE[f.modality]}."
    if kind == "count":
        return f"There {'are' if plural else 'is'} {NUM_WORD[f.count]} lesion{'s' if plural else ''} in the image."
    if kind == "side":
        if f.side == "both":
            return f"There are lesions on both sides of the image, {NUM_WORD[f.count]} in total."
        return f"{it} on the {f.side} side of the image."
    if kind == "size":
        return f"{it} {f.size}."
    if kind == "intensity":
        return f"{it} {f.intensity} compared with the surrounding tissue."
    raise ValueError(f"unknown chat kind {kind!r}")


def chat_question(kind: str, rng: np.random.Generator) -> str:
    """One conversational phrasing of a question kind."""
    options = _CHAT_QUESTIONS[kind]
    return options[int(rng.integers(len(options)))]


def _with_image(text: str, rng: np.random.Generator) -> str:
    # LLaVA-Med's files put the placeholder at either end of the first human turn.
    return f"<image>\n{text}" if rng.integers(2) else f"{text}\n<image>"


def alignment_turns(f: Factors, rng: np.random.Generator, cap: str) -> list[dict]:
    """The two-turn alignment conversation: a brief-description prompt and the caption."""
    prompt = ALIGNMENT_PROMPTS[int(rng.integers(len(ALIGNMENT_PROMPTS)))]
    return [{"from": "human", "value": _with_image(prompt, rng)}, {"from": "gpt", "value": cap}]


def instruct_turns(f: Factors, rng: np.random.Generator) -> list[dict]:
    """A multi-turn (2-4 QA pairs) instruction conversation about the image."""
    n_pairs = int(rng.integers(2, 5))
    pool = ["describe", *CHAT_KINDS, "closed_side"]
    kinds = [pool[int(i)] for i in rng.choice(len(pool), size=n_pairs, replace=False)]
    turns = []
    for kind in kinds:
        if kind == "describe":
            q, a = DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))], description(f)
        elif kind == "closed_side":
            side = ("left", "right")[int(rng.integers(2))]
            q = f"Is there any lesion on the {side} side of the image?"
            where = chat_answer("side", f)
            a = f"{'Yes' if closed_truth('has', side, f) else 'No'}, {where[0].lower()}{where[1:]}"
        else:
            q, a = chat_question(kind, rng), chat_answer(kind, f)
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    turns[0]["value"] = _with_image(turns[0]["value"], rng)
    return turns
