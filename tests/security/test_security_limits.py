"""Keys on every route, start-up refusals, limit order (queue before decoding), decode slots, lock-free tokenising."""

from __future__ import annotations

import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from medvlm.cli import main
from medvlm.serve.admission import DecodeGate
from medvlm.serve.api import ApiConfig, create_app, load_engine
from medvlm.serve.batching import BatcherConfig
from medvlm.serve.controller import ControllerConfig, create_controller_app
from medvlm.serve.openai_schema import ChatCompletionRequest
from medvlm.serve.remote import address_allowed
from medvlm.serve.server import BackgroundServer
from medvlm.serve.worker import WorkerConfig, create_worker_app
from serve_helpers import data_url, image_bytes, tiny_checkpoint

KEY = "limits-key-0123456789"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(str(tiny_checkpoint(tmp_path_factory)))


def _apps(engine):
    yield "api", create_app(engine, ApiConfig(model_name="tiny-med", api_key=KEY))
    yield "controller", create_controller_app(ControllerConfig(secret=KEY))
    yield (
        "worker",
        create_worker_app(
            engine,
            WorkerConfig(
                controller_url="http://127.0.0.1:1",
                worker_url="http://x:1",
                model_name="tiny-med",
                register=False,
                secret=KEY,
            ),
        ),
    )


def test_no_route_answers_without_the_key(engine) -> None:
    for name, app in _apps(engine):
        client = TestClient(app, raise_server_exceptions=False)  # no lifespan: nothing but the guard is needed
        routes = [r for r in app.routes if isinstance(r, Route)]
        assert len(routes) >= 3, name  # /docs, /openapi.json and the app's own routes
        for route in routes:
            path = route.path.replace("{", "").replace("}", "")
            for method in sorted(route.methods or {"GET"}):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                    r = client.request(method, path, headers=headers, json={})
                    assert r.status_code == 401, (name, method, path, headers, r.status_code)
        assert client.get("/no/such/route").status_code == 401  # unknown paths do not tell 404 from 401 either
        ok = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, name


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "api", "--model", "/nonexistent", "--host", "0.0.0.0"],
        ["serve", "controller", "--host", "0.0.0.0"],
        ["serve", "worker", "--controller", "http://127.0.0.1:1", "--model", "/nonexistent", "--host", "0.0.0.0"],
        ["serve", "web", "--api", "http://127.0.0.1:1", "--host", "0.0.0.0"],
    ],
    ids=["api", "controller", "worker", "web"],
)
def test_non_loopback_bind_without_auth_is_refused_at_start(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--insecure-no-auth" in capsys.readouterr().err


def test_web_never_lends_a_key_to_visitors_beyond_loopback(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDVLM_LIMITS_KEY", KEY)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "serve",
                "web",
                "--api",
                "http://127.0.0.1:1",
                "--api-key-env",
                "MEDVLM_LIMITS_KEY",
                "--host",
                "0.0.0.0",
                "--insecure-no-auth",
            ]
        )
    assert e.value.code == 2 and "--auth-env" in capsys.readouterr().err


def test_the_queue_is_checked_before_any_image_is_decoded(engine) -> None:
    config = ApiConfig(model_name="tiny-med", batcher=BatcherConfig(max_batch=1, max_queue=1))
    with BackgroundServer(create_app(engine, config)) as srv:
        service = srv.server.config.app.state.service
        long_body = {
            "model": "tiny-med",
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 1800,
            "stream": True,
        }
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long_body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)  # the text-only request holds the only queue slot (and never took a decode slot)
            image = data_url(image_bytes("PNG", (2000, 2000)))
            body = {
                "model": "tiny-med",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "?"}],
                    }
                ],
            }
            busy = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert service.gate.most_active == 0  # the refused request's image was never decoded


def test_decode_slots_bound_concurrent_decodes() -> None:
    gate = DecodeGate(max_decoded_bytes=1 << 30, max_concurrent=2)
    start = threading.Barrier(6)

    def decode(_: int) -> None:
        start.wait()
        with gate.slot():
            time.sleep(0.2)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(decode, range(6)))
    assert gate.most_active == 2 and gate.active == 0


def test_tokenising_is_safe_without_a_shared_lock(engine) -> None:
    """Prompts near the character cap and tiny ones, prepared concurrently, encode exactly as one at a time."""
    # context_length only so the long prompts are not refused as longer than the tiny model's context
    service = create_app(engine, ApiConfig(model_name="tiny-med", context_length=10**6)).state.service
    texts = ["lung " * 39_000 if i % 3 == 0 else f"Describe finding {i}." for i in range(9)]
    requests = [ChatCompletionRequest(model="tiny-med", messages=[{"role": "user", "content": t}]) for t in texts]
    alone = [service.prepare(r)[0].input_ids.tolist() for r in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda r: service.prepare(r)[0].input_ids.tolist(), requests))
    assert together == alone


@pytest.mark.parametrize(
    "address,allowed",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),
        ("64:ff9b::a9fe:a9fe", False),
    ],
)
def test_address_filter(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address)) is allowed
