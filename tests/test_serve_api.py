"""``medvlm serve api``: the official openai client against a live server; every bad input's status."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from medvlm.data.images import load_image
from medvlm.data.schema import Message, Sample
from medvlm.infer.engine import GenerationSettings
from medvlm.notice import NOTICE, SHORT_NOTICE
from medvlm.serve.api import ApiConfig, create_app, load_engine
from medvlm.serve.batching import BatcherConfig
from medvlm.serve.images import ImageLimits
from medvlm.serve.server import BackgroundServer
from serve_helpers import data_url, image_bytes, png_bomb, tiny_checkpoint

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(str(tiny_checkpoint(tmp_path_factory)))


@pytest.fixture(scope="module")
def server(engine):
    config = ApiConfig(
        model_name="tiny-med",
        api_key=KEY,
        max_images=2,
        limits=ImageLimits(max_bytes=300_000, max_pixels=2_000_000),
        batcher=BatcherConfig(max_batch=8, max_wait_ms=20),
    )
    with BackgroundServer(create_app(engine, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _jpeg_url(shared_dir: Path) -> str:
    return data_url((shared_dir / "images" / "synpic42202.jpg").read_bytes(), "image/jpeg")


def test_models_and_notice(client: openai.OpenAI, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-med"]
    r = httpx.get(server.url + "/v1/models", headers=AUTH)
    assert r.json()["notice"] == NOTICE and r.json()["data"][0]["notice"] == NOTICE
    assert r.headers["x-medvlm-notice"] == SHORT_NOTICE


def test_text_image_and_stream_match_the_engine(client: openai.OpenAI, engine, shared_dir: Path) -> None:
    image = shared_dir / "images" / "synpic42202.jpg"
    question = "Is there evidence of an aortic aneurysm?"
    expected = engine.generate(
        [Sample(id="x", messages=[Message.from_text("user", "<image>\n" + question)], images=["i"])],
        GenerationSettings(max_new_tokens=12),
        images=[[load_image(image)]],
    )[0]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _jpeg_url(shared_dir)}},
                {"type": "text", "text": question},
            ],
        }
    ]
    r = client.chat.completions.create(model="tiny-med", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.prompt_tokens > 16  # the image's 16 tokens are part of the prompt
    chunks = list(
        client.chat.completions.create(
            model="tiny-med", messages=msgs, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == r.usage.total_tokens
    # plain text content, a system prompt and multi-turn with the image in the first turn
    r2 = client.chat.completions.create(
        model="tiny-med",
        max_tokens=8,
        messages=[
            {"role": "system", "content": "You are terse."},
            *msgs,
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "And the heart?"},
        ],
    )
    assert isinstance(r2.choices[0].message.content, str) and r2.choices[0].message.content
    # a stop string cuts the answer
    words = expected.split()
    if len(words) >= 3:
        cut = client.chat.completions.create(model="tiny-med", messages=msgs, max_tokens=12, stop=[words[2]])
        assert cut.choices[0].message.content == expected[: expected.find(words[2])].strip()


def test_concurrent_greedy_requests_are_batched_and_equal_unbatched(client, engine, server) -> None:
    questions = [f"Describe finding number {i} in detail." for i in range(6)]
    limits = [6, 9, 12, 6, 9, 12]
    expected = [
        engine.generate(
            [Sample(id="q", messages=[Message.from_text("user", q)])], GenerationSettings(max_new_tokens=n)
        )[0]
        for q, n in zip(questions, limits)
    ]
    batcher = server.server.config.app.state.batcher
    got: list[str | None] = [None] * len(questions)

    def ask(i: int) -> None:
        r = client.chat.completions.create(
            model="tiny-med", max_tokens=limits[i], messages=[{"role": "user", "content": questions[i]}]
        )
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    # The fixture's 20 ms window is a race on a loaded machine: here the first request waits up to 2 s for the
    # others, so they must meet in one batch.
    old_config, batcher.config = batcher.config, dataclasses.replace(batcher.config, max_wait_ms=2000.0)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batcher.config = old_config
    assert got == expected
    assert batcher.largest_batch > 1


BAD_CASES = [
    ("schema: no messages", {"model": "tiny-med", "messages": []}, 400),
    ("schema: wrong type", {"model": "tiny-med", "messages": "hello"}, 400),
    ("schema: n=2", {"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    (
        "schema: temperature",
        {"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
    ),
    ("last turn assistant", {"model": "tiny-med", "messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("bad base64", {"image": "data:image/png;base64,@@@notbase64@@@"}, 400),
    ("not an image", {"image": data_url(b"just some text, not pixels" * 10)}, 400),
    ("truncated image", {"image": data_url(image_bytes("PNG")[:60])}, 400),
    ("local file path", {"image": "/etc/passwd"}, 400),
    ("file url", {"image": "file:///etc/passwd"}, 400),
    ("remote url disabled", {"image": "http://127.0.0.1:9/x.png"}, 400),
    ("too many images", {"images": 3}, 400),
    ("too many bytes", {"image": data_url(b"\x89PNG" + b"\0" * 400_000)}, 413),
    ("decompression bomb", {"image": data_url(png_bomb())}, 413),
    ("too many pixels", {"image": data_url(image_bytes("PNG", (1600, 1300)))}, 413),
    ("prompt too long", {"text": "lung " * 3000}, 422),
    ("max_tokens too large", {"max_tokens": 5000}, 422),
    ("image tag in text", {"text": "look <image> here"}, 400),
]


def _body(spec: dict) -> dict:
    if "model" in spec:
        return spec
    content: list[dict] = []
    for _ in range(spec.get("images", 0)):
        content.append({"type": "image_url", "image_url": {"url": data_url(image_bytes("PNG"))}})
    if "image" in spec:
        content.append({"type": "image_url", "image_url": {"url": spec["image"]}})
    content.append({"type": "text", "text": spec.get("text", "What is shown?")})
    body = {"model": "tiny-med", "messages": [{"role": "user", "content": content}]}
    if "max_tokens" in spec:
        body["max_tokens"] = spec["max_tokens"]
    return body


@pytest.mark.parametrize("name,spec,status", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_gets_its_status_and_the_server_stays_up(server, name: str, spec: dict, status: int) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=_body(spec), headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert r.headers["x-medvlm-notice"] == SHORT_NOTICE
    ok = httpx.post(
        server.url + "/v1/chat/completions",
        headers=AUTH,
        timeout=30,
        json={"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert ok.status_code == 200


def test_auth_errors_and_body_limit(server) -> None:
    body = {"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{" + b" " * 3_000_000 + b"}", headers=AUTH)
    assert r.status_code == 413
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_disconnect_cancels_generation(server) -> None:
    batcher = server.server.config.app.state.batcher
    body = {
        "model": "tiny-med",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 1800,
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # the connection is closed: the row must stop long before 1800 tokens are generated
    deadline = time.monotonic() + 10
    while batcher.queue_length and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.queue_length == 0
    assert time.monotonic() - started < 10


def test_queue_full_is_503_and_the_server_recovers(engine) -> None:
    config = ApiConfig(model_name="tiny-med", batcher=BatcherConfig(max_batch=1, max_queue=1))
    with BackgroundServer(create_app(engine, config)) as srv:
        long_body = {
            "model": "tiny-med",
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 1800,
            "stream": True,
        }
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long_body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            # the long request is generating and holds the only queue slot
            assert srv.server.config.app.state.batcher.queue_length == 1
            busy = httpx.post(
                srv.url + "/v1/chat/completions",
                timeout=30,
                json={"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert busy.status_code == 503 and busy.headers.get("retry-after") == "1"
            assert busy.json()["error"]["type"] == "server_overloaded"
        deadline = time.monotonic() + 10
        while srv.server.config.app.state.batcher.queue_length and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = httpx.post(
            srv.url + "/v1/chat/completions",
            timeout=30,
            json={"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert ok.status_code == 200
