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
also carries ``template``: the chat template the prompts must be rendered in (medvlm's clients and
web UI render with it; LLaVA clients ignore extra fields and pick theirs by model name).

Model families (:mod:`medvlm.model.families`: Qwen2.5-VL, Gemma 3, SmolVLM, ...) render conversations with
their own chat template, so their worker reads the prompt back into turns
(:func:`medvlm.data.template_parse.parse_generation_prompt`, in the template named by
``WorkerConfig.template``: never guessed from the text) and encodes those turns and the images with the
family's processor, exactly as ``medvlm chat`` and ``serve api`` do: greedy answers are the same. The LLaVA
template's default system prompt is the client's, not the user's, so it is dropped (the family's own default
applies, as in ``serve api``); another system prompt is passed on. A prompt that does not render back
identically in that template is refused (error code 1).
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

from medvlm.data.schema import IMAGE_PLACEHOLDER, Sample
from medvlm.data.template_parse import parse_generation_prompt
from medvlm.data.templates import get_template
from medvlm.errors import MedvlmError
from medvlm.infer.batching import PreparedPrompt, prepare_text
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.family import NativeLlavaFamily
from medvlm.notice import NOTICE
from medvlm.serve.admission import DecodeGate, RequestRefused, body_cap, check_image_count, check_prompt_chars
from medvlm.serve.batching import BatcherConfig, DynamicBatcher, QueueFullError
from medvlm.serve.controller import SERVER_ERROR_MSG
from medvlm.serve.guard import RequestGuard, bearer
from medvlm.serve.images import ImageInputError, ImageLimits, decode_base64, decode_probe, probe_image_bytes

log = logging.getLogger("medvlm.serve.worker")
DEFAULT_FAMILY_TEMPLATE = "vicuna_v1"
"""The template a model-family worker reads prompts in when neither the option nor the checkpoint names one."""
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
    template: str | None = None
    """Chat template the clients render prompts in (a medvlm template name, reported by ``/worker_get_status``).
    None: a native checkpoint's own template; for a model family, the medvlm template its checkpoint names
    (``llava``), else ``vicuna_v1`` (LLaVA v1.5 / LLaVA-Med v1.5's conversation format). A native checkpoint reads
    prompts in its own template only (another one is refused at start); ``plain`` cannot be read back."""

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
        self.template, self.reads_turns = worker_template(engine, config.template)
        """The template prompts arrive in; whether they are read back into turns (model families)."""

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
        return {
            "model_names": [self.config.model_name],
            "speed": 1,
            "queue_length": self.queue_length(),
            "template": self.template,
        }

    def register_to_controller(self) -> None:
        data = {"worker_name": self.config.worker_url, "check_heart_beat": True, "worker_status": self.get_status()}
        r = httpx.post(
            self.config.controller_url + "/register_worker", json=data, timeout=10, headers=bearer(self.config.secret)
        )
        if r.status_code != 200:
            raise MedvlmError(f"registering with {self.config.controller_url} failed: HTTP {r.status_code}")

    def send_heart_beat(self) -> None:
        """One heart beat; re-register if the controller does not know this worker (bounded: one attempt)."""
        try:
            r = httpx.post(
                self.config.controller_url + "/receive_heart_beat",
                json={"worker_name": self.config.worker_url, "queue_length": self.queue_length()},
                timeout=5,
                headers=bearer(self.config.secret),
            )
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
            raise MedvlmError(
                f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(raw_images)} image(s) were given"
            )
        sample = self.turns_of(prompt) if self.reads_turns else None  # before any image is decoded
        limits = self.config.limits
        probes = [
            probe_image_bytes(
                decode_base64(b.split(",", 1)[1] if b.startswith("data:") else b, limits, f"image {k + 1}"),
                limits,
                f"image {k + 1}",
            )
            for k, b in enumerate(raw_images)
        ]
        self.gate.check(probes)
        if probes:
            with self.gate.slot():
                images = [decode_probe(p, f"image {k + 1}") for k, p in enumerate(probes)]
                del probes
                prepared = self.encode(prompt, sample, images)
                del images
        else:
            prepared = self.encode(prompt, sample, [])
        max_new = min(max_new, self.context - prepared.num_tokens)
        settings = None
        if max_new >= 1:
            settings = GenerationSettings(
                max_new_tokens=max_new, temperature=temperature if temperature > 0.001 else 0.0, top_p=top_p, stop=stops
            ).validate()
        return prompt, prepared, settings

    def turns_of(self, prompt: str) -> Sample:
        """The conversation a prompt rendered in :attr:`template` holds (model families)."""
        messages = parse_generation_prompt(prompt, self.template)
        if messages[0].role == "system" and not messages[0].text.strip():
            messages = messages[1:]  # none (the template's default comes back as none): the family's own applies
        n = sum(m.num_images for m in messages)
        return Sample("request", messages, images=[f"image {k + 1}" for k in range(n)])

    def encode(self, prompt: str, sample: Sample | None, images: list) -> PreparedPrompt:
        """The batchable prompt: the rendered text as is (native), or the turns through the family's processor."""
        if sample is None:
            return prepare_text(self.engine, prompt, images)
        return self.engine.prepare(sample, images=images)

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
            job = self.batcher.submit(
                prepared,
                settings,
                on_delta=lambda d: push("delta", d),
                on_done=lambda r: push("done", r),
                on_error=lambda e: push("error", e),
            )
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
                    if not text[len(prompt) :]:
                        yield frame(text, 0)  # an empty answer still gets one frame
                    return
                else:
                    yield frame(SERVER_ERROR_MSG, 1)
                    return
        finally:
            job.cancel()


def worker_template(engine: InferenceEngine, template: str | None) -> tuple[str, bool]:
    """``(template name, reads turns)`` of a worker over ``engine`` (see :attr:`WorkerConfig.template`).

    Raises MedvlmError up front for a template the model cannot read prompts in.
    """
    processor = engine.processor
    if isinstance(engine.family, NativeLlavaFamily):
        # A native model is fed the rendered text itself: only its own template is meaningful.
        if template is not None and template != processor.template:
            raise MedvlmError(
                f"template {template!r}: this native checkpoint reads prompts in its own template "
                f"{processor.template!r} only; drop the template option (or pass {processor.template})"
            )
        return processor.template, False
    name = template or getattr(processor, "template", None) or DEFAULT_FAMILY_TEMPLATE
    tpl = get_template(name)  # an unknown name lists the known ones
    if not tpl.prompt_text:
        raise MedvlmError(
            f"template {name!r} drops the question text, so the worker cannot read the turns back "
            f"for this {engine.model.config.model_type} checkpoint; use another one (e.g. "
            f"{DEFAULT_FAMILY_TEMPLATE})"
        )
    return name, True


def create_worker_app(engine: InferenceEngine, config: WorkerConfig) -> FastAPI:
    """The worker's FastAPI app (registers with the controller when it starts)."""
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
            return Response(
                frame(f"{SERVER_ERROR_MSG}\n\n(the worker's queue is full; retry later)", 1),
                status_code=503,
                headers={"Retry-After": "1"},
            )
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
