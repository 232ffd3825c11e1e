"""An OpenAI-compatible chat-completions server for a medvlm checkpoint (FastAPI + uvicorn).

``GET /v1/models``, ``POST /v1/chat/completions`` (string or ``text`` / ``image_url`` parts, ``stream``
as server-sent events, ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n`` = 1).
Requests are decoded and encoded in the thread pool, then batched dynamically on the one model
(:mod:`medvlm.serve.batching`); a client that disconnects cancels its row. Every error uses the
OpenAI error shape: 400 bad schema / base64 / image / too many images, 401 key, 404 unknown model,
413 too large, 422 prompt longer than the context, 503 queue full. Bad input never gives a 500.

Hostile input is bounded before it costs anything (see docs/security.md): the key and the streamed body
cap come first (:class:`medvlm.serve.guard.RequestGuard`, every route), then the queue check, the prompt's
character count, the image count, every image header and the request's decoded-bytes budget, and only
then decoding (in a bounded number of slots) and tokenising (:mod:`medvlm.serve.admission`).

Privacy: request bodies and images are never logged; with ``log_prompts`` the message *text* is
logged (never images). Every response carries the research-only notice in ``X-Medvlm-Notice``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.infer.batching import BatchResult, prepare_sample
from medvlm.infer.engine import DEFAULT_PREFIX_CACHE_BYTES, GenerationSettings, InferenceEngine
from medvlm.notice import NOTICE
from medvlm.serve.admission import (
    Admission,
    DecodeGate,
    RequestRefused,
    body_cap,
    check_image_count,
    check_prompt_chars,
)
from medvlm.serve.batching import BatcherConfig, DynamicBatcher, QueueFullError
from medvlm.serve.guard import RequestGuard, check_bind, error_body
from medvlm.serve.images import ImageInputError, ImageLimits, decode_probe, image_bytes_from_url, probe_image_bytes
from medvlm.serve.openai_schema import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger("medvlm.serve")


@dataclass(frozen=True)
class ApiConfig:
    """Settings of ``medvlm serve api``."""

    model_name: str
    """The name clients put in ``model`` (``GET /v1/models`` lists it)."""
    api_key: str | None = None
    """Required bearer key (None = no key). The CLI reads it from an environment variable."""
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    """Dynamic batching (max batch, wait, queue size)."""
    limits: ImageLimits = field(default_factory=ImageLimits)
    """Per-image byte / pixel limits and remote fetching."""
    max_images: int = 4
    """Most images in one request (more -> 400)."""
    default_max_tokens: int = 256
    """``max_tokens`` when the request gives none (cut to what the context leaves)."""
    default_temperature: float = 0.0
    """``temperature`` when the request gives none (0 = greedy, deterministic)."""
    context_length: int | None = None
    """Prompt + answer token limit (None = the language model's ``max_position_embeddings``)."""
    log_prompts: bool = False
    """Log the message text of each request (images are never logged)."""
    max_prompt_chars: int = 200_000
    """Most characters of message text (plus stop strings) in one request, checked before tokenising (413)."""
    max_decoded_bytes: int = 512 * 2**20
    """Estimated memory for decoding and preprocessing all images of one request (413 above it)."""
    max_concurrent_decodes: int = 2
    """Requests decoding images at the same time (the others wait for a slot; text-only requests never do)."""

    @property
    def max_body_bytes(self) -> int:
        """Largest accepted request body (:func:`medvlm.serve.admission.body_cap` of the limits)."""
        return body_cap(self.max_images, self.limits.max_bytes, self.max_prompt_chars)


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_overloaded",
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in (
        (400, "Bad request (schema, base64, image, too many images)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Image or body too large"),
        (422, "Prompt longer than the context"),
        (503, "Queue full; retry later"),
    )
}


def _first_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    return (f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid request"))), (loc or None)


def request_chars(req: ChatCompletionRequest) -> int:
    """Characters of message text and stop strings in a request (what the prompt cap counts)."""
    n = sum(len(s) for s in ([req.stop] if isinstance(req.stop, str) else (req.stop or [])))
    for m in req.messages:
        n += len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content if p.type == "text")
    return n


def request_to_sample(req: ChatCompletionRequest, max_images: int) -> tuple[Sample, list[str]]:
    """The request's messages as a Sample (image parts in place) and the image URLs in order."""
    messages: list[Message] = []
    urls: list[str] = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            parts = [text_part(m.content)] if m.content else []
        else:
            parts = []
            for p in m.content:
                if p.type == "text":
                    parts.append(text_part(p.text))
                else:
                    if m.role != "user":
                        raise ApiError(
                            400,
                            f"messages.{i}: images are only allowed in user messages",
                            param=f"messages.{i}.content",
                        )
                    parts.append(image_part())
                    urls.append(p.image_url.url)
        messages.append(Message(role=m.role, content=parts))
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must be a user message", param="messages")
    check_image_count(len(urls), max_images)
    return Sample(id="request", messages=messages, images=[f"image{k}" for k in range(len(urls))]), urls


class ChatService:
    """Turns validated requests into batched generations (shared by the API routes)."""

    def __init__(self, engine: InferenceEngine, config: ApiConfig, batcher: DynamicBatcher):
        self.engine, self.config, self.batcher = engine, config, batcher
        self.context = config.context_length or int(engine.model.config.text_config.max_position_embeddings)
        self.admission = Admission(config.batcher.max_queue)
        self.gate = DecodeGate(config.max_decoded_bytes, config.max_concurrent_decodes)
        self._mailbox: LoopMailbox | None = None

    def settings_for(self, req: ChatCompletionRequest, prompt_tokens: int) -> GenerationSettings:
        room = self.context - prompt_tokens
        if room < 1:
            raise ApiError(
                422,
                f"the prompt is {prompt_tokens} tokens; the model's context is {self.context} tokens",
                code="context_length_exceeded",
                param="messages",
            )
        asked = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if asked is not None and asked > room:
            raise ApiError(
                422,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked}) exceeds the model's "
                f"context of {self.context} tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop: at most 4 stop strings (got {len(stops)})", param="stop")
        settings = GenerationSettings(
            max_new_tokens=asked if asked is not None else min(self.config.default_max_tokens, room),
            temperature=req.temperature if req.temperature is not None else self.config.default_temperature,
            top_p=req.top_p if req.top_p is not None else 1.0,
            seed=req.seed,
            stop=tuple(s for s in stops if s),
        )
        try:
            return settings.validate()
        except MedvlmError as e:
            raise ApiError(400, str(e)) from None

    def prepare(self, req: ChatCompletionRequest):
        """Check the limits, decode images and encode the prompt (runs in the thread pool).

        Order: characters, image count, each image's header, the request's decoded-bytes budget; then
        decoding and preprocessing in a decode slot. Tokenising shares no lock with other requests.
        """
        check_prompt_chars(request_chars(req), self.config.max_prompt_chars)
        sample, urls = request_to_sample(req, self.config.max_images)
        limits = self.config.limits
        probes = [
            probe_image_bytes(image_bytes_from_url(u, limits, f"image {k + 1}"), limits, f"image {k + 1}")
            for k, u in enumerate(urls)
        ]
        self.gate.check(probes)
        if probes:
            with self.gate.slot():
                images = [decode_probe(p, f"image {k + 1}") for k, p in enumerate(probes)]
                del probes
                prompt = prepare_sample(self.engine, sample, images=images)
                del images
        else:
            prompt = prepare_sample(self.engine, sample, images=[])
        if self.config.log_prompts:
            log.info("prompt: %s", json.dumps([{"role": m.role, "text": m.text} for m in sample.messages]))
        return prompt, self.settings_for(req, prompt.num_tokens), len(urls)

    def submit(self, prompt, settings: GenerationSettings) -> tuple[Any, asyncio.Queue]:
        """Queue a generation; events ``("delta", str)``, ``("done", BatchResult)``, ``("error", exc)`` arrive."""
        mailbox = self.mailbox()
        events: asyncio.Queue = asyncio.Queue()
        holder: dict[str, Any] = {}

        def push(kind: str, value: Any) -> None:
            if not mailbox.post(events, (kind, value)) and "job" in holder:
                holder["job"].cancel()  # the event loop is gone (shutdown): nobody is listening any more

        try:
            job = self.batcher.submit(
                prompt,
                settings,
                on_delta=lambda d: push("delta", d),
                on_done=lambda r: push("done", r),
                on_error=lambda e: push("error", e),
            )
        except QueueFullError as e:
            raise ApiError(503, str(e), "server_overloaded", "queue_full", headers={"Retry-After": "1"}) from None
        holder["job"] = job
        return job, events

    def mailbox(self) -> LoopMailbox:
        """The running event loop's mailbox (one per loop), flushed after every step of the model thread."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            old, self._mailbox = self._mailbox, LoopMailbox(loop)
            if old is not None and old.flush in self.batcher.after_step:
                self.batcher.after_step.remove(old.flush)
            self.batcher.after_step.append(self._mailbox.flush)
        return self._mailbox


class LoopMailbox:
    """Events from the model thread to the event loop, delivered once per decoding step.

    A step emits one event per running row; waking the loop for each (``call_soon_threadsafe`` writes
    to its self-pipe) cost the model thread a system call and a hand-over of the GIL per row per token,
    in the middle of its step. Events are collected during the step and :meth:`flush` (called by the
    model thread when the step ends) wakes the loop once to deliver them all, in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item: Any) -> bool:
        """Queue ``item`` for ``queue`` (delivered at the next :meth:`flush`); False when the loop is closed."""
        if self.loop.is_closed():
            return False
        with self._lock:
            self._items.append((queue, item))
        return True

    def flush(self) -> None:
        """Wake the loop once to deliver everything posted so far (no-op when nothing is waiting)."""
        with self._lock:
            if not self._items:
                return
            items, self._items = self._items, []
        try:
            self.loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
            pass

    @staticmethod
    def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
        for queue, item in items:
            queue.put_nowait(item)


def _completion(cid: str, created: int, model: str, result: BatchResult) -> dict:
    reason = result.finish_reason if result.finish_reason in ("stop", "length") else "stop"
    return ChatCompletion(
        id=cid,
        created=created,
        model=model,
        choices=[{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": reason}],
        usage={
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    ).model_dump()


def _chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict,
    finish: str | None = None,
    usage: dict | None = None,
    choices: bool = True,
) -> str:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(engine: InferenceEngine, config: ApiConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` (the batcher thread starts and stops with the app)."""
    batcher = DynamicBatcher(engine, config.batcher)
    service = ChatService(engine, config, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.model.eval()
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="medvlm OpenAI-compatible API",
        version="1",
        lifespan=lifespan,
        description=f"OpenAI-compatible chat completions for a medvlm model. {NOTICE}",
    )
    app.state.service = service
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_schema(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _first_validation_error(exc)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_schema", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), _ERROR_TYPES.get(exc.status_code, "invalid_request_error")),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict:
        return {
            "status": "ok",
            **batcher.stats(),
            "preparing": service.admission.preparing,
            "decoding": service.gate.active,
            "notice": NOTICE,
        }

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERROR_RESPONSES[401]})
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=int(time.time()))])

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {
                "model": ChatCompletion,
                "content": {"text/event-stream": {}},
                "description": "The answer (JSON), or server-sent events when stream is true",
            },
            **_ERROR_RESPONSES,
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != config.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here (this server serves {config.model_name!r})",
                "not_found_error",
                "model_not_found",
                "model",
            )
        started = time.monotonic()
        try:
            with service.admission.enter(batcher.queue_length):  # the queue is checked before any decoding
                prompt, settings, n_images = await run_in_threadpool(service.prepare, body)
                job, events = service.submit(prompt, settings)
        except RequestRefused as e:
            raise ApiError(
                e.status,
                str(e),
                "server_overloaded" if e.status == 503 else "invalid_request_error",
                e.code,
                "messages",
                headers={"Retry-After": "1"} if e.status == 503 else None,
            ) from None
        except ImageInputError as e:
            raise ApiError(
                e.status, str(e), code="invalid_image" if e.status == 400 else "image_too_large", param="messages"
            ) from None
        except MedvlmError as e:
            raise ApiError(400, str(e), param="messages") from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def log_done(result: BatchResult) -> None:
            log.info(
                "request %s: %d image(s), %d prompt + %d completion tokens, %s, %.2f s",
                cid,
                n_images,
                result.prompt_tokens,
                result.completion_tokens,
                result.finish_reason,
                time.monotonic() - started,
            )

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def sse():
                try:
                    yield _chunk(cid, created, body.model, {"role": "assistant", "content": ""})
                    while True:
                        kind, value = await events.get()
                        if kind == "delta":
                            yield _chunk(cid, created, body.model, {"content": value})
                        elif kind == "done":
                            log_done(value)
                            reason = value.finish_reason if value.finish_reason in ("stop", "length") else "stop"
                            yield _chunk(cid, created, body.model, {}, finish=reason)
                            if include_usage:
                                usage = {
                                    "prompt_tokens": value.prompt_tokens,
                                    "completion_tokens": value.completion_tokens,
                                    "total_tokens": value.prompt_tokens + value.completion_tokens,
                                }
                                yield _chunk(cid, created, body.model, {}, usage=usage, choices=False)
                            break
                        else:
                            yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()  # a disconnect lands here too: the row stops at its next token

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )

        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("request %s: client disconnected; generation cancelled", cid)
                        job.cancel()
                        return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
                    continue
                if kind == "done":
                    log_done(value)
                    return JSONResponse(_completion(cid, created, body.model, value))
                if kind == "error":
                    return JSONResponse(error_body("generation failed", "server_error"), status_code=500)
        finally:
            job.cancel()

    app.add_middleware(RequestGuard, max_body_bytes=config.max_body_bytes, api_key=config.api_key)
    return app


def banner(config: ApiConfig, host: str, port: int) -> str:
    """The startup banner (with the research-only notice)."""
    auth = "API key required" if config.api_key else "no API key"
    return (
        f"medvlm OpenAI-compatible API: model {config.model_name!r} on http://{host}:{port}/v1 ({auth}; "
        f"max batch {config.batcher.max_batch})\n{NOTICE}"
    )


def load_engine(
    model_dir: str, dtype: str | None = None, batch_size: int = 8, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
) -> InferenceEngine:
    """Load a checkpoint into an inference engine (``prefix_cache_bytes``: its prefix-cache budget, 0 = off)."""
    from medvlm.infer.loading import load_for_inference

    model, processor = load_for_inference(model_dir, dtype=dtype)
    return InferenceEngine(model, processor, batch_size=batch_size, prefix_cache_bytes=prefix_cache_bytes)


def run_api(
    engine: InferenceEngine,
    config: ApiConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    insecure_no_auth: bool = False,
) -> None:
    """Serve until interrupted (blocking). Beyond loopback a key is required unless ``insecure_no_auth``."""
    import uvicorn

    check_bind(host, config.api_key is not None, insecure_no_auth, "medvlm serve api", "--api-key-env VAR")
    if not config.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s WITHOUT an API key (--insecure-no-auth)", host)
    print(banner(config, host, port), flush=True)
    if not engine.family.reuses_prefixes:
        print(
            f"prefix cache: off ({engine.model.config.model_type} checkpoints prefill every prompt whole; "
            "--prefix-cache-mb has no effect)",
            flush=True,
        )
    uvicorn.run(
        create_app(engine, replace(config)),
        host=host,
        port=port,
        log_level=log_level,
        access_log=True,
        timeout_graceful_shutdown=5,
    )
