"""``medvlm serve web``: a Gradio chat page over a LLaVA controller or an OpenAI-compatible API.

Image upload (one image per conversation by default: uploading another starts a new conversation;
``max_images`` > 1 attaches each new image to the next question), generated example images and
questions, model picker, temperature / top-p / max tokens, regenerate, clear, up/down vote and flag
logged to a JSONL file (text only unless ``log_images``). The research-only notice is on the page.
``/answer`` is a stateless API endpoint (image, question, model, sampling) for ``gradio_client``.

Gradio looks up outside hosts at start unless ``GRADIO_ANALYTICS_ENABLED=False`` is set before it
is imported, so this module sets it before importing gradio; the page uses system fonts only, so it
works with no network.

Hostile visitors (docs/security.md): the page shows a generic message when the backend fails (the
detail, with backend URLs, goes to the server log only; Gradio's ``show_error`` is off); request bodies
are capped as they stream (:class:`medvlm.serve.guard.RequestGuard`) and uploads by Gradio's
``max_file_size``; ``auth`` turns on Gradio's login; beyond loopback the page refuses to start without
it (unless ``insecure_no_auth``), and never without it when it would lend an API key or controller secret
to its visitors. Example images are written to a private ``mkdtemp`` folder.
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE
from medvlm.serve.guard import RequestGuard, is_loopback
from medvlm.serve.web_backends import GENERIC_ERROR, Backend, BackendError, Sampling, Turn
from medvlm.utils.io import append_jsonl

logger = logging.getLogger("medvlm.serve.web")

EXAMPLE_QUESTIONS: dict[str, str] = {
    "xray": "What abnormality is seen in this chest radiograph?",
    "histology": "Describe the tissue shown in this histology image.",
    "ct": "How many lesions are visible in this CT slice?",
}
"""Example questions for the generated example images (synthetic, drawn by medvlm.data.synth.render)."""


@dataclass(frozen=True)
class WebConfig:
    """Settings of ``medvlm serve web``."""

    log_file: Path = Path("medvlm_web_log.jsonl")
    """Votes and flags are appended here (JSON lines)."""
    log_images: bool = False
    """Also log the conversation's images (base64) with votes/flags."""
    max_images: int = 1
    """Images per conversation (1: a new upload starts a new conversation)."""
    example_images: tuple[str, ...] = ()
    """Extra example images (files the user points at), asked about with a generic question."""
    concurrency: int = 4
    """Conversations answered at the same time."""
    auth: tuple[str, str] | None = None
    """Gradio login (user, password); required beyond loopback. The CLI reads ``user:password`` from an
    environment variable (``--auth-env``)."""
    max_upload_bytes: int = 20 * 2**20
    """Largest uploaded file (Gradio's ``max_file_size``); request bodies are capped at this plus 1 MiB."""


def check_web_bind(host: str, config: WebConfig, lends_key: bool, insecure_no_auth: bool) -> None:
    """Refuse a page reachable beyond loopback without a login (always when it would lend a key or secret)."""
    if is_loopback(host) or config.auth is not None:
        return
    if lends_key:
        raise MedvlmError(
            f"medvlm serve web: --host {host} without --auth-env would let every visitor use the API "
            "key / controller secret the page holds; set --auth-env VAR (VAR holds user:password) "
            "or bind 127.0.0.1"
        )
    if not insecure_no_auth:
        raise MedvlmError(
            f"medvlm serve web: --host {host} makes the page reachable from other machines without a "
            "login: set --auth-env VAR (VAR holds user:password), bind 127.0.0.1, or pass "
            "--insecure-no-auth (see docs/security.md)"
        )


def generated_examples(folder: Path) -> list[list[str]]:
    """Small synthetic example images (written into ``folder``) with a question each."""
    import numpy as np

    from medvlm.data.synth.render import Factors, render

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (modality, question) in enumerate(EXAMPLE_QUESTIONS.items()):
        path = folder / f"example_{modality}.png"
        if not path.is_file():
            render(
                Factors(
                    modality=modality,
                    count=2 if i else 1,
                    side="left" if i % 2 else "right",
                    size="large",
                    intensity="bright",
                ),
                np.random.default_rng(i),
                192,
            ).save(path)
        rows.append([str(path), question])
    return rows


def _chat_view(turns: list[Turn]) -> list[dict]:
    """Chatbot messages for the turns (images shown before their question)."""
    out: list[dict] = []
    for t in turns:
        for p in t.images:
            out.append({"role": "user", "content": {"path": p}})
        out.append({"role": "user", "content": t.text})
        if t.answer is not None:
            out.append({"role": "assistant", "content": t.answer})
    return out


class WebChat:
    """The page's logic, independent of Gradio widgets (so it is testable and callable from Python)."""

    def __init__(self, backend: Backend, config: WebConfig):
        self.backend, self.config = backend, config
        self._log_lock = threading.Lock()

    def new_state(self) -> dict:
        return {"turns": [], "images_used": []}

    def add_question(self, state: dict, text: str, image: str | None) -> dict:
        """Append a question (with the uploaded image if it is new to this conversation)."""
        text = (text or "").strip()
        if not text:
            raise MedvlmError("type a question first")
        images: list[str] = []
        if image and image not in state["images_used"]:
            if len(state["images_used"]) >= self.config.max_images:
                state = self.new_state()  # one image per conversation: a new image starts a new one
            images = [image]
            state["images_used"].append(image)
        state["turns"].append(Turn(text=text, images=images))
        return state

    def answer(self, state: dict, model: str, sampling: Sampling):
        """Stream the answer to the last question (yields the state as the answer grows)."""
        if not state["turns"]:
            return
        if not model:
            raise MedvlmError("pick a model first")
        turn = state["turns"][-1]
        turn.answer = ""
        for text in self.backend.stream(model, state["turns"][:-1] + [Turn(turn.text, turn.images)], sampling):
            turn.answer = text
            yield state

    def log_event(self, kind: str, state: dict, model: str, sampling: Sampling) -> Path:
        """Append a vote / flag with the conversation text (images only when ``log_images``)."""
        row: dict[str, Any] = {
            "time": round(time.time(), 3),
            "type": kind,
            "model": model,
            "sampling": {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
            },
            "conversation": [
                {"question": t.text, "answer": t.answer, "num_images": len(t.images)} for t in state["turns"]
            ],
        }
        if self.config.log_images:
            row["images"] = [base64.b64encode(Path(p).read_bytes()).decode() for t in state["turns"] for p in t.images]
        with self._log_lock:
            self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.config.log_file, row)
        return self.config.log_file


def private_examples_dir() -> Path:
    """A fresh private folder (``mkdtemp``: mode 0700, unpredictable name) removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="medvlm-web-examples-")
    atexit.register(shutil.rmtree, folder, True)
    return Path(folder)


def build_ui(backend: Backend, config: WebConfig, examples_dir: Path | None = None):
    """The Gradio Blocks app (example images go to ``examples_dir``, a private temp folder by default)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no outside look-ups
    import gradio as gr

    chat = WebChat(backend, config)
    try:
        models = backend.models()
    except BackendError as e:
        logger.warning("cannot list models: %s", e)
        models = []
    examples = generated_examples(examples_dir or private_examples_dir())
    examples += [[str(Path(p).resolve()), "Describe this image."] for p in config.example_images]

    def sampling(t: float, p: float, n: float) -> Sampling:
        return Sampling(temperature=float(t), top_p=float(p), max_tokens=int(n))

    with gr.Blocks(title="medvlm chat", analytics_enabled=False) as demo:
        gr.Markdown("# medvlm: biomedical visual chat")
        gr.Markdown(f"**{NOTICE}**", elem_id="medvlm-notice")
        state = gr.State(chat.new_state())
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(
                    choices=models, value=models[0] if models else None, label="Model", interactive=True
                )
                refresh = gr.Button("Refresh models", size="sm")
                image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="medvlm-image")
                question = gr.Textbox(
                    label="Question", placeholder="Ask about the image and press Enter", elem_id="medvlm-question"
                )
                gr.Examples(examples=examples, inputs=[image, question], label="Examples")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
                    top_p = gr.Slider(0.1, 1.0, value=0.7, step=0.1, label="Top P")
                    max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max output tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="medvlm-chatbot")
                send = gr.Button("Send", variant="primary", elem_id="medvlm-send")
                with gr.Row():
                    upvote = gr.Button("Upvote")
                    downvote = gr.Button("Downvote")
                    flag = gr.Button("Flag")
                    regenerate = gr.Button("Regenerate")
                    clear = gr.Button("Clear")
                answer_out = gr.Textbox(visible=False)
        knobs = [temperature, top_p, max_tokens]

        def ask(st, text, img):
            try:
                st = chat.add_question(st, text, img)
            except MedvlmError as e:
                gr.Warning(str(e))
                return st, _chat_view(st["turns"]), text
            return st, _chat_view(st["turns"]), ""

        def respond(st, m, t, p, n):
            try:
                for st in chat.answer(st, m, sampling(t, p, n)):  # noqa: B020 - each state replaces the last
                    yield st, _chat_view(st["turns"])
            except MedvlmError as e:
                if isinstance(e, BackendError):
                    logger.warning("backend error: %s", e)  # the detail names internal URLs: log only
                shown = GENERIC_ERROR if isinstance(e, BackendError) else str(e)
                if st["turns"] and not st["turns"][-1].answer:
                    st["turns"][-1].answer = f"(error: {shown})"
                gr.Warning(shown)
                yield st, _chat_view(st["turns"])

        def redo(st):
            if st["turns"]:
                st["turns"][-1].answer = None
            return st, _chat_view(st["turns"])

        def reset():
            return chat.new_state(), [], None, ""

        def log(kind):
            def fn(st, m, t, p, n):
                if not st["turns"]:
                    gr.Warning("nothing to rate yet")
                    return
                chat.log_event(kind, st, m, sampling(t, p, n))
                gr.Info(f"{kind} recorded, thank you")

            return fn

        def answer_api(img, text, m, t, p, n) -> str:
            """Stateless: answer one question about one image (or none)."""
            try:
                st = chat.add_question(chat.new_state(), text, img)
                final = ""
                for st in chat.answer(st, m, sampling(t, p, n)):  # noqa: B020 - each state replaces the last
                    final = st["turns"][-1].answer or ""
            except BackendError as e:
                logger.warning("backend error: %s", e)
                raise gr.Error(GENERIC_ERROR) from None
            except MedvlmError as e:
                raise gr.Error(str(e)) from None
            return final

        def refresh_models():
            try:
                names = backend.models()
            except BackendError as e:
                logger.warning("cannot list models: %s", e)
                gr.Warning(GENERIC_ERROR)
                return gr.Dropdown()
            return gr.Dropdown(choices=names, value=names[0] if names else None)

        for trigger in (question.submit, send.click):
            trigger(ask, [state, question, image], [state, chatbot, question], api_visibility="private").then(
                respond, [state, model, *knobs], [state, chatbot], api_visibility="private"
            )
        regenerate.click(redo, [state], [state, chatbot], api_visibility="private").then(
            respond, [state, model, *knobs], [state, chatbot], api_visibility="private"
        )
        clear.click(reset, None, [state, chatbot, image, question], api_visibility="private")
        for button, kind in ((upvote, "upvote"), (downvote, "downvote"), (flag, "flag")):
            button.click(log(kind), [state, model, *knobs], None, api_visibility="private")
        refresh.click(refresh_models, None, [model], api_visibility="private")
        answer_btn = gr.Button(visible=False)
        answer_btn.click(answer_api, [image, question, model, *knobs], [answer_out], api_name="answer")
    return demo


def launch_web(
    backend: Backend,
    config: WebConfig,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    lends_key: bool = False,
    insecure_no_auth: bool = False,
):
    """Start the page; with ``block`` False returns ``(demo, url)`` and serves in the background.

    ``lends_key``: the backend holds an API key or controller secret (then a login is required beyond
    loopback whatever ``insecure_no_auth`` says).
    """
    check_web_bind(host, config, lends_key, insecure_no_auth)
    demo = build_ui(backend, config)
    import gradio as gr
    from starlette.middleware import Middleware

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # no web fonts: works offline
    demo.queue(default_concurrency_limit=config.concurrency)
    print(f"medvlm web UI on http://{host}:{port}/\n{NOTICE}", flush=True)
    guard = Middleware(RequestGuard, max_body_bytes=config.max_upload_bytes + (1 << 20))
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=True,
        show_error=False,
        theme=theme,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        auth=config.auth,
        max_file_size=config.max_upload_bytes,
        app_kwargs={"middleware": [guard]},
    )
    return demo, url
