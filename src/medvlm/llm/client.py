"""An OpenAI-compatible chat client with our own retry policy, a persistent cache and usage accounting.

Built on the official ``openai`` client (``OpenAI`` or ``AzureOpenAI``) with its own retries turned
off (``max_retries=0``) so that the policy here is the one applied: bounded concurrency; 429 waits
for ``Retry-After`` (or ``retry-after-ms``); 429/5xx/408/409, timeouts, connection errors and
malformed or empty replies back off exponentially with jitter; each request succeeds or fails on its
own and never takes its batch down. Only configuration errors every request would hit (401, 403,
404, exhausted quota) stop a batch, after the requests in flight are delivered.

Message content may be a string or a list of parts (``{"type": "text"}``, ``{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}``); it is sent as given.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sized
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from medvlm.errors import MedvlmError
from medvlm.llm.cache import ResponseCache, request_key
from medvlm.llm.config import LLMConfig
from medvlm.utils.backoff import backoff_delay


class LLMFatalError(MedvlmError):
    """An error every request would hit (bad key, unknown model/deployment, no quota): the batch stops."""


class _BadReply(Exception):
    """A 200 reply that is not a usable chat completion."""


@dataclass
class LLMRequest:
    """One chat request: messages plus optional per-request parameter overrides and a caller tag."""

    messages: list[dict]
    params: dict = field(default_factory=dict)
    tag: Any = None


@dataclass
class LLMResult:
    """The outcome of one request: ``text`` on success, ``error`` otherwise."""

    key: str
    text: str | None = None
    response: dict | None = None
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None
    cached: bool = False
    error: str | None = None
    attempts: int = 0
    fatal: bool = False
    tag: Any = None
    index: int = 0

    @property
    def ok(self) -> bool:
        """True when the request produced a reply."""
        return self.error is None


@dataclass
class UsageTracker:
    """Counts requests, retries and tokens (thread-safe through :meth:`add`)."""

    http_requests: int = 0
    completed: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        """Add to counters by name."""
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def add_retry(self, reason: str) -> None:
        """Count one retry for ``reason``."""
        with self._lock:
            self.retries[reason] += 1

    def summary(self, config: LLMConfig) -> str:
        """One paragraph: requests, tokens and cost (or 'tokens only' for a model without a price)."""
        lines = [
            f"LLM {config.model}: {self.completed + self.cached} replies ({self.cached} from cache), "
            f"{self.failed} failed, {self.http_requests} HTTP requests"
            + (f", retries: {dict(self.retries)}" if self.retries else "")
        ]
        lines.append(
            f"tokens paid: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion; "
            f"from cache: {self.cached_prompt_tokens:,} + {self.cached_completion_tokens:,}"
        )
        price = config.price()
        if price is None:
            lines.append(f"cost: unknown (no price for model {config.model!r}; set price_input/price_output)")
        else:
            cost = (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6
            saved = (self.cached_prompt_tokens * price[0] + self.cached_completion_tokens * price[1]) / 1e6
            lines.append(f"cost: ${cost:.4f} (${price[0]:g}/${price[1]:g} per 1M tokens); saved by cache: ${saved:.4f}")
        return "\n".join(lines)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if absent."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def parse_reply(raw_text: str) -> tuple[dict, str, str | None]:
    """``(response JSON, message text, finish_reason)`` of a chat completion body; raises on a malformed/empty one."""
    try:
        data = json.loads(raw_text)
    except ValueError as e:
        raise _BadReply(f"malformed reply (not JSON): {raw_text[:80]!r}") from e
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _BadReply("malformed reply (no choices)")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        raise _BadReply("malformed reply (message content is not text)")
    if not content or not content.strip():
        raise _BadReply("empty reply")
    return data, content, choices[0].get("finish_reason")


class LLMClient:
    """Chat completions against one configured endpoint; see the module docstring for the policy."""

    def __init__(self, config: LLMConfig, *, sleep: Callable[[float], Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.usage = UsageTracker()
        self._stop = threading.Event()
        self._sleep = sleep
        self._rng = random.Random()
        self.cache = ResponseCache(config.cache_path) if config.cache_path else None
        self._client = self._make_openai_client()

    def _make_openai_client(self) -> Any:
        import openai  # imported here so that `medvlm --help` does not pay for it

        cfg = self.config
        env = cfg.resolved_api_key_env()
        if env:
            key = os.environ.get(env)
            if not key:
                raise MedvlmError(
                    f"environment variable {env} (the API key) is not set; for a server without "
                    "keys pass an empty --api-key-env"
                )
        else:
            key = "no-key"  # the openai client insists on a value; keyless local servers ignore it
        if cfg.azure_endpoint:
            return openai.AzureOpenAI(
                azure_endpoint=cfg.azure_endpoint,
                api_version=cfg.azure_api_version,
                azure_deployment=cfg.azure_deployment or cfg.model,
                api_key=key,
                max_retries=0,
                timeout=cfg.timeout,
            )
        return openai.OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout)

    def close(self) -> None:
        """Release the HTTP client and the cache."""
        self._client.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one request --------------------------------------------------------------------------
    def build_body(self, messages: list[dict], params: dict | None = None) -> dict:
        """The full request body (also the cache key's content)."""
        cfg = self.config
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
            cfg.max_tokens_field: cfg.max_tokens,
        }
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        body.update(cfg.extra_params)
        body.update(params or {})
        return body

    def _wait(self, seconds: float) -> bool:
        """Sleep (interruptible by a batch stop); False if the batch was stopped."""
        if self._sleep is not None:
            self._sleep(seconds)
            return not self._stop.is_set()
        return not self._stop.wait(seconds)

    def _backoff(self, retry: int) -> float:
        return backoff_delay(retry, self.config.backoff_base, self.config.backoff_max, rng=self._rng)

    def complete(self, messages: list[dict], params: dict | None = None, *, tag: Any = None) -> LLMResult:
        """Send one chat request (cache first); never raises for API failures: see ``LLMResult.error``."""
        import openai

        body = self.build_body(messages, params)
        key = request_key(body)
        result = LLMResult(key=key, tag=tag)
        if self.cache is not None:
            hit = self.cache.get(key)
            try:
                _, text, finish = parse_reply(json.dumps(hit)) if hit is not None else (None, None, None)
            except _BadReply:
                hit = None  # an entry edited by hand into something unusable: ask again
            if hit is not None:
                usage = hit.get("usage") or {}
                self.usage.add(
                    cached=1,
                    cached_prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    cached_completion_tokens=int(usage.get("completion_tokens") or 0),
                )
                result.text, result.response, result.usage, result.finish_reason, result.cached = (
                    text,
                    hit,
                    usage,
                    finish,
                    True,
                )
                return result
        extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
        retry = 0
        while True:
            if self._stop.is_set():
                result.error = "batch stopped before this request finished"
                break
            result.attempts += 1
            self.usage.add(http_requests=1)
            wait_for: float | None = None
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=body["model"], messages=messages, extra_body=extra
                )
                data, text, finish = parse_reply(raw.http_response.text)
            except openai.APIStatusError as e:
                status = e.status_code
                code = e.code  # the openai client unwraps {"error": {...}} into e.body / e.code
                reason = f"HTTP {status}"
                if status in (401, 403, 404) or (status == 429 and code == "insufficient_quota"):
                    result.error, result.fatal = f"{reason}: {e.message}", True
                    break
                if status == 429:
                    ra = retry_after_seconds(e.response.headers)
                    wait_for = min(ra, self.config.retry_after_max) if ra is not None else None
                elif not (status >= 500 or status in (408, 409)):
                    result.error = f"{reason}: {e.message}"
                    break
            except openai.APITimeoutError:
                reason = "timeout"
            except openai.APIConnectionError as e:
                reason = f"connection error ({e.message})"
            except _BadReply as e:
                reason = str(e)
            else:
                usage = data.get("usage") or {}
                self.usage.add(
                    completed=1,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
                if self.cache is not None:
                    self.cache.put(key, body, data)
                result.text, result.response, result.usage, result.finish_reason = text, data, usage, finish
                return result
            if retry >= self.config.retries:
                result.error = f"{reason} (gave up after {result.attempts} attempts)"
                break
            self.usage.add_retry(reason.split(" (")[0])
            delay = wait_for if wait_for is not None else self._backoff(retry)
            retry += 1
            if not self._wait(delay):
                result.error = f"{reason}; batch stopped before the retry"
                break
        self.usage.add(failed=1)
        return result

    # ---- many requests ------------------------------------------------------------------------
    def complete_many(
        self,
        requests: Iterable[LLMRequest],
        *,
        on_result: Callable[[LLMResult], None] | None = None,
        desc: str = "LLM requests",
        keep_results: bool = True,
        total: int | None = None,
    ) -> list[LLMResult]:
        """Run requests with at most ``concurrency`` in flight; ``on_result`` is called in this thread as each ends.

        ``requests`` may be a lazy iterable (pass ``total`` for the progress bar); at most
        ``concurrency`` of them are built ahead. Returns the results in request order (empty when
        ``keep_results`` is False). Raises
        :class:`LLMFatalError` after delivering the requests in flight when one hits an error every
        request would hit.
        """
        self._stop.clear()
        if total is None and isinstance(requests, Sized):
            total = len(requests)
        results: list[LLMResult] = []
        fatal: LLMResult | None = None
        it = enumerate(requests)
        limit = self.config.concurrency
        bar = tqdm(total=total, desc=desc, unit="req", disable=not self.config.progress)
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="medvlm-llm") as pool:
            pending: set[Future] = set()

            def fill() -> None:
                while fatal is None and len(pending) < limit:
                    nxt = next(it, None)
                    if nxt is None:
                        return
                    i, req = nxt
                    pending.add(pool.submit(self._indexed, i, req))

            try:
                fill()
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        res: LLMResult = fut.result()
                        bar.update(1)
                        if res.fatal and fatal is None:
                            fatal = res
                            self._stop.set()
                        if on_result is not None:
                            on_result(res)
                        if keep_results:
                            results.append(res)
                    fill()
            except BaseException:
                self._stop.set()  # cut the retry sleeps of requests in flight short (e.g. on_result failed)
                pool.shutdown(wait=True)
                self._stop.clear()
                raise
            finally:
                bar.close()
        self._stop.clear()
        if fatal is not None:
            raise LLMFatalError(
                f"{fatal.error} - stopping: every request to {self.config.model!r} would fail "
                "(check the key, model/deployment name and quota)"
            )
        results.sort(key=lambda r: r.index)
        return results

    def _indexed(self, index: int, req: LLMRequest) -> LLMResult:
        res = self.complete(req.messages, req.params, tag=req.tag)
        res.index = index
        return res
