"""LLaVA's model worker, compatible with its controller and clients (``llava/serve/model_worker.py``).

``POST /worker_generate_stream`` takes ``{model, prompt, images (base64), temperature, top_p,
max_new_tokens, stop}``. As in the original:

- ``prompt`` is the already rendered conversation with one ``<image>`` placeholder per image;
- the reply is a stream of JSON objects ``{"text", "error_code"}`` each followed by a NUL byte, where
  ``text`` is the FULL text so far: the prompt as received (placeholders included) + the answer so far
  (LLaVA's web UI shows ``text[len(prompt):].strip()``);
- defaults ``temperature`` 1.0, ``top_p`` 1.0, ``max_new_tokens`` 256 (capped at 1024 and at what the
  context leaves; none left -> prompt + "Exceeds max token length..." with error code 0);
- a bad request (image count / undecodable image) answers error code 1 with the original's
  network-error text, followed by the reason.

Differences: answers end on the template's stop tokens as well as ``stop``; concurrent requests
are batched on the one model (:mod:`medvlm.serve.batching`) within ``limit_concurrency``; the status
also carries ``template`` (the model's chat-template name; LLaVA clients ignore extra fields).
The worker registers with the controller at start and sends a heart beat every
``heart_beat_interval`` seconds (15 s, as the original), re-registering if the controller forgot it.

Hostile input (docs/security.md): with a shared ``secret`` every route needs ``Authorization: Bearer
SECRET`` (checked before the body is read) and the worker sends it to the controller; bodies are capped
as they stream; a request waits for a concurrency slot *before* its body is read (more than
``batcher.max_queue`` waiting: 503); then the prompt's characters, the image count, the ``<image>``
placeholder count, every image header and the decoded-bytes budget are checked before any image is
decoded. A refused request gets an HTTP 4xx whose body is still one LLaVA error frame (error code 1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from medvlm.data.schema import IMAGE_PLACEHOLDER
from medvlm.errors import MedvlmError
from medvlm.infer.batching import prepare_text
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.family import NativeLlavaFamily
from medvlm.notice import NOTICE
from medvlm.serve.admission import DecodeGate, RequestRefused, body_cap, check_image_count, check_prompt_chars
from medvlm.serve.batching import BatcherConfig, DynamicBatcher, QueueFullError
from medvlm.serve.controller import SERVER_ERROR_MSG
from medvlm.serve.guard import RequestGuard, bearer
from medvlm.serve.images import ImageInputError, ImageLimits, decode_base64, decode_probe, probe_image_bytes

log = logging.getLogger("medvlm.serve.worker")
EXCEEDS_MSG = "Exceeds max token length. Please start a new conversation, thanks."


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of ``medvlm serve worker``."""

    controller_url: str
    """The controller to register with (``http://host:port``)."""
    worker_url: str
    """This worker's address as the controller should call it (``http://host:port``)."""
    model_name: str
    """The model name it serves (listed by the controller)."""
    register: bool = True
    """Register with the controller at start and send heart beats."""
    heart_beat_interval: float = 15.0
    """Seconds between heart beats (LLaVA: 15; the controller expires workers after 30)."""
    limit_concurrency: int = 5
    """Most requests in flight (LLaVA's ``--limit-model-concurrency``)."""
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    """Dynamic batching of the requests in flight."""
    limits: ImageLimits = field(default_factory=ImageLimits)
    """Per-image byte / pixel limits."""
    secret: str | None = None
    """Shared secret of the controller, its workers and clients (``Authorization: Bearer``); None = none."""
    max_images: int = 4
    """Most images in one request (more: refused before decoding)."""
    max_prompt_chars: int = 200_000
    """Most characters in ``prompt`` (checked before tokenising)."""
    max_decoded_bytes: int = 512 * 2**20
    """Estimated memory for decoding and preprocessing all images of one request."""
    max_concurrent_decodes: int = 2
    """Requests decoding images at the same time."""

    @property
    def max_body_bytes(self) -> int:
        """Largest accepted request body (:func:`medvlm.serve.admission.body_cap` of the limits)."""
        return body_cap(self.max_images, self.limits.max_bytes, self.max_prompt_chars)


def frame(text: str, code: int) -> bytes:
    """One frame of LLaVA's worker stream: JSON ``{"text", "error_code"}`` and a NUL byte."""
    return json.dumps({"text": text, "error_code": code}).encode() + b"\0"


class ModelWorker:
    """Serves one model to a controller."""

    def __init__(self, engine: InferenceEngine, config: WorkerConfig):
        self.engine, self.config = engine, config
        self.batcher = DynamicBatcher(engine, config.batcher)
        self.semaphore: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self.context = int(engine.model.config.text_config.max_position_embeddings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gate = DecodeGate(config.max_decoded_bytes, config.max_concurrent_decodes)

    # -- controller link -------------------------------------------------------------------
    def queue_length(self) -> int:
        """Requests running or waiting for a slot (what LLaVA reports)."""
        return self.running + self.waiting

    async def acquire_slot(self) -> None:
        """Wait for one of ``limit_concurrency`` slots, counted as waiting, then as running, in the queue length."""
        assert self.semaphore is not None
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1  # no await between the decrement and this: the count never drops a request

    def release_slot(self) -> None:
        """Give back a slot taken by :meth:`acquire_slot`."""
        assert self.semaphore is not None
        self.running -= 1
        self.semaphore.release()

    def get_status(self) -> dict:
        return {"model_names": [self.config.model_name], "speed": 1, "queue_length": self.queue_length(),
                "template": self.engine.processor.template}

    def register_to_controller(self) -> None:
        data = {"worker_name": self.config.worker_url, "check_heart_beat": True, "worker_status": self.get_status()}
        r = httpx.post(self.config.controller_url + "/register_worker", json=data, timeout=10,
                       headers=bearer(self.config.secret))
        if r.status_code != 200:
            raise MedvlmError(f"registering with {self.config.controller_url} failed: HTTP {r.status_code}")

    def send_heart_beat(self) -> None:
        """One heart beat; re-register if the controller does not know this worker (bounded: one attempt)."""
        try:
            r = httpx.post(self.config.controller_url + "/receive_heart_beat",
                           json={"worker_name": self.config.worker_url, "queue_length": self.queue_length()},
                           timeout=5, headers=bearer(self.config.secret))
            if not r.json().get("exist", False):
                self.register_to_controller()
        except (httpx.HTTPError, ValueError, MedvlmError) as e:
            log.warning("heart beat to %s failed: %s", self.config.controller_url, type(e).__name__)

    def _heart_beat_loop(self) -> None:
        while not self._stop.wait(self.config.heart_beat_interval):
            self.send_heart_beat()

    def start(self) -> None:
        self.engine.model.eval()
        self.batcher.start()
        if self.config.register:
            self.register_to_controller()
            self._thread = threading.Thread(target=self._heart_beat_loop, name="medvlm-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.stop()
        if self._thread is not None:
            self._thread.join(5)

    # -- generation ------------------------------------------------------------------------
    def prepare(self, params: dict):
        """Check limits, decode images, encode the prompt, pick settings (thread pool).

        Raises MedvlmError on bad input; every limit is checked before any image is decoded.
        """
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise MedvlmError("'prompt' must be a string")
        try:
            temperature = float(params.get("temperature", 1.0))
            top_p = float(params.get("top_p", 1.0))
            max_new = min(int(params.get("max_new_tokens", 256)), 1024)
        except (TypeError, ValueError, OverflowError) as e:
            raise MedvlmError(f"bad sampling parameter ({e})") from None
        stop = params.get("stop")
        if isinstance(stop, str):
            stops: tuple[str, ...] = (stop,) if stop else ()
        elif isinstance(stop, list):
            stops = tuple(s for s in stop if isinstance(s, str) and s)
        else:
            stops = ()
        check_prompt_chars(len(prompt) + sum(len(x) for x in stops), self.config.max_prompt_chars)
        raw_images = params.get("images") or []
        if not isinstance(raw_images, list) or not all(isinstance(x, str) for x in raw_images):
            raise MedvlmError("'images' must be a list of base64 strings")
        check_image_count(len(raw_images), self.config.max_images)
        n = prompt.count(IMAGE_PLACEHOLDER)
        if n != len(raw_images):
            raise MedvlmError(f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(raw_images)} "
                              "image(s) were given")
        limits = self.config.limits
        probes = [probe_image_bytes(decode_base64(b.split(",", 1)[1] if b.startswith("data:") else b, limits,
                                                  f"image {k + 1}"), limits, f"image {k + 1}")
                  for k, b in enumerate(raw_images)]
        self.gate.check(probes)
        if probes:
            with self.gate.slot():
                images = [decode_probe(p, f"image {k + 1}") for k, p in enumerate(probes)]
                del probes
                prepared = prepare_text(self.engine, prompt, images)
                del images
        else:
            prepared = prepare_text(self.engine, prompt, [])
        max_new = min(max_new, self.context - prepared.num_tokens)
        settings = None
        if max_new >= 1:
            settings = GenerationSettings(max_new_tokens=max_new, temperature=temperature if temperature > 0.001 else 0.0,
                                          top_p=top_p, stop=stops).validate()
        return prompt, prepared, settings

    async def generate_stream(self, params: dict):
        """The NUL-delimited JSON stream of ``/worker_generate_stream``."""
        try:
            prepared_all = await run_in_threadpool(self.prepare, params)
        except MedvlmError as e:
            yield frame(f"{SERVER_ERROR_MSG}\n\n({e})", 1)
            return
        async for chunk in self.stream_prepared(*prepared_all):
            yield chunk

    async def stream_prepared(self, prompt: str, prepared, settings: GenerationSettings | None):
        """The stream of a request :meth:`prepare` accepted."""
        if settings is None:
            yield frame(prompt + EXCEEDS_MSG, 0)
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def push(kind: str, value: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:
                pass  # the event loop closed during shutdown: the job is cancelled by the finally below
        try:
            job = self.batcher.submit(prepared, settings, on_delta=lambda d: push("delta", d),
                                      on_done=lambda r: push("done", r), on_error=lambda e: push("error", e))
        except QueueFullError as e:
            yield frame(f"{SERVER_ERROR_MSG}\n\n({e})", 1)
            return
        text = prompt
        try:
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    text += value
                    yield frame(text, 0)
                elif kind == "done":
                    if not text[len(prompt):]:
                        yield frame(text, 0)  # an empty answer still gets one frame
                    return
                else:
                    yield frame(SERVER_ERROR_MSG, 1)
                    return
        finally:
            job.cancel()


def create_worker_app(engine: InferenceEngine, config: WorkerConfig) -> FastAPI:
    """The worker's FastAPI app (registers with the controller when it starts)."""
    if not isinstance(engine.family, NativeLlavaFamily):
        # The worker protocol sends prompts already rendered in a LLaVA template with <image> placeholders.
        raise MedvlmError(f"serve worker speaks LLaVA's rendered-prompt protocol and serves native medvlm checkpoints "
                          f"only; this is a {engine.model.config.model_type} checkpoint: serve it with "
                          "`medvlm serve api` (OpenAI protocol)")
    worker = ModelWorker(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.semaphore = asyncio.Semaphore(config.limit_concurrency)
        await run_in_threadpool(worker.start)
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="medvlm model worker (LLaVA protocol)", description=NOTICE, lifespan=lifespan)
    app.state.worker = worker

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        if worker.waiting >= config.batcher.max_queue:  # before the body is read: a waiting request costs nothing
            return Response(frame(f"{SERVER_ERROR_MSG}\n\n(the worker's queue is full; retry later)", 1),
                            status_code=503, headers={"Retry-After": "1"})
        await worker.acquire_slot()
        try:
            try:
                params = await request.json()
            except ValueError:
                params = None
            prepared_all = await run_in_threadpool(worker.prepare, params if isinstance(params, dict) else {})
        except (RequestRefused, ImageInputError) as e:
            worker.release_slot()
            return Response(frame(f"{SERVER_ERROR_MSG}\n\n({e})", 1), status_code=e.status)
        except MedvlmError as e:
            worker.release_slot()
            return Response(frame(f"{SERVER_ERROR_MSG}\n\n({e})", 1), status_code=400)
        except BaseException:
            worker.release_slot()
            raise

        released = False

        def release() -> None:  # from the stream's end or the background task, whichever comes first
            nonlocal released
            if not released:
                released = True
                worker.release_slot()

        async def body():
            try:
                async for chunk in worker.stream_prepared(*prepared_all):
                    yield chunk
            finally:
                release()

        return StreamingResponse(body(), background=BackgroundTask(release))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return worker.get_status()

    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=config.secret)
    return app
