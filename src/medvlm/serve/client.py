"""Clients of the LLaVA controller / worker protocol (``test-message`` and the web UI use them).

``secret``: the shared secret of a controller and its workers started with ``--secret-env``; it is sent
as ``Authorization: Bearer SECRET`` to both (LLaVA's payloads are unchanged).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx

from medvlm.data.schema import Message
from medvlm.data.templates import render_text
from medvlm.errors import MedvlmError
from medvlm.serve.guard import bearer

DEFAULT_TEST_MESSAGE = "Tell me a story with more than 1000 words."
"""The message LLaVA's ``test_message.py`` sends."""


def _post(url: str, timeout: float = 10.0, secret: str | None = None, **kwargs) -> dict:
    try:
        r = httpx.post(url, timeout=timeout, headers=bearer(secret), **kwargs)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise MedvlmError(f"{url}: request failed ({type(e).__name__}: {e})") from None


def list_models(controller: str, refresh: bool = True, secret: str | None = None) -> list[str]:
    """Model names the controller's workers serve (after ``/refresh_all_workers`` when ``refresh``)."""
    if refresh:
        _post(controller.rstrip("/") + "/refresh_all_workers", secret=secret)
    return list(_post(controller.rstrip("/") + "/list_models", secret=secret).get("models", []))


def worker_address(controller: str, model: str, secret: str | None = None) -> str:
    """The worker the controller picks for ``model`` ("" when none serves it)."""
    return str(
        _post(controller.rstrip("/") + "/get_worker_address", secret=secret, json={"model": model}).get("address", "")
    )


def worker_template(worker: str, secret: str | None = None) -> str | None:
    """The chat-template name a medvlm worker reports (None for workers that do not report one)."""
    t = _post(worker.rstrip("/") + "/worker_get_status", secret=secret).get("template")
    return t if isinstance(t, str) and t else None


def stream_worker(url: str, payload: dict, timeout: float = 120.0, secret: str | None = None) -> Iterator[dict]:
    """POST ``payload`` to a ``/worker_generate_stream`` URL and yield its NUL-delimited JSON objects.

    A refused request (HTTP 4xx/5xx) whose body is a LLaVA error frame yields that frame; other HTTP errors
    raise :class:`MedvlmError`.
    """
    try:
        with httpx.stream(
            "POST",
            url,
            json=payload,
            timeout=httpx.Timeout(10.0, read=timeout),
            headers={"User-Agent": "LLaVA Client", **bearer(secret)},
        ) as r:
            if r.status_code >= 400:
                body = b""
                for data in r.iter_bytes():  # an error frame is small: read at most 64 KiB of it
                    body += data
                    if len(body) > 65536:
                        break
                if body.endswith(b"\0"):
                    yield json.loads(body[:-1].decode("utf-8"))
                    return
                r.raise_for_status()
            buf = b""
            for data in r.iter_bytes():
                buf += data
                *chunks, buf = buf.split(b"\0")
                for chunk in chunks:
                    if chunk:
                        yield json.loads(chunk.decode("utf-8"))
    except (httpx.HTTPError, ValueError) as e:
        raise MedvlmError(f"{url}: streaming failed ({type(e).__name__}: {e})") from None


def render_prompt(messages: list[Message], template: str) -> str:
    """The prompt string a worker expects: the conversation rendered with ``<image>`` placeholders."""
    return render_text(messages, template, add_generation_prompt=True)


def send_test_message(
    controller: str,
    model: str,
    message: str = DEFAULT_TEST_MESSAGE,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.7,
    template: str | None = None,
    worker: str | None = None,
    on_text: Callable[[str], None] | None = None,
    secret: str | None = None,
) -> str:
    """LLaVA's test client: find a worker through the controller, stream one reply; returns the answer.

    ``on_text`` receives each new piece of the answer as it streams.
    """
    if worker is None:
        list_models(controller, secret=secret)
        worker = worker_address(controller, model, secret=secret)
        if not worker:
            raise MedvlmError(f"the controller at {controller} has no worker serving model {model!r}")
    tpl = template or worker_template(worker, secret=secret)
    if tpl is None:
        raise MedvlmError(f"worker {worker} does not report its chat template; pass --template")
    prompt = render_prompt([Message.from_text("user", message)], tpl)
    payload = {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature}
    answer = ""
    for data in stream_worker(worker.rstrip("/") + "/worker_generate_stream", payload, secret=secret):
        if data.get("error_code", 0) != 0:
            raise MedvlmError(f"worker {worker}: {data.get('text', '')}")
        new = str(data.get("text", ""))[len(prompt) :].lstrip()
        if new.startswith(answer) and len(new) > len(answer) and on_text is not None:
            on_text(new[len(answer) :])
        answer = new
    return answer.strip()
