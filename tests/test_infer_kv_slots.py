"""The running batch's KV cache in row slots: rows join and leave without disturbing the others, within a budget."""

from __future__ import annotations

import torch

from medvlm.data.schema import Message, Sample
from medvlm.infer.batching import BatchRequest, BatchResult
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.kv import KVBuffer, compact_row
from medvlm.model.build import build_preset

QUESTIONS = [
    "Describe a normal chest radiograph.",
    "Which organ?",
    "Is there an effusion on the left side of the chest, near the costophrenic angle?",
    "What modality?",
    "List three signs of pneumonia.",
]


def rows_of(kv: KVBuffer) -> list[list[torch.Tensor]]:
    """Each live row's real columns, per layer and for keys then values."""
    layers, mask = kv.layers(), kv.mask()
    return [[t for kvs in compact_row(layers, mask, b) for t in kvs] for b in range(kv.rows)]


def random_rows(n: int, width: int, real: list[int], seed: int) -> tuple[list, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(n, 2, width, 4, generator=g), torch.randn(n, 2, width, 4, generator=g)) for _ in range(2)]
    mask = torch.zeros(n, width, dtype=torch.bool)
    for b, r in enumerate(real):
        mask[b, width - r :] = True
    return layers, mask


def test_rows_keep_their_columns_through_joins_leaves_growth_and_compaction() -> None:
    layers, mask = random_rows(2, 5, [5, 3], seed=0)
    kv = KVBuffer(layers, room=2, mask=mask, rows=2)
    kv.max_rows = 4
    expect = rows_of(kv)
    wide, wide_mask = random_rows(2, 9, [9, 4], seed=1)  # wider than the buffer: it shifts right
    kv.add_rows(wide, wide_mask)
    assert kv.rows == 4 and kv.length == 9 and kv.capacity[0] == 4
    expect += [[t for kvs in compact_row(wide, wide_mask, b) for t in kvs] for b in range(2)]
    for got, want in zip(rows_of(kv), expect):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    kv.reserve(3)  # a decoding step's column, beyond the capacity: grows
    step = [(torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)) for _ in range(2)]
    kv.mask_buf[:4, kv.length] = True
    start = kv.length
    for i, (k, v) in enumerate(step):
        kv.append(i, k, v, start)
    kv.length += 1
    expect = [
        [torch.cat([t, s], dim=2) for t, s in zip(row, [x[b : b + 1] for kvs in step for x in kvs])]
        for b, row in enumerate(expect)
    ]
    order = kv.remove_rows([0, 2])  # the last row moves into slot 0
    assert order == [3, 1] and kv.rows == 2
    expect = [expect[i] for i in order]
    assert kv.length == 10
    kv.compact()
    assert kv.length == 5  # the survivors' 4 and 3 real columns end together, plus the step's column
    assert bool(kv.mask().any(dim=0).all())  # every remaining column is used by a live row
    for got, want in zip(rows_of(kv), expect):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def _engine() -> InferenceEngine:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=5)
    return InferenceEngine(model, processor)


def _prompt(engine: InferenceEngine, i: int):
    q = QUESTIONS[i % len(QUESTIONS)] + (" Answer briefly." if i % 3 else "")
    return engine.prepare(Sample(f"q{i}", [Message.from_text("user", q)], []))


def test_a_closed_loop_of_joins_and_leaves_stays_within_the_slot_budget_and_answers_as_alone() -> None:
    engine = _engine()
    limits = [3 + (5 * i) % 9 for i in range(150)]
    alone: dict[tuple[int, int], str] = {}  # (prompt, limit) -> the answer alone
    for i in range(45):
        key = (i % 15, limits[i])
        one = engine.batcher(max_batch=1)
        settings = GenerationSettings(max_new_tokens=limits[i])
        one.add(BatchRequest(_prompt(engine, i), settings, on_done=lambda r, key=key: alone.__setitem__(key, r.text)))
        one.run()
    got: dict[int, str] = {}
    b = engine.batcher(max_batch=3)
    queue = list(range(len(limits)))

    def submit() -> None:
        i = queue.pop(0)

        def done(res: BatchResult, i: int = i) -> None:
            got[i] = res.text
            if queue:
                submit()  # a closed-loop client: the next request joins at the very next step

        b.add(BatchRequest(_prompt(engine, i), GenerationSettings(max_new_tokens=limits[i]), on_done=done))

    for _ in range(3):
        submit()
    widest = max(_prompt(engine, i).num_tokens for i in range(len(QUESTIONS) * 3)) + max(limits)
    while not b.idle:
        b.step()
        if b.kv is not None:
            rows, cols = b.kv.capacity
            assert rows <= 3 and b.kv.rows <= 3
            assert b.kv.length <= 1.5 * widest, (b.kv.length, widest)  # dead columns are dropped as rows leave
            assert cols <= 3 * widest, (cols, widest)
    assert b.steps > 1.5 * widest  # long enough that a cache growing by a column a step would break the bound
    assert got == {i: alone[(i % 15, limits[i])] for i in range(len(limits))}


def test_a_cancelled_row_frees_its_slot_for_the_waiting_request_at_the_next_step() -> None:
    engine = _engine()
    got: dict[str, BatchResult] = {}
    reqs = {
        name: BatchRequest(
            _prompt(engine, i),
            GenerationSettings(max_new_tokens=30),
            on_done=lambda r, name=name: got.__setitem__(name, r),
        )
        for name, i in (("a", 0), ("b", 4), ("c", 2))
    }
    b = engine.batcher(max_batch=2)
    for r in reqs.values():
        b.add(r)
    for _ in range(3):
        b.step()
    assert [r.req for r in b.rows] == [reqs["a"], reqs["b"]] and len(b.waiting) == 1
    reqs["a"].cancel()
    b.step()
    assert got["a"].finish_reason == "cancelled"
    assert {id(r.req) for r in b.rows} == {id(reqs["b"]), id(reqs["c"])}  # c took a's slot in the same step
    assert b.kv.rows == 2 and b.kv.capacity[0] == 2
    b.run()
    for name in ("b", "c"):
        one = engine.batcher(max_batch=1)
        alone: list[BatchResult] = []
        one.add(BatchRequest(reqs[name].prompt, GenerationSettings(max_new_tokens=30), on_done=alone.append))
        one.run()
        assert got[name].text == alone[0].text
