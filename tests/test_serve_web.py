"""``medvlm serve web``: gradio_client and a headless Chromium against the page (over a live API)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from medvlm.data.images import load_image  # noqa: E402
from medvlm.data.schema import Message, Sample  # noqa: E402
from medvlm.infer.engine import GenerationSettings  # noqa: E402
from medvlm.notice import NOTICE  # noqa: E402
from medvlm.serve.api import ApiConfig, create_app, load_engine  # noqa: E402
from medvlm.serve.server import BackgroundServer, free_port  # noqa: E402
from medvlm.serve.web import WebChat, WebConfig, launch_web  # noqa: E402
from medvlm.serve.web_backends import ApiBackend, Sampling  # noqa: E402
from serve_helpers import tiny_checkpoint  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(str(tiny_checkpoint(tmp_path_factory)))


@pytest.fixture(scope="module")
def web(engine, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("web") / "votes.jsonl"
    with BackgroundServer(create_app(engine, ApiConfig(model_name="tiny-med"))) as api:
        config = WebConfig(log_file=log_file)
        demo, url = launch_web(ApiBackend(api.url), config, port=free_port(), block=False)
        try:
            yield url, log_file
        finally:
            demo.close()


def _expected(engine, image: Path, question: str, n: int) -> str:
    sample = Sample(id="x", messages=[Message.from_text("user", "<image>\n" + question)], images=["i"])
    return engine.generate([sample], GenerationSettings(max_new_tokens=n), images=[[load_image(image)]])[0]


def test_gradio_client_answers_like_the_engine(web, engine, shared_dir: Path) -> None:
    from gradio_client import Client, handle_file

    url, _ = web
    image = shared_dir / "images" / "synpic32933.jpg"
    question = "What is the abnormality by the right hemidiaphragm?"
    client = Client(url, verbose=False)
    answer = client.predict(handle_file(str(image)), question, "tiny-med", 0.0, 1.0, 16, api_name="/answer")
    assert answer == _expected(engine, image, question, 16) and answer


def test_votes_and_flags_are_logged_without_images(engine, tmp_path: Path, shared_dir: Path) -> None:
    image = str(shared_dir / "images" / "synpic42202.jpg")

    class Echo:
        def models(self):
            return ["m"]

        def stream(self, model, turns, sampling):
            yield f"answer {len(turns)}"

    for log_images in (False, True):
        log = tmp_path / f"log_{log_images}.jsonl"
        chat = WebChat(Echo(), WebConfig(log_file=log, log_images=log_images))
        state = chat.add_question(chat.new_state(), "What is shown?", image)
        state = list(chat.answer(state, "m", Sampling()))[-1]
        state = chat.add_question(state, "And now?", image)  # same image: not attached again
        state = list(chat.answer(state, "m", Sampling()))[-1]
        assert [t.answer for t in state["turns"]] == ["answer 1", "answer 2"]
        assert [len(t.images) for t in state["turns"]] == [1, 0]
        chat.log_event("upvote", state, "m", Sampling())
        chat.log_event("flag", state, "m", Sampling())
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["type"] for r in rows] == ["upvote", "flag"]
        assert rows[0]["conversation"][0] == {"question": "What is shown?", "answer": "answer 1", "num_images": 1}
        assert ("images" in rows[0]) is log_images
    # A different image starts a new conversation (one image per conversation).
    other = str(shared_dir / "images" / "bio_patch.png")
    state = chat.add_question(state, "New image?", other)
    assert len(state["turns"]) == 1 and state["turns"][0].images == [other]


@pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) to run the browser test",
)
def test_browser_uploads_an_image_and_gets_an_answer(web, shared_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, log_file = web
    profile = tempfile.mkdtemp(prefix="medvlm-chromium-")
    shot = Path(os.environ.get("MEDVLM_SCREENSHOT_DIR", tmp_path)) / "web_ui.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                viewport={"width": 1280, "height": 900},
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_text(NOTICE).wait_for(timeout=60_000)
            page.locator("#medvlm-image input[type=file]").set_input_files(
                str(shared_dir / "images" / "synpic42202.jpg")
            )
            page.locator("#medvlm-image img").first.wait_for(timeout=30_000)
            page.locator("#medvlm-question textarea").fill("Is there evidence of an aortic aneurysm?")
            page.locator("#medvlm-send").click()
            bot = page.locator("#medvlm-chatbot .bot")
            bot.first.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#medvlm-chatbot .bot');"
                " return b.length && b[b.length - 1].innerText.trim().length > 0; }",
                timeout=60_000,
            )
            answer = bot.last.inner_text().strip()
            assert answer and not answer.startswith("(error")
            page.get_by_role("button", name="Upvote").click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.stat().st_size > 10_000
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert rows[-1]["type"] == "upvote" and rows[-1]["conversation"][0]["num_images"] == 1
    assert "images" not in rows[-1]
