"""Where the web UI's answers come from: a LLaVA controller (workers) or an OpenAI-compatible API.

Failures of the backend raise :class:`BackendError`; its message names URLs and the backend's own error
text, so the page shows visitors a generic message and only the server log gets the detail.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from medvlm.data.schema import Message, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.serve import client


@dataclass
class Turn:
    """One exchange of a web conversation."""

    text: str
    """The user's question."""
    images: list[str] = field(default_factory=list)
    """Image files attached to this question (shown before it)."""
    answer: str | None = None
    """The model's answer (None while it is being generated)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling controls of the page."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_tokens: int = 256


class BackendError(MedvlmError):
    """The backend failed; the message is for the operator's log, never for page visitors."""


GENERIC_ERROR = "the model server could not answer; please try again later"
"""What page visitors see when the backend fails."""


class Backend(Protocol):
    """Lists models and streams answers (each yield is the whole answer so far)."""

    def models(self) -> list[str]: ...

    def stream(self, model: str, turns: list[Turn], sampling: Sampling) -> Iterator[str]: ...


def _data_url(path: str) -> str:
    data = Path(path).read_bytes()
    mime = "application/dicom" if data[128:132] == b"DICM" else (mimetypes.guess_type(path)[0] or "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ApiBackend:
    """An OpenAI-compatible ``/v1`` server (``medvlm serve api``, or vLLM serving an exported model)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        from openai import OpenAI

        url = base_url.rstrip("/")
        self.client = OpenAI(
            base_url=url if url.endswith("/v1") else url + "/v1",
            api_key=api_key or "none",
            timeout=timeout,
            max_retries=0,
        )

    def models(self) -> list[str]:
        import openai

        try:
            return sorted(m.id for m in self.client.models.list())
        except openai.OpenAIError as e:
            raise BackendError(f"{self.client.base_url}: cannot list models ({type(e).__name__}: {e})") from None

    def stream(self, model: str, turns: list[Turn], sampling: Sampling) -> Iterator[str]:
        import openai

        messages: list[dict] = []
        for t in turns:
            content: list[dict] = [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in t.images]
            content.append({"type": "text", "text": t.text})
            messages.append({"role": "user", "content": content})
            if t.answer is not None:
                messages.append({"role": "assistant", "content": t.answer})
        answer = ""
        try:
            for chunk in self.client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    yield answer
        except openai.OpenAIError as e:
            raise BackendError(f"{self.client.base_url}: the API answered with an error: {e}") from None


class ControllerBackend:
    """LLaVA's controller + model workers: the prompt is rendered here with the worker's chat template."""

    def __init__(self, controller_url: str, template: str | None = None, secret: str | None = None):
        self.controller = controller_url.rstrip("/")
        self.template = template
        self.secret = secret
        """Shared secret of the controller and its workers (sent as ``Authorization: Bearer``)."""

    def models(self) -> list[str]:
        try:
            return client.list_models(self.controller, secret=self.secret)
        except MedvlmError as e:
            raise BackendError(str(e)) from None

    def stream(self, model: str, turns: list[Turn], sampling: Sampling) -> Iterator[str]:
        try:
            yield from self._stream(model, turns, sampling)
        except BackendError:
            raise
        except MedvlmError as e:
            raise BackendError(str(e)) from None

    def _stream(self, model: str, turns: list[Turn], sampling: Sampling) -> Iterator[str]:
        worker = client.worker_address(self.controller, model, secret=self.secret)
        if not worker:
            raise MedvlmError(f"no worker serves {model!r} right now; refresh the model list")
        template = self.template or client.worker_template(worker, secret=self.secret)
        if template is None:
            raise MedvlmError(f"worker {worker} does not report its chat template; start the UI with --template")
        messages: list[Message] = []
        images: list[str] = []
        for t in turns:
            messages.append(Message(role="user", content=[image_part() for _ in t.images] + [text_part(t.text)]))
            images += [base64.b64encode(Path(p).read_bytes()).decode() for p in t.images]
            if t.answer is not None:
                messages.append(Message(role="assistant", content=[text_part(t.answer)]))
        prompt = client.render_prompt(messages, template)
        payload = {
            "model": model,
            "prompt": prompt,
            "images": images,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_tokens,
        }
        for data in client.stream_worker(worker.rstrip("/") + "/worker_generate_stream", payload, secret=self.secret):
            if data.get("error_code", 0) != 0:
                raise BackendError(f"{worker}: {data.get('text', 'the worker failed')}")
            yield str(data.get("text", ""))[len(prompt) :].strip()
