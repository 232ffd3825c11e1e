"""Attacks on ``medvlm serve controller`` and ``medvlm serve worker`` (processes sharing a secret) over loopback.

Each attack gets a 4xx, the processes keep serving, and their resident memory grows by less than 200 MB.
"""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image

from medvlm.data.schema import Message
from medvlm.errors import MedvlmError
from medvlm.serve.client import list_models, render_prompt, send_test_message
from security_helpers import RSS_BUDGET, Recorder, RssWatch, ServerProcess, frames, send_chunked
from serve_helpers import image_bytes, tiny_checkpoint

SECRET = "sec-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
ENV = {"MEDVLM_SEC_SECRET": SECRET}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory)
    ctrl_args = ["controller", "--secret-env", "MEDVLM_SEC_SECRET", "--heart-beat-expiration", "2"]
    with ServerProcess(ctrl_args, env=ENV, probe="/list_models") as ctrl:
        worker_args = [
            "worker",
            "--controller",
            ctrl.url,
            "--model",
            str(ckpt),
            "--served-model-name",
            "tiny-med",
            "--secret-env",
            "MEDVLM_SEC_SECRET",
            "--heart-beat-interval",
            "0.5",
        ]
        with ServerProcess(worker_args, env=ENV, probe="/worker_get_status") as worker:
            deadline = time.monotonic() + 60
            while list_models(ctrl.url, secret=SECRET) != ["tiny-med"] and time.monotonic() < deadline:
                time.sleep(0.2)
            yield ctrl, worker


def _still_serving(ctrl: ServerProcess, worker: ServerProcess) -> None:
    assert ctrl.alive() and worker.alive()
    assert send_test_message(ctrl.url, "tiny-med", "Any findings?", max_new_tokens=4, temperature=0, secret=SECRET)


def test_the_secret_is_needed_everywhere_and_legitimate_clients_work(cluster) -> None:
    ctrl, worker = cluster
    for url in (
        ctrl.url + "/list_models",
        ctrl.url + "/register_worker",
        ctrl.url + "/worker_generate_stream",
        ctrl.url + "/get_worker_address",
        worker.url + "/worker_generate_stream",
        worker.url + "/worker_get_status",
        ctrl.url + "/docs",
        worker.url + "/openapi.json",
    ):
        assert httpx.post(url, json={}, timeout=10).status_code in (401,), url
    with pytest.raises(MedvlmError):
        send_test_message(ctrl.url, "tiny-med", "hi", max_new_tokens=2)  # no secret: refused
    _still_serving(ctrl, worker)


@pytest.mark.parametrize("target", ["controller", "worker"])
def test_chunked_bodies_are_refused_or_capped_as_they_stream(cluster, target: str) -> None:
    ctrl, worker = cluster
    srv, path = (ctrl, "/register_worker") if target == "controller" else (worker, "/worker_generate_stream")
    with RssWatch(srv.pid) as rss:
        no_key = send_chunked(srv.url, path, {}, total=300 * 2**20)
        with_key = send_chunked(srv.url, path, AUTH, total=300 * 2**20)
    assert no_key[0] == 401 and with_key[0] == 413
    assert no_key[1] < 300 * 2**20 and with_key[1] < 300 * 2**20
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(ctrl, worker)


BAD_REGISTRATIONS = [
    ("queue_length abc", {"worker_status": {"model_names": ["m"], "speed": 1, "queue_length": "abc"}}),
    ("speed nan", {"worker_status": {"model_names": ["m"], "speed": "nan", "queue_length": 0}}),
    ("speed 1e9", {"worker_status": {"model_names": ["m"], "speed": 1e9, "queue_length": 0}}),
    ("speed negative", {"worker_status": {"model_names": ["m"], "speed": -1, "queue_length": 0}}),
    ("model_names not a list", {"worker_status": {"model_names": "m", "speed": 1}}),
    ("worker_status not an object", {"worker_status": [1, 2]}),
]


@pytest.mark.parametrize("name,data", BAD_REGISTRATIONS, ids=[c[0] for c in BAD_REGISTRATIONS])
def test_bad_worker_numbers_are_a_400(cluster, name: str, data: dict) -> None:
    ctrl, worker = cluster
    body = {"worker_name": "http://127.0.0.1:1", "check_heart_beat": True, **data}
    r = httpx.post(ctrl.url + "/register_worker", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 400, r.text
    r = httpx.post(
        ctrl.url + "/receive_heart_beat",
        json={"worker_name": worker.url, "queue_length": "abc"},
        headers=AUTH,
        timeout=10,
    )
    assert r.status_code == 400
    assert list_models(ctrl.url, secret=SECRET) == ["tiny-med"]  # nothing was registered


def test_worker_names_cannot_make_the_controller_call_chosen_urls(cluster) -> None:
    ctrl, worker = cluster
    with Recorder("127.0.0.1") as target:
        for name in (
            target.url + "/admin/delete?x=",
            target.url + "/#",
            f"http://user:pw@{target.url[7:]}",
            target.url + "/?q=1",
            "file:///etc/passwd",
            f"gopher://{target.url[7:]}",
            "http://:80",
            "http://127.0.0.1",
            "http://0.0.0.0:80",
            "http://169.254.169.254:80",
            12345,
            None,
        ):
            r = httpx.post(
                ctrl.url + "/register_worker",
                json={"worker_name": name, "check_heart_beat": True},
                headers=AUTH,
                timeout=10,
            )
            assert r.status_code == 400, (name, r.text)
        assert target.hits == []
        # A well-formed address is asked only for its status, at the fixed path; a non-worker answer is not registered.
        r = httpx.post(
            ctrl.url + "/register_worker",
            json={"worker_name": target.url, "check_heart_beat": True},
            headers=AUTH,
            timeout=10,
        )
        assert r.status_code == 200 and r.json() == {"ok": False}
        assert target.hits == ["POST /worker_get_status"]
    assert list_models(ctrl.url, secret=SECRET) == ["tiny-med"]


def test_workers_that_stop_beating_expire(cluster) -> None:
    ctrl, worker = cluster
    fake = {
        "worker_name": "http://127.0.0.1:1",
        "check_heart_beat": False,  # LLaVA never expired these
        "worker_status": {"model_names": ["fake-med"], "speed": 1, "queue_length": 0},
    }
    assert httpx.post(ctrl.url + "/register_worker", json=fake, headers=AUTH, timeout=10).json() == {"ok": True}
    assert "fake-med" in httpx.post(ctrl.url + "/list_models", headers=AUTH, timeout=10).json()["models"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        models = httpx.post(ctrl.url + "/list_models", headers=AUTH, timeout=10).json()["models"]
        if "fake-med" not in models:
            break
        time.sleep(0.2)
    assert models == ["tiny-med"]  # the silent worker is gone; the beating one stays


def _png_b64(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 120, 120)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_worker_checks_counts_and_prompt_before_decoding(cluster) -> None:
    ctrl, worker = cluster
    url = worker.url + "/worker_generate_stream"
    small = base64.b64encode(image_bytes("PNG", (8, 8))).decode()
    big = _png_b64(3000)  # ~210 MB to decode and preprocess each if it were decoded
    one_image = render_prompt([Message.from_text("user", "<image>\nWhat is shown?")], "vicuna_v1")
    attacks = [
        ("too many images", {"prompt": "<image>" * 5 + "?", "images": [small] * 5}, 400, "too many images"),
        ("placeholders do not match", {"prompt": one_image, "images": [big, big]}, 400, "placeholder"),
        ("no placeholder", {"prompt": "hello", "images": [big]}, 400, "placeholder"),
        ("20 MB prompt", {"prompt": "lung " * 4_000_000, "images": []}, 413, "characters"),
        ("bad numbers", b'{"model": "tiny-med", "prompt": "hi", "max_new_tokens": 1e400}', 400, "sampling"),
    ]
    with RssWatch(worker.pid) as rss:
        for name, payload, status, text in attacks:
            if isinstance(payload, bytes):  # JSON that Python reads as infinity
                r = httpx.post(url, content=payload, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
            else:
                r = httpx.post(url, json={"model": "tiny-med", **payload}, headers=AUTH, timeout=60)
            assert r.status_code == status, (name, r.text[:300])
            got = frames(r.content)
            assert got and got[-1]["error_code"] == 1 and text in got[-1]["text"], (name, got)
    assert rss.growth < RSS_BUDGET, rss.growth
    ok = httpx.post(
        url,
        json={"model": "tiny-med", "prompt": one_image, "images": [small], "temperature": 0, "max_new_tokens": 3},
        headers=AUTH,
        timeout=60,
    )
    assert ok.status_code == 200 and frames(ok.content)[-1]["error_code"] == 0
    _still_serving(ctrl, worker)
