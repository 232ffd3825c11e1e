"""``serve worker`` and ``serve web`` on model-family checkpoints: LLaVA's rendered-prompt protocol is read back into
turns in the worker's named template, and every path (raw protocol, controller + web backend, API + web backend)
answers what the engine alone answers under greedy."""

from __future__ import annotations

import base64

import httpx
import pytest

from family_helpers import FAMILY_NAMES, SHARED_IMAGES, msgs, tiny
from medvlm.data.images import load_image
from medvlm.data.schema import Message, Sample
from medvlm.data.template_parse import parse_generation_prompt
from medvlm.data.templates import TEMPLATES, render_text
from medvlm.errors import MedvlmError
from medvlm.infer.decoding import GenerationSettings
from medvlm.infer.engine import InferenceEngine
from medvlm.serve import client
from medvlm.serve.api import ApiConfig, create_app
from medvlm.serve.batching import BatcherConfig
from medvlm.serve.controller import ControllerConfig, create_controller_app
from medvlm.serve.server import BackgroundServer, free_port
from medvlm.serve.web import WebChat, WebConfig
from medvlm.serve.web_backends import ApiBackend, BackendError, ControllerBackend, Sampling, Turn
from medvlm.serve.worker import WorkerConfig, create_worker_app

MAX_NEW = 8
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
"""LLaVA v1.5's ``conv_llava_v1`` system prompt (its own clients send it, without a leading ``<s>``)."""

CONVERSATIONS = [
    msgs(("user", "<image>\nWhat is shown?")),
    msgs(("system", "Be brief."), ("user", "<image>\nWhat?"), ("assistant", "A lung."), ("user", "Compare\n<image>")),
    msgs(("system", ""), ("user", "Hi USER: there")),
]


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "plain"])
def test_rendered_prompts_read_back_into_the_same_turns(name):
    for conv in CONVERSATIONS + (
        [
            msgs(
                ("user", "<image>\nq"),
                ("assistant", "a"),
                ("vuser", "Which organ?"),
                ("assistant", "The lung."),
                ("user", "Sure?"),
            )
        ]
        if name == "v1_sq"
        else []
    ):
        text = render_text(conv, name, add_generation_prompt=True)
        back = parse_generation_prompt(text, name)
        assert render_text(back, name, add_generation_prompt=True) == text
        assert [m.role for m in back if m.role != "system"] == [m.role for m in conv if m.role != "system"]
        assert [m.num_images for m in back if m.role != "system"] == [m.num_images for m in conv if m.role != "system"]
        if name != "mistral_instruct":  # mistral folds a system prompt into the first question
            assert [m.text for m in back] == [m.text for m in conv]


def test_llava_clients_prompt_without_bos_and_their_own_system_prompt():
    prompt = f"{LLAVA_SYSTEM} USER: <image>\nIs there a mass? ASSISTANT: No.</s>USER: Sure? ASSISTANT:"
    back = parse_generation_prompt(prompt, "vicuna_v1")
    assert [(m.role, m.text, m.num_images) for m in back] == [
        ("system", LLAVA_SYSTEM, 0),
        ("user", "Is there a mass?", 1),
        ("assistant", "No.", 0),
        ("user", "Sure?", 0),
    ]
    # The template's default system prompt comes back as none (it is the client's, not the user's).
    assert [
        m.role for m in parse_generation_prompt(render_text(msgs(("user", "q")), "vicuna_v1", True), "vicuna_v1")
    ] == ["user"]


def test_prompts_in_another_template_or_asking_a_question_are_refused():
    chatml = render_text(msgs(("user", "<image>\nq")), "chatml", add_generation_prompt=True)
    with pytest.raises(MedvlmError, match="not a vicuna_v1 generation prompt"):
        parse_generation_prompt(chatml, "vicuna_v1")
    with pytest.raises(MedvlmError, match="not a vicuna_v1 generation prompt"):
        parse_generation_prompt("USER: q ASSISTANT: a", "vicuna_v1")  # an answer, not a prompt
    asks = render_text(msgs(("user", "<image>\nq"), ("assistant", "a")), "v1_sq", add_generation_prompt=True)
    with pytest.raises(MedvlmError, match="asks for a 'VUSER:' question"):
        parse_generation_prompt(asks, "v1_sq")
    with pytest.raises(MedvlmError, match="drops the user's text"):
        parse_generation_prompt("<s><image>", "plain")


def _expected(engine: InferenceEngine, conv: list[Message], images: list) -> str:
    sample = Sample("x", conv, images=[f"i{k}" for k in range(len(images))])
    return engine.generate([sample], GenerationSettings(max_new_tokens=MAX_NEW), images=[images])[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_worker_answers_the_llava_protocol_and_the_web_ui_like_the_engine(family, tmp_path):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=4)
    path = SHARED_IMAGES / "synpic32933.jpg"
    image = load_image(path)
    # What `medvlm chat` / `serve api` answer (the engine alone), computed before any server shares the engine.
    first = msgs(("user", "<image>\nIs there a mass?"))
    follow = first + msgs(("assistant", "No mass is seen."), ("user", "Which organ is it?"))
    llava_conv = [Message.from_text("system", LLAVA_SYSTEM)] + first
    expected = {
        k: _expected(engine, c, [image]) for k, c in (("first", first), ("follow", follow), ("llava", llava_conv))
    }
    assert expected["first"]

    port = free_port()
    with BackgroundServer(create_controller_app(ControllerConfig(heart_beat_expiration=5.0))) as ctrl:
        wcfg = WorkerConfig(
            controller_url=ctrl.url,
            worker_url=f"http://127.0.0.1:{port}",
            model_name=f"tiny-{family}",
            heart_beat_interval=0.5,
            batcher=BatcherConfig(max_batch=4, max_wait_ms=5),
        )
        with (
            BackgroundServer(create_worker_app(engine, wcfg), port=port) as worker,
            BackgroundServer(create_app(engine, ApiConfig(model_name=f"tiny-{family}"))) as api,
        ):
            assert client.list_models(ctrl.url) == [f"tiny-{family}"]
            assert client.worker_template(worker.url) == (processor.template or "vicuna_v1")
            # LLaVA's own client: its system prompt, no leading <s>; `text` is prompt + answer so far.
            prompt = f"{LLAVA_SYSTEM} USER: <image>\nIs there a mass? ASSISTANT:"
            if processor.template not in (None, "vicuna_v1"):
                prompt = render_text(llava_conv, processor.template, add_generation_prompt=True)
            payload = {
                "model": f"tiny-{family}",
                "prompt": prompt,
                "temperature": 0.0,
                "max_new_tokens": MAX_NEW,
                "images": [base64.b64encode(path.read_bytes()).decode()],
                "stop": "</s>",
            }
            frames = list(client.stream_worker(worker.url + "/worker_generate_stream", payload))
            assert frames and all(f["error_code"] == 0 and f["text"].startswith(prompt) for f in frames)
            assert frames[-1]["text"][len(prompt) :].strip() == expected["llava"]
            # The web UI through the controller, and through the API (the direct backend), over two turns.
            sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=MAX_NEW)
            for backend in (ControllerBackend(ctrl.url), ApiBackend(api.url)):
                chat = WebChat(backend, WebConfig(log_file=tmp_path / "log.jsonl"))
                state = chat.add_question(chat.new_state(), "Is there a mass?", str(path))
                state = list(chat.answer(state, f"tiny-{family}", sampling))[-1]
                assert state["turns"][-1].answer == expected["first"], type(backend).__name__
                state["turns"][-1].answer = "No mass is seen."
                state = chat.add_question(state, "Which organ is it?", None)
                state = list(chat.answer(state, f"tiny-{family}", sampling))[-1]
                assert state["turns"][-1].answer == expected["follow"], type(backend).__name__
            # A prompt in another template than the worker reads is refused with LLaVA's error frame.
            bad = render_text(first, "chatml", add_generation_prompt=True)
            r = httpx.post(worker.url + "/worker_generate_stream", json={**payload, "prompt": bad}, timeout=30)
            assert r.status_code == 400 and b"generation prompt" in r.content and b'"error_code": 1' in r.content
            with pytest.raises(BackendError, match=f"not a {processor.template or 'vicuna_v1'} generation prompt"):
                list(ControllerBackend(ctrl.url, template="chatml").stream(f"tiny-{family}", [Turn("q")], sampling))


def test_worker_templates_are_checked_up_front(tmp_path):
    from medvlm.model.build import build_preset

    def config(template):
        return WorkerConfig(
            controller_url="http://127.0.0.1:1",
            worker_url="http://127.0.0.1:2",
            model_name="m",
            register=False,
            template=template,
        )

    model, processor = tiny("idefics3")
    engine = InferenceEngine(model, processor)
    assert create_worker_app(engine, config("chatml")).state.worker.get_status()["template"] == "chatml"
    with pytest.raises(MedvlmError, match="drops the question text"):
        create_worker_app(engine, config("plain"))
    with pytest.raises(MedvlmError, match="unknown chat template"):
        create_worker_app(engine, config("nope"))
    native = InferenceEngine(*build_preset("tiny"))
    assert create_worker_app(native, config(None)).state.worker.get_status()["template"] == "mistral_instruct"
    with pytest.raises(MedvlmError, match="its own template 'mistral_instruct' only"):
        create_worker_app(native, config("chatml"))


def test_worker_cli_takes_the_template_option(tmp_path, capsys):
    from medvlm.cli import main
    from medvlm.model.families.tiny import init_tiny_family

    start = init_tiny_family("tiny-idefics3", tmp_path / "idefics3")
    with pytest.raises(SystemExit) as exit_info:  # refused before the server binds or registers
        main(
            [
                "serve",
                "worker",
                "--controller",
                "http://127.0.0.1:1",
                "--model",
                str(start),
                "--no-register",
                "--template",
                "plain",
            ]
        )
    assert exit_info.value.code == 2
    assert "drops the question text" in capsys.readouterr().err
