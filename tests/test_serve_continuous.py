"""The servers' continuous batcher: requests join a running batch and leave it; cancelling one row; /health."""

from __future__ import annotations

import threading

import httpx

from medvlm.data.schema import Message, Sample
from medvlm.infer.batching import BatchResult
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.model.build import build_preset
from medvlm.serve.api import ApiConfig, create_app
from medvlm.serve.batching import BatcherConfig, DynamicBatcher
from medvlm.serve.server import BackgroundServer
from serve_helpers import data_url, image_bytes

QUESTIONS = [
    "Tell me everything about this chest radiograph.",
    "Which organ?",
    "Describe the findings in the left lower lobe in detail, please.",
    "Is it normal?",
]


class Tracker:
    """Collects one request's deltas and result; ``started`` is set at its first delta."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.result: BatchResult | None = None
        self.started, self.done = threading.Event(), threading.Event()

    def on_delta(self, d: str) -> None:
        self.deltas.append(d)
        self.started.set()

    def on_done(self, r: BatchResult) -> None:
        self.result = r
        self.started.set()
        self.done.set()


def _engine() -> InferenceEngine:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=7)
    return InferenceEngine(model, processor, prefix_cache_bytes=0)


def _sample(q: str) -> Sample:
    return Sample(id="q", messages=[Message.from_text("user", q)])


def test_a_request_joining_a_running_batch_gets_its_answer_alone_and_a_cancelled_row_disturbs_nobody() -> None:
    engine = _engine()
    limits = [40, 6, 40, 10]
    alone = [engine.generate([_sample(q)], GenerationSettings(max_new_tokens=n))[0] for q, n in zip(QUESTIONS, limits)]
    assert all(len(a) >= 20 for a in (alone[0], alone[2])), alone  # long answers: they are still running below
    batcher = DynamicBatcher(engine, BatcherConfig(max_batch=4, max_wait_ms=0)).start()
    t = [Tracker() for _ in QUESTIONS]
    jobs: dict[int, object] = {}

    def submit(i: int) -> None:
        jobs[i] = batcher.submit(
            engine.prepare(_sample(QUESTIONS[i])),
            GenerationSettings(max_new_tokens=limits[i]),
            on_delta=t[i].on_delta,
            on_done=t[i].on_done,
        )

    # Deterministic timing: the callbacks run in the model thread between two decoding steps.
    def row0_delta(d: str) -> None:
        Tracker.on_delta(t[0], d)
        if len(t[0].deltas) == 2:
            submit(1)  # joins at the next step, while rows 0 and 2 are mid-answer

    def victim_delta(d: str) -> None:
        Tracker.on_delta(t[2], d)
        if len(t[2].deltas) == 3:
            jobs[2].cancel()  # a stream cancelled mid-batch
            submit(3)

    t[0].on_delta, t[2].on_delta = row0_delta, victim_delta
    try:
        submit(0)
        submit(2)
        for i in range(4):
            assert t[i].done.wait(60)
        for i in (0, 1, 3):
            assert t[i].result.text == alone[i] and "".join(t[i].deltas) == alone[i]
            assert t[i].result.finish_reason in ("stop", "length")
        assert t[2].result.finish_reason == "cancelled"
        assert alone[2].startswith("".join(t[2].deltas))  # what it streamed before the cancel was its true answer
        assert batcher.largest_batch == 3 and batcher.requests_run == 4 and batcher.queue_length == 0
    finally:
        batcher.stop()


def test_health_reports_the_prefix_cache_and_repeated_images_hit_it() -> None:
    model, processor = build_preset("tiny", projector="mlp2x_gelu", seed=7)
    budget = 600_000  # room for both prompts (64 image tokens each in the tiny preset)
    engine = InferenceEngine(model, processor, prefix_cache_bytes=budget)
    config = ApiConfig(model_name="tiny-med", batcher=BatcherConfig(max_batch=4, max_wait_ms=0))
    image = data_url(image_bytes("PNG"))
    with BackgroundServer(create_app(engine, config)) as srv:
        answers = []
        for q in ("What is shown?", "Which organ is shown here?", "What is shown?"):
            body = {
                "model": "tiny-med",
                "max_tokens": 6,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": q}],
                    }
                ],
            }
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200
            answers.append(r.json()["choices"][0]["message"]["content"])
        health = httpx.get(srv.url + "/health", timeout=10).json()
    cache = health["prefix_cache"]
    assert answers[0] == answers[2]
    assert cache["misses"] == 1 and cache["hits"] == 2 and cache["hit_tokens"] > 2 * processor.image_seq_length
    assert 0 < cache["bytes"] <= cache["budget_bytes"] == budget
    assert health["queue_length"] == 0 and health["requests_run"] == 3


def test_loop_mailbox_delivers_each_step_in_one_wakeup_in_order_and_refuses_after_close() -> None:
    import asyncio

    from medvlm.serve.api import LoopMailbox

    async def run() -> tuple[list, list, int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal wakeups
            wakeups += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting  # instance attribute on this test's own loop only
        box = LoopMailbox(loop)
        qa, qb = asyncio.Queue(), asyncio.Queue()

        def model_thread() -> None:  # two rows, 50 steps: one event per row per step, a flush after each step
            for i in range(50):
                assert box.post(qa, ("delta", i))
                assert box.post(qb, ("delta", -i))
                box.flush()
            box.flush()  # nothing new: no wake-up

        t = threading.Thread(target=model_thread)
        t.start()
        got_a = [(await qa.get())[1] for _ in range(50)]
        got_b = [(await qb.get())[1] for _ in range(50)]
        t.join()
        return got_a, got_b, wakeups

    got_a, got_b, wakeups = asyncio.run(run())
    assert got_a == list(range(50)) and got_b == [-i for i in range(50)]
    assert wakeups == 50  # one per step, not one per row per step

    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    loop.close()
    assert box.post(asyncio.Queue(), ("delta", "x")) is False  # the server's loop is gone: the row gets cancelled
