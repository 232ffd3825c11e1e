"""Attacks on ``medvlm serve web``: streamed upload bodies, backend error text, the login, the examples folder."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import httpx
import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from medvlm.serve.server import free_port  # noqa: E402
from medvlm.serve.web import WebConfig, launch_web, private_examples_dir  # noqa: E402
from medvlm.serve.web_backends import GENERIC_ERROR, ApiBackend  # noqa: E402
from security_helpers import RSS_BUDGET, RssWatch, ServerProcess, send_chunked  # noqa: E402

DEAD_API = f"http://127.0.0.1:{free_port()}"  # an "internal" backend URL that must never reach a visitor


@pytest.fixture(scope="module")
def web_process(tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "log.jsonl"
    with ServerProcess(["web", "--api", DEAD_API, "--max-upload-mb", "5", "--log-file", str(log)], probe="/") as srv:
        yield srv


def test_upload_bodies_are_capped_as_they_stream(web_process) -> None:
    with RssWatch(web_process.pid) as rss:
        part = (
            b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )  # a well-formed upload whose file never ends
        status, sent = send_chunked(
            web_process.url,
            "/gradio_api/upload",
            {},
            total=300 * 2**20,
            content_type="multipart/form-data; boundary=xyz",
            prefix=part,
        )
    assert status == 413 and sent < 300 * 2**20
    assert rss.growth < RSS_BUDGET, rss.growth
    assert web_process.alive() and httpx.get(web_process.url + "/", timeout=30).status_code == 200


class ListedButDown(ApiBackend):
    """An API that listed its model when the page started and is unreachable now (the real client's errors)."""

    def models(self) -> list[str]:
        return ["tiny-med"]


@pytest.fixture(scope="module")
def dead_backend_page():
    demo, url = launch_web(ListedButDown(DEAD_API), WebConfig(), port=free_port(), block=False)
    try:
        yield url
    finally:
        demo.close()


def test_backend_errors_reach_visitors_as_a_generic_message(dead_backend_page, shared_dir: Path) -> None:
    from gradio_client import Client, handle_file

    client = Client(dead_backend_page, verbose=False)
    with pytest.raises(Exception) as e:
        client.predict(
            handle_file(str(shared_dir / "images" / "synpic42202.jpg")),
            "What is shown?",
            "tiny-med",
            0.0,
            1.0,
            16,
            api_name="/answer",
        )
    shown = str(e.value)
    assert GENERIC_ERROR in shown
    assert DEAD_API not in shown and "127.0.0.1" not in shown and "Traceback" not in shown


def test_the_login_guards_the_page_and_its_api(shared_dir: Path) -> None:
    from gradio_client import Client

    demo, url = launch_web(ApiBackend(DEAD_API), WebConfig(auth=("alice", "pw-123")), port=free_port(), block=False)
    try:
        assert httpx.get(url.rstrip("/") + "/config", timeout=30).status_code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's error for a 401 differs across versions
            Client(url, verbose=False)  # no login: the client cannot even read the page's API
        Client(url, auth=("alice", "pw-123"), verbose=False)  # with it, it can
    finally:
        demo.close()


def test_examples_live_in_a_private_fresh_folder() -> None:
    a, b = private_examples_dir(), private_examples_dir()
    assert a != b and a.parent == Path(tempfile.gettempdir())
    assert stat.S_IMODE(a.stat().st_mode) == 0o700  # no other local user can plant files or symlinks there
    assert a.name != "medvlm_web_examples"
