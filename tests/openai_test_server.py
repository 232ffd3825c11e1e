"""A real OpenAI-compatible HTTP server for tests (FastAPI + uvicorn in a thread on 127.0.0.1).

Reusable by every test that drives the official ``openai`` client (instruction generation, the GPT
judge, the STLLaVA-Med preference judge):

- ``respond(body) -> str | dict``: the reply per request (a string becomes the assistant message
  content of a well-formed chat completion; a dict is sent as the whole JSON body);
- fault injection per request index (arrival order, 0-based) or per key (``key_fn(body)``, by
  default the text of the last user message); a key's faults are used one per request, in order,
  unless the fault has ``repeat=True``;
- a request log (:class:`LoggedRequest`: index, arrival time, path, body, headers, what was sent) and
  ``max_in_flight`` (the most requests handled at once);
- :func:`openai_server_factory`: a pytest fixture returning a factory that starts servers and stops
  them at the end of the test. Import it into a test module (``from openai_test_server import
  openai_server_factory``) to use it.

Routes: ``POST /v1/chat/completions`` and Azure's ``POST /openai/deployments/{deployment}/chat/completions``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response


@dataclass
class Fault:
    """What to do instead of a normal reply."""

    kind: str
    """``status`` (an error status), ``timeout`` (sleep ``delay`` s, then reply normally), ``malformed``
    (200 with a body that is not a chat completion) or ``empty`` (200, well-formed, empty content)."""
    status: int = 500
    """HTTP status for ``kind="status"``."""
    retry_after: str | None = None
    """Value of the ``Retry-After`` header, sent with ``kind="status"`` when set (e.g. ``"1"``)."""
    retry_after_ms: str | None = None
    """Value of the ``retry-after-ms`` header (OpenAI's millisecond variant), when set."""
    delay: float = 1.0
    """Seconds to stall for ``kind="timeout"``."""
    body: str = "this is not a chat completion"
    """Body sent for ``kind="malformed"``."""
    repeat: bool = False
    """Keep applying this fault to every later request of its key (never consumed)."""


@dataclass
class LoggedRequest:
    """One request the server received."""

    index: int
    time: float
    path: str
    body: Any
    headers: dict[str, str]
    key: str
    outcome: str = "ok"
    """``ok`` or the fault kind (``status:429``, ``timeout``, ``malformed``, ``empty``)."""


def last_user_text(body: Any) -> str:
    """The text of the last user message (string content or the text parts of list content)."""
    for m in reversed((body or {}).get("messages") or []):
        if m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, str):
            return c
        if isinstance(c, list):
            return "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _default_respond(body: Any) -> str:
    return "User: What does the image show?\nAssistant: It shows " + last_user_text(body)[:40]


def completion_body(
    content: str | None,
    model: str,
    prompt_tokens: int = 10,
    completion_tokens: int | None = None,
    finish_reason: str = "stop",
) -> dict:
    """A well-formed chat.completion JSON body."""
    ct = completion_tokens if completion_tokens is not None else len((content or "").split())
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct, "total_tokens": prompt_tokens + ct},
    }


class FakeOpenAIServer:
    """An OpenAI-compatible chat server with scripted replies and faults; see the module docstring."""

    def __init__(
        self,
        respond: Callable[[Any], str | dict] | None = None,
        *,
        key_fn: Callable[[Any], str] = last_user_text,
        faults_by_index: dict[int, Fault] | None = None,
        faults_by_key: dict[str, list[Fault]] | None = None,
        prompt_tokens: int = 10,
    ) -> None:
        self.respond = respond or _default_respond
        self.key_fn = key_fn
        self.faults_by_index: dict[int, Fault] = dict(faults_by_index or {})
        self.faults_by_key: dict[str, list[Fault]] = {k: list(v) for k, v in (faults_by_key or {}).items()}
        self.prompt_tokens = prompt_tokens
        self.requests: list[LoggedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        """Most requests being handled at the same moment (to check a client's concurrency bound)."""
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.app = self._build_app()

    # ---- configuration while running -------------------------------------------------------
    def add_fault(self, fault: Fault, *, index: int | None = None, key: str | None = None) -> None:
        """Inject ``fault`` for the request with arrival ``index`` or for the next request(s) of ``key``."""
        with self._lock:
            if index is not None:
                self.faults_by_index[index] = fault
            if key is not None:
                self.faults_by_key.setdefault(key, []).append(fault)

    def clear_faults(self) -> None:
        """Remove every pending fault."""
        with self._lock:
            self.faults_by_index.clear()
            self.faults_by_key.clear()

    def reset_log(self) -> None:
        """Forget logged requests (request indices restart at 0) and the in-flight maximum."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    def requests_for(self, key: str) -> list[LoggedRequest]:
        """Logged requests whose key equals ``key``."""
        return [r for r in self.requests if r.key == key]

    # ---- HTTP --------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``: pass as the OpenAI client's base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: pass as ``azure_endpoint``."""
        return f"http://127.0.0.1:{self.port}"

    def _take_fault(self, index: int, key: str) -> Fault | None:
        with self._lock:
            if index in self.faults_by_index:
                return self.faults_by_index.pop(index)
            queue = self.faults_by_key.get(key)
            if queue:
                return queue[0] if queue[0].repeat else queue.pop(0)
        return None

    async def _handle(self, request: Request, model_from_path: str | None = None) -> Response:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._reply(request, model_from_path)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _reply(self, request: Request, model_from_path: str | None) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        key = self.key_fn(body) if isinstance(body, dict) else ""
        with self._lock:
            entry = LoggedRequest(
                index=len(self.requests),
                time=time.monotonic(),
                path=request.url.path,
                body=body,
                headers=dict(request.headers),
                key=key,
            )
            self.requests.append(entry)
        fault = self._take_fault(entry.index, key)
        model = model_from_path or (body.get("model") if isinstance(body, dict) else None) or "unknown"
        if fault is not None:
            if fault.kind == "status":
                entry.outcome = f"status:{fault.status}"
                headers = {}
                if fault.retry_after is not None:
                    headers["retry-after"] = fault.retry_after
                if fault.retry_after_ms is not None:
                    headers["retry-after-ms"] = fault.retry_after_ms
                return JSONResponse(
                    {"error": {"message": f"injected {fault.status}", "type": "test", "code": None}},
                    status_code=fault.status,
                    headers=headers,
                )
            if fault.kind == "timeout":
                entry.outcome = "timeout"
                await asyncio.sleep(fault.delay)
            elif fault.kind == "malformed":
                entry.outcome = "malformed"
                return PlainTextResponse(fault.body, status_code=200)
            elif fault.kind == "empty":
                entry.outcome = "empty"
                return JSONResponse(completion_body("", model, self.prompt_tokens))
            else:
                raise ValueError(f"unknown fault kind {fault.kind!r}")
        reply = self.respond(body)
        if isinstance(reply, dict):
            return JSONResponse(reply)
        return JSONResponse(completion_body(reply, model, self.prompt_tokens))

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request)

        @app.post("/openai/deployments/{deployment}/chat/completions")
        async def azure_chat(deployment: str, request: Request) -> Response:
            return await self._handle(request, model_from_path=deployment)

        return app

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeOpenAIServer:
        """Start uvicorn in a daemon thread on a free 127.0.0.1 port; returns when it accepts requests."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the server and join its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class _Factory:
    servers: list[FakeOpenAIServer] = field(default_factory=list)

    def __call__(self, respond: Callable[[Any], str | dict] | None = None, **kwargs: Any) -> FakeOpenAIServer:
        server = FakeOpenAIServer(respond, **kwargs).start()
        self.servers.append(server)
        return server


@pytest.fixture
def openai_server_factory() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """``make(respond=None, **FakeOpenAIServer kwargs) -> started server``; all are stopped after the test."""
    factory = _Factory()
    yield factory
    for s in factory.servers:
        s.stop()
