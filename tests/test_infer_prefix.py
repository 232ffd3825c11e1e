"""Shared-prefix reuse and continuous batching: greedy answers equal transformers' one-at-a-time generate.

The reference is an independent path: ``model.generate`` on each full prompt alone (no prefix reuse,
no batch). Mixed prefixes: different images, system prompts, multi-image and text-only prompts and
questions of very different lengths, for every template, each projector, im_start/im_end on and off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.infer.batching import BatchRequest, BatchResult
from medvlm.infer.decoding import visible_text
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.kv import PrefixCache, usable_prefix
from medvlm.model.build import build_preset

IMAGES = ["synpic42202.jpg", "synpic32933.jpg", "xy_chromosome.jpg"]
LONG = (
    "Looking carefully at the region of the left lower lobe near the costophrenic angle, and taking into account "
    "the patient's history of smoking and the prior imaging study, is there any sign of a mass or effusion?"
)


def mixed_samples() -> list[Sample]:
    """Several questions per image (short and very long), other images, a system prompt, multi-image, text-only."""

    def user(images: int, text: str) -> Message:
        return Message("user", [image_part() for _ in range(images)] + [text_part(text)])

    out = []
    for k, img in enumerate(IMAGES[:2]):
        for q in ("Which organ?", LONG, "Is it normal?", "What modality was used to take this image of the patient?"):
            out.append(Sample(f"{k}-{len(out)}", [user(1, q)], [img]))
    system = Message("system", [text_part("You are a careful radiology assistant. Answer briefly.")])
    out.append(Sample("sys1", [system, user(1, "Which organ?")], [IMAGES[0]]))
    out.append(Sample("sys2", [system, user(1, LONG)], [IMAGES[0]]))
    out.append(Sample("two", [user(2, "Compare the two images.")], IMAGES[1:3]))
    out.append(Sample("text", [user(0, "Describe what a normal chest radiograph shows.")], []))
    out.append(Sample("third", [user(1, "Where?")], [IMAGES[2]]))
    return out


def reference(engine: InferenceEngine, sample: Sample, settings: GenerationSettings, folder: Path) -> str:
    """transformers' generate on the whole prompt, alone (the path the engine must reproduce)."""
    p = engine.prepare(sample, image_folder=folder)
    tok = engine.processor.tokenizer
    out = engine.model.generate(
        input_ids=p.input_ids[None],
        attention_mask=torch.ones(1, p.num_tokens, dtype=torch.long),
        pixel_values=p.pixel_values,
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        suppress_tokens=engine.suppress_ids,
        pad_token_id=engine.processor.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    new = out[0, p.num_tokens :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return visible_text(engine.processor.decode(new), engine.stop_strings(settings), final=True)


CASES = [  # (template, projector, im_start_end): every template, each projector, both layouts
    ("vicuna_v1", "mlp2x_gelu", False),
    ("llava_med_v0", "linear", True),
    ("mistral_instruct", "cluster", False),
    ("v1_sq", "mlp2x_gelu", True),
    ("plain", "linear", False),
    ("chatml", "cluster", True),
]


@pytest.mark.parametrize(
    "template,projector,im_se", CASES, ids=[f"{t}-{p}-{'se' if s else 'nose'}" for t, p, s in CASES]
)
def test_prefix_reuse_equals_one_at_a_time(template: str, projector: str, im_se: bool, shared_dir: Path) -> None:
    model, processor = build_preset("tiny", projector=projector, template=template, mm_use_im_start_end=im_se, seed=3)
    engine = InferenceEngine(model, processor, batch_size=4)  # fewer rows than questions: rows join as others end
    folder = shared_dir / "images"
    settings = GenerationSettings(max_new_tokens=10)
    samples = mixed_samples()
    expected = [reference(engine, s, settings, folder) for s in samples]
    assert engine.generate(samples, settings, image_folder=folder) == expected
    # Asked again: prompts now reuse cached prefixes, answers unchanged.
    assert engine.generate(samples, settings, image_folder=folder) == expected
    info = engine.prefix_cache.info()
    if template == "plain":  # '<s><image>' and nothing else: the prompt is its own image prefix, nothing to share
        assert info["inserts"] == 0
    else:  # each distinct image prefix computed once, then served from the cache
        assert info["inserts"] == 5 and info["hits"] >= len(samples) - 1


def _request(engine: InferenceEngine, sample: Sample, folder: Path, n: int, got: dict, key) -> BatchRequest:
    deltas: list[str] = []

    def done(res: BatchResult) -> None:
        got[key] = (res, "".join(deltas))

    return BatchRequest(
        prompt=engine.prepare(sample, image_folder=folder),
        settings=GenerationSettings(max_new_tokens=n),
        on_delta=deltas.append,
        on_done=done,
    )


def test_joining_a_running_batch_and_cancelling_a_row(shared_dir: Path) -> None:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=5)
    engine = InferenceEngine(model, processor, prefix_cache_bytes=0)  # no cache: joins run their whole prompt
    folder = shared_dir / "images"
    samples = mixed_samples()
    alone = {
        i: reference(engine, samples[i], GenerationSettings(max_new_tokens=n), folder)
        for i, n in ((0, 20), (1, 20), (9, 8), (11, 12))
    }
    got: dict = {}
    b = engine.batcher(max_batch=4)
    b.add(_request(engine, samples[0], folder, 20, got, 0))
    b.add(_request(engine, samples[1], folder, 20, got, 1))
    victim = _request(engine, samples[4], folder, 20, got, "victim")
    b.add(victim)
    for _ in range(3):
        b.step()
    assert len(b.rows) == 3
    b.add(_request(engine, samples[9], folder, 8, got, 9))  # joins at the next step, mid-answer for the others
    b.step()
    assert len(b.rows) == 4
    victim.cancel()
    b.step()
    assert len(b.rows) == 3 and got["victim"][0].finish_reason == "cancelled"  # freed at once
    b.add(_request(engine, samples[11], folder, 12, got, 11))
    b.run()
    for i, text in alone.items():
        res, streamed = got[i]
        assert res.text == text and streamed == text
        assert res.finish_reason in ("stop", "length")
    assert b.largest_batch == 4


def test_chat_turns_reuse_the_conversation(shared_dir: Path) -> None:
    from medvlm.data.images import load_image
    from medvlm.serve.chat import ChatSession

    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=5)
    engine = InferenceEngine(model, processor)
    fresh = InferenceEngine(model, processor, prefix_cache_bytes=0)
    image = load_image(shared_dir / "images" / "synpic42202.jpg")
    settings = GenerationSettings(max_new_tokens=8)
    session = ChatSession(engine, settings, [image])
    for turn, q in enumerate(("What is shown?", "Which side?", "Anything else?")):
        before = engine.prefix_cache.info()["hit_tokens"]
        sample = Sample(
            "c",
            [*session.history, Message("user", ([] if session.history else [image_part()]) + [text_part(q)])],
            ["i"],
        )
        prompt_len = engine.prepare(sample, images=[image]).num_tokens
        expected = fresh.generate([sample], settings, images=[[image]])[0]
        assert session.ask(q) == expected
        reused = engine.prefix_cache.info()["hit_tokens"] - before
        if turn:  # the earlier turns (image included) came from the cache: only the new tokens were computed
            assert reused >= prompt_len - 32, (reused, prompt_len)


def _entry(n: int, heads: int = 2) -> list:
    return [(torch.zeros(1, heads, n, 4), torch.zeros(1, heads, n, 4))]


def test_prefix_cache_stays_within_its_budget_and_evicts_lru() -> None:
    per_token = 2 * 2 * 4 * 4  # keys + values, 2 heads x 4 dims, float32
    cache = PrefixCache(budget_bytes=100 * per_token)
    for i, n in enumerate([30, 40, 20, 50, 10, 60, 99, 101, 5]):
        ok = cache.insert(torch.arange(n) + 1000 * i, (), (), _entry(n))
        assert ok == (n * per_token <= cache.budget_bytes)
        assert cache.nbytes <= cache.budget_bytes
        assert cache.nbytes == sum(e.nbytes for e in cache._entries.values())
    assert cache.info()["rejected"] == 1 and cache.info()["evictions"] > 0
    # LRU: a looked-up entry survives the next eviction
    cache = PrefixCache(budget_bytes=30 * per_token)
    for i in range(3):
        cache.insert(torch.arange(10) + 100 * i, (), (), _entry(10))
    assert cache.lookup(torch.arange(12), (), (), limit=11)[0] == 10  # entry 0 used
    cache.insert(torch.arange(10) + 900, (), (), _entry(10))  # evicts entry 1, the least recently used
    assert cache.lookup(torch.arange(10) + 100, (), (), limit=9)[0] == 0
    assert cache.lookup(torch.arange(10), (), (), limit=9)[0] == 9
    # An entry that extends another replaces it (a chat's next turn): one entry, still serving the shorter prompt.
    cache = PrefixCache(budget_bytes=100 * per_token)
    cache.insert(torch.arange(10), (), (), _entry(10))
    cache.insert(torch.arange(25), (), (), _entry(25))
    assert len(cache) == 1 and cache.nbytes == 25 * per_token
    assert cache.lookup(torch.arange(12), (), (), limit=11)[0] == 11


def test_indexed_lookup_equals_a_scan_of_every_entry() -> None:
    """Entries are indexed by first image and text head; the answer must equal checking every entry."""
    import random

    rng = random.Random(0)
    heads = [[1, 2, 3], [1, 2, 4, 5], [], [1, 2]]

    def prompt() -> tuple[torch.Tensor, tuple, tuple]:
        head = rng.choice(heads)
        if rng.random() < 0.2:  # text only
            return torch.tensor(head + [rng.randrange(6, 9) for _ in range(rng.randrange(1, 5))]), (), ()
        n_img = rng.choice([1, 1, 2])
        ids, spans, digests = list(head), [], []
        for _ in range(n_img):
            spans.append((len(ids), len(ids) + 3))
            ids += [99, 99, 99]
            digests.append(rng.choice("abc"))
            ids += [rng.randrange(6, 9) for _ in range(rng.randrange(0, 3))]
        ids += [rng.randrange(6, 9) for _ in range(rng.randrange(1, 5))]
        return torch.tensor(ids), tuple(spans), tuple(digests)

    cache = PrefixCache(budget_bytes=1 << 30)
    for _ in range(300):
        ids, spans, digests = prompt()
        if rng.random() < 0.5:
            cache.insert(ids, spans, digests, _entry(len(ids)))
            continue
        floor = spans[-1][1] if spans and rng.random() < 0.5 else 0
        scan = [
            usable_prefix(e.ids, e.spans, e.digests, ids, spans, digests, len(ids) - 1) for e in cache._entries.values()
        ]
        expected = max([n for n in scan if n >= floor], default=0)
        assert cache.lookup(ids, spans, digests, limit=len(ids) - 1, floor=floor)[0] == expected
    assert len(cache) > 20 and cache.nbytes == sum(e.nbytes for e in cache._entries.values())


def test_usable_prefix_never_reuses_another_image_or_cuts_one() -> None:
    ids = torch.tensor([1, 2, 9, 9, 9, 3, 4, 5])
    spans, digests = ((2, 5),), ("a",)
    assert usable_prefix(ids, spans, digests, ids, spans, digests, limit=7) == 7
    assert usable_prefix(ids, spans, digests, ids, spans, ("b",), limit=7) == 2  # other pixels: stop before the image
    assert usable_prefix(ids, spans, digests, ids, spans, digests, limit=4) == 2  # never inside an image block
    other = torch.tensor([1, 2, 9, 9, 9, 3, 7, 7])
    assert usable_prefix(ids, spans, digests, other, spans, digests, limit=7) == 6
    assert usable_prefix(ids, (), (), torch.tensor([8, 1]), (), (), limit=1) == 0


def test_rows_leave_as_they_end_and_waiting_requests_take_their_place_in_order(shared_dir: Path) -> None:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=5)
    engine = InferenceEngine(model, processor, prefix_cache_bytes=0)
    folder = shared_dir / "images"
    samples = mixed_samples()
    finished: list[tuple[int, int, str]] = []  # (request, decoding step it ended at, reason)
    b = engine.batcher(max_batch=2)
    limits = [3, 12, 3, 3]
    for i, n in enumerate(limits):

        def done(res: BatchResult, i: int = i) -> None:
            finished.append((i, b.steps, res.finish_reason))

        b.add(
            BatchRequest(
                prompt=engine.prepare(samples[i], image_folder=folder),
                settings=GenerationSettings(max_new_tokens=n),
                on_done=done,
            )
        )
    b.run()
    assert [f[2] for f in finished] == ["length"] * 4
    # The short requests do not wait for the long one: each takes the row freed by the one before it (FIFO).
    assert [f[0] for f in finished] == [0, 2, 3, 1]
    # A freed row is refilled in the very next step (first token at admission, then one per decoding step).
    assert [f[1] for f in finished] == [2, 4, 6, 11]
