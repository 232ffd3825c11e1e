"""LLaVA's controller, compatible with its workers and clients (``llava/serve/controller.py``).

Endpoints (all POST, JSON, same payloads as the original): ``/register_worker``
(``worker_name``, ``check_heart_beat``, ``worker_status {model_names, speed, queue_length}``),
``/refresh_all_workers``, ``/list_models`` -> ``{"models"}``, ``/get_worker_address``
(``model``) -> ``{"address"}`` ("" when none), ``/receive_heart_beat`` (``worker_name``,
``queue_length``) -> ``{"exist"}``, ``/worker_generate_stream`` (proxied to a worker, NUL-delimited
JSON), ``/worker_get_status`` (the sum over workers).

Workers that asked for heart-beat checks and have not sent one for ``heart_beat_expiration`` seconds
(30 s, as the original) are dropped. One improvement over the original: when ``/worker_generate_stream``
cannot connect to the chosen worker, that worker is dropped and the request goes to another one
(the original answered with error code 3).

Hostile input (docs/security.md). The original lets any client register any URL as a worker (and so
receive every prompt and image), and POSTs to ``worker_name + "/..."`` whatever that string is. Here:

- a shared ``secret`` (``Authorization: Bearer SECRET`` on every route, checked before the body is
  read; the controller sends it to its workers) - required when the controller is bound beyond loopback;
- ``worker_name`` must be a plain ``http(s)://host:port`` base URL (no user info, path, query or
  fragment), so the controller only ever calls ``/worker_get_status`` and ``/worker_generate_stream``
  on a host and port;
- ``model_names``, ``speed`` (finite, 0 < speed <= 1000) and ``queue_length`` (an integer 0..1e6) are
  validated: bad values are a 400, never a 500; at most ``max_workers`` workers;
- every worker expires ``heart_beat_expiration`` seconds after its last heart beat or registration
  (the original kept workers registered with ``check_heart_beat`` false forever);
- bodies are capped as they stream; worker answers (status, stream frames) are read with a size cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE
from medvlm.serve.admission import body_cap
from medvlm.serve.guard import RequestGuard, bearer, error_body

log = logging.getLogger("medvlm.serve.controller")
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
"""The text LLaVA's controller and workers send with a non-zero ``error_code``."""
DISPATCH_METHODS: tuple[str, ...] = ("shortest_queue", "lottery")
MAX_SPEED = 1000.0
"""Largest ``speed`` a worker may report."""
MAX_QUEUE_LENGTH = 1_000_000
MAX_MODEL_NAMES = 64
MAX_STATUS_BYTES = 64 * 1024
"""Largest ``/worker_get_status`` answer the controller reads."""


class WorkerInputError(MedvlmError):
    """A registration or heart beat the controller refuses (HTTP 400)."""


def validate_worker_url(url: object) -> str:
    """A worker address as ``scheme://host:port`` (http/https, a host, a port; no user info, path, query)."""
    if not isinstance(url, str) or not url or len(url) > 512:
        raise WorkerInputError("worker_name must be a worker URL such as http://host:21002")
    if any(c in url for c in "?#@\\") or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise WorkerInputError(
            "worker_name: give the worker's base URL only (http://host:port; no user info, "
            "query, fragment, spaces or control characters)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WorkerInputError("worker_name: the scheme must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WorkerInputError("worker_name: user info is not allowed")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise WorkerInputError("worker_name: give the worker's base URL only (no path, query or fragment)")
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        raise WorkerInputError("worker_name: bad port") from None
    if not host or port is None or not 1 <= port <= 65535:
        raise WorkerInputError("worker_name: give a host and a port (http://host:port)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and (ip.is_unspecified or ip.is_multicast or ip.is_link_local):
        raise WorkerInputError("worker_name: not a worker address (unspecified, multicast or link-local)")
    shown = f"[{host}]" if ip is not None and ip.version == 6 else host
    return f"{parts.scheme}://{shown}:{port}"


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WorkerInputError(f"{what} must be a number")
    try:
        x = float(value)
    except ValueError:
        raise WorkerInputError(f"{what} must be a number (got {str(value)[:40]!r})") from None
    if not math.isfinite(x):
        raise WorkerInputError(f"{what} must be finite")
    return x


def parse_queue_length(value: object) -> int:
    """A reported queue length: an integer 0..1e6."""
    x = _number(value, "queue_length")
    if x != int(x) or not 0 <= x <= MAX_QUEUE_LENGTH:
        raise WorkerInputError(f"queue_length must be an integer in 0..{MAX_QUEUE_LENGTH}")
    return int(x)


def parse_worker_status(status: object) -> tuple[list[str], float, int]:
    """``worker_status`` -> (model names, speed, queue length), validated."""
    if not isinstance(status, dict):
        raise WorkerInputError("worker_status must be an object")
    names = status.get("model_names")
    if (
        not isinstance(names, list)
        or not 1 <= len(names) <= MAX_MODEL_NAMES
        or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names)
    ):
        raise WorkerInputError(f"worker_status.model_names must be a list of 1..{MAX_MODEL_NAMES} names")
    speed = _number(status.get("speed", 1), "speed")
    if not 0 < speed <= MAX_SPEED:
        raise WorkerInputError(f"speed must be in (0, {MAX_SPEED:g}]")
    return list(names), speed, parse_queue_length(status.get("queue_length", 0))


@dataclass(frozen=True)
class ControllerConfig:
    """Settings of ``medvlm serve controller``."""

    dispatch: str = "shortest_queue"
    """``shortest_queue`` (queue length / speed) or ``lottery`` (random, weighted by speed)."""
    heart_beat_expiration: float = 30.0
    """A worker without a heart beat for this long is dropped (LLaVA: 30 s)."""
    check_interval: float | None = None
    """How often expiry is checked (None = every ``heart_beat_expiration`` seconds, as the original)."""
    worker_timeout: float = 5.0
    """Timeout for status calls and for connecting to a worker."""
    secret: str | None = None
    """Shared secret of the controller, its workers and clients (``Authorization: Bearer``); None = none."""
    max_workers: int = 256
    """Most registered workers (more registrations are refused with 429)."""
    max_body_bytes: int = body_cap(4, 20 * 2**20, 200_000)
    """Largest request body (it proxies worker requests: sized like the worker's default cap)."""

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_METHODS:
            raise MedvlmError(f"unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_METHODS)}")
        if self.heart_beat_expiration <= 0 or self.max_workers < 1:
            raise MedvlmError("heart_beat_expiration must be > 0 and max_workers >= 1")


@dataclass
class WorkerInfo:
    """What the controller knows about one worker."""

    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


class Controller:
    """The worker registry and dispatcher."""

    def __init__(self, config: ControllerConfig | None = None):
        self.config = config or ControllerConfig()
        self.worker_info: dict[str, WorkerInfo] = {}
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.worker_timeout, read=None),
                headers=bearer(self.config.secret),
                trust_env=False,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get_worker_status(self, worker_name: str) -> dict | None:
        """Ask a worker for its status; None when it does not answer."""
        try:
            async with self.client.stream(
                "POST", worker_name + "/worker_get_status", timeout=self.config.worker_timeout
            ) as r:
                r.raise_for_status()
                raw = b""
                async for data in r.aiter_bytes():
                    raw += data
                    if len(raw) > MAX_STATUS_BYTES:
                        raise ValueError("status answer too large")
            status = json.loads(raw)
            parse_worker_status(status)
            return status
        except (httpx.HTTPError, ValueError, WorkerInputError) as e:
            log.info("worker %s: no usable status (%s)", worker_name, type(e).__name__)
            return None

    async def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or update a worker (its status is fetched when not given).

        Raises :class:`WorkerInputError` for a bad URL or status, or when ``max_workers`` are registered.
        """
        worker_name = validate_worker_url(worker_name)
        if worker_status:
            names, speed, queue = parse_worker_status(worker_status)
        if worker_name not in self.worker_info and len(self.worker_info) >= self.config.max_workers:
            raise WorkerInputError(f"the controller already has {self.config.max_workers} workers")
        log.info("register %s worker %s", "an existing" if worker_name in self.worker_info else "a new", worker_name)
        if not worker_status:
            worker_status = await self.get_worker_status(worker_name)
            if not worker_status:
                return False
            names, speed, queue = parse_worker_status(worker_status)
        self.worker_info[worker_name] = WorkerInfo(
            model_names=names,
            speed=speed,
            queue_length=queue,
            check_heart_beat=bool(check_heart_beat),
            last_heart_beat=time.time(),
        )
        return True

    def remove_worker(self, worker_name: str) -> None:
        self.worker_info.pop(worker_name, None)

    async def refresh_all_workers(self) -> None:
        """Re-register every worker from its current status; those that do not answer are removed."""
        old = dict(self.worker_info)
        self.worker_info = {}
        for name, info in old.items():
            try:
                ok = await self.register_worker(name, info.check_heart_beat, None)
            except WorkerInputError:
                ok = False
            if not ok:
                log.info("remove stale worker %s", name)

    def list_models(self) -> list[str]:
        return sorted({m for info in self.worker_info.values() for m in info.model_names})

    def get_worker_address(self, model_name: str, exclude: frozenset[str] = frozenset()) -> str:
        """A worker serving ``model_name`` chosen by the dispatch method ("" when none)."""
        names = [n for n, i in self.worker_info.items() if model_name in i.model_names and n not in exclude]
        if not names:
            return ""
        if self.config.dispatch == "lottery":
            speeds = [max(self.worker_info[n].speed, 1e-9) for n in names]
            return random.choices(names, weights=speeds, k=1)[0]
        name = min(names, key=lambda n: self.worker_info[n].queue_length / max(self.worker_info[n].speed, 1e-9))
        self.worker_info[name].queue_length += 1
        return name

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        info = self.worker_info.get(worker_name)
        if info is None:
            return False
        info.queue_length = parse_queue_length(queue_length)
        info.last_heart_beat = time.time()
        return True

    def remove_expired_workers(self) -> list[str]:
        """Drop workers whose last heart beat (or registration) is older than the expiration; returns their names.

        Every worker expires, whatever its ``check_heart_beat``: a worker that never beats stays only
        as long as ``/refresh_all_workers`` finds it answering.
        """
        expire = time.time() - self.config.heart_beat_expiration
        gone = [n for n, i in self.worker_info.items() if i.last_heart_beat < expire]
        for n in gone:
            log.info("worker %s: no heart beat for %.0f s, removed", n, self.config.heart_beat_expiration)
            self.remove_worker(n)
        return gone

    async def generate_stream(self, params: dict):
        """Proxy ``/worker_generate_stream`` to a worker; a worker that cannot be reached is dropped and
        another tried."""
        tried: set[str] = set()
        while True:
            addr = self.get_worker_address(str(params.get("model", "")), frozenset(tried))
            if not addr:
                yield json.dumps({"text": SERVER_ERROR_MSG, "error_code": 2}).encode() + b"\0"
                return
            tried.add(addr)
            sent = False
            try:
                async with self.client.stream("POST", addr + "/worker_generate_stream", json=params) as r:
                    buf = b""
                    async for data in r.aiter_bytes():
                        buf += data
                        if len(buf) > self.config.max_body_bytes:  # a frame larger than any prompt could make
                            yield json.dumps({"text": SERVER_ERROR_MSG, "error_code": 3}).encode() + b"\0"
                            return
                        *chunks, buf = buf.split(b"\0")
                        for chunk in chunks:
                            if chunk:
                                sent = True
                                yield chunk + b"\0"
                return
            except httpx.HTTPError as e:
                if sent:
                    yield json.dumps({"text": SERVER_ERROR_MSG, "error_code": 3}).encode() + b"\0"
                    return
                log.info("worker %s unreachable (%s): removed, trying another", addr, type(e).__name__)
                self.remove_worker(addr)

    async def worker_api_get_status(self) -> dict:
        names: set[str] = set()
        speed, queue = 0.0, 0
        for w in list(self.worker_info):
            status = await self.get_worker_status(w)
            if status is not None:
                worker_names, worker_speed, worker_queue = parse_worker_status(status)
                names.update(worker_names)
                speed += worker_speed
                queue += worker_queue
        return {"model_names": sorted(names), "speed": speed, "queue_length": queue}


async def _json(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


def create_controller_app(config: ControllerConfig | None = None) -> FastAPI:
    """The controller's FastAPI app (expiry checks run while the app runs)."""
    controller = Controller(config)
    interval = controller.config.check_interval or controller.config.heart_beat_expiration

    async def expire_loop() -> None:
        while True:
            await asyncio.sleep(interval)
            controller.remove_expired_workers()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(expire_loop())
        try:
            yield
        finally:
            task.cancel()
            await controller.close()

    app = FastAPI(title="medvlm controller (LLaVA protocol)", description=NOTICE, lifespan=lifespan)
    app.state.controller = controller

    @app.exception_handler(WorkerInputError)
    async def _bad_worker(request: Request, exc: WorkerInputError) -> JSONResponse:
        full = "already has" in str(exc)
        return JSONResponse(
            error_body(str(exc), "invalid_request_error", "too_many_workers" if full else "invalid_worker"),
            status_code=429 if full else 400,
        )

    @app.post("/register_worker")
    async def register_worker(request: Request) -> dict:
        data = await _json(request)
        status = data.get("worker_status")
        if status is not None and not isinstance(status, dict):
            raise WorkerInputError("worker_status must be an object")
        ok = await controller.register_worker(
            data.get("worker_name"), bool(data.get("check_heart_beat", False)), status or None
        )
        return {"ok": ok}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> dict:
        await controller.refresh_all_workers()
        return {}

    @app.post("/list_models")
    async def list_models() -> dict:
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> dict:
        data = await _json(request)
        return {"address": controller.get_worker_address(str(data.get("model", "")))}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> dict:
        data = await _json(request)
        queue = parse_queue_length(data.get("queue_length", 0))
        return {"exist": controller.receive_heart_beat(validate_worker_url(data.get("worker_name")), queue)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        return StreamingResponse(controller.generate_stream(await _json(request)))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return await controller.worker_api_get_status()

    app.add_middleware(RequestGuard, max_body_bytes=controller.config.max_body_bytes, api_key=controller.config.secret)
    return app
