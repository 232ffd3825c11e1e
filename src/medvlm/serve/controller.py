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
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE

log = logging.getLogger("medvlm.serve.controller")
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
"""The text LLaVA's controller and workers send with a non-zero ``error_code``."""
DISPATCH_METHODS: tuple[str, ...] = ("shortest_queue", "lottery")


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

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_METHODS:
            raise MedvlmError(f"unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_METHODS)}")


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
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.worker_timeout, read=None))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get_worker_status(self, worker_name: str) -> dict | None:
        """Ask a worker for its status; None when it does not answer."""
        try:
            r = await self.client.post(worker_name + "/worker_get_status", timeout=self.config.worker_timeout)
            r.raise_for_status()
            status = r.json()
            if not isinstance(status, dict) or not isinstance(status.get("model_names"), list):
                return None
            return status
        except (httpx.HTTPError, ValueError) as e:
            log.info("worker %s: no status (%s)", worker_name, type(e).__name__)
            return None

    async def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or update a worker (its status is fetched when not given)."""
        log.info("register %s worker %s", "an existing" if worker_name in self.worker_info else "a new", worker_name)
        if not worker_status:
            worker_status = await self.get_worker_status(worker_name)
        if not worker_status:
            return False
        self.worker_info[worker_name] = WorkerInfo(
            model_names=[str(m) for m in worker_status.get("model_names", [])],
            speed=float(worker_status.get("speed", 1) or 1), queue_length=int(worker_status.get("queue_length", 0)),
            check_heart_beat=bool(check_heart_beat), last_heart_beat=time.time())
        return True

    def remove_worker(self, worker_name: str) -> None:
        self.worker_info.pop(worker_name, None)

    async def refresh_all_workers(self) -> None:
        """Re-register every worker from its current status; those that do not answer are removed."""
        old = dict(self.worker_info)
        self.worker_info = {}
        for name, info in old.items():
            if not await self.register_worker(name, info.check_heart_beat, None):
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
        info.queue_length = int(queue_length)
        info.last_heart_beat = time.time()
        return True

    def remove_expired_workers(self) -> list[str]:
        """Drop workers whose heart beat is older than the expiration; returns their names."""
        expire = time.time() - self.config.heart_beat_expiration
        gone = [n for n, i in self.worker_info.items() if i.check_heart_beat and i.last_heart_beat < expire]
        for n in gone:
            log.info("worker %s: no heart beat for %.0f s, removed", n, self.config.heart_beat_expiration)
            self.remove_worker(n)
        return gone

    async def generate_stream(self, params: dict):
        """Proxy ``/worker_generate_stream`` to a worker; a worker that cannot be reached is dropped and another tried."""
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
                names.update(status.get("model_names", []))
                speed += float(status.get("speed", 0))
                queue += int(status.get("queue_length", 0))
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

    @app.post("/register_worker")
    async def register_worker(request: Request) -> dict:
        data = await _json(request)
        name = data.get("worker_name")
        if not isinstance(name, str) or not name:
            return {"ok": False, "error": "worker_name is required"}
        ok = await controller.register_worker(name, bool(data.get("check_heart_beat", False)),
                                              data.get("worker_status") if isinstance(data.get("worker_status"), dict)
                                              else None)
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
        try:
            queue = int(data.get("queue_length", 0))
        except (TypeError, ValueError):
            queue = 0
        return {"exist": controller.receive_heart_beat(str(data.get("worker_name", "")), queue)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        return StreamingResponse(controller.generate_stream(await _json(request)))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return await controller.worker_api_get_status()

    return app
