"""LLaVA protocol: controller + two worker processes + test-message; a killed worker is dropped, traffic continues."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.data.schema import Message
from medvlm.serve.client import list_models, render_prompt, send_test_message, stream_worker
from medvlm.serve.controller import SERVER_ERROR_MSG, ControllerConfig, create_controller_app
from medvlm.serve.server import BackgroundServer, free_port
from serve_helpers import tiny_checkpoint


def _start_worker(controller: str, checkpoint: Path, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "medvlm",
        "serve",
        "worker",
        "--controller",
        controller,
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--served-model-name",
        "tiny-med",
        "--heart-beat-interval",
        "0.5",
        "--limit-concurrency",
        "3",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_workers(controller: str, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.post(controller + "/worker_get_status", timeout=10).json()
        if status["queue_length"] == 0 and status["speed"] >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"{n} workers did not register in {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory)
    config = ControllerConfig(heart_beat_expiration=2.0, check_interval=0.3)
    with BackgroundServer(create_controller_app(config)) as ctrl:
        ports = [free_port(), free_port()]
        procs = [_start_worker(ctrl.url, checkpoint, p) for p in ports]
        try:
            _wait_workers(ctrl.url, 2)
            yield ctrl, procs, ports
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def test_controller_workers_and_test_message(cluster, shared_dir: Path) -> None:
    ctrl, procs, ports = cluster
    assert list_models(ctrl.url) == ["tiny-med"]
    addrs = {
        httpx.post(ctrl.url + "/get_worker_address", json={"model": "tiny-med"}).json()["address"] for _ in range(4)
    }
    assert addrs == {f"http://127.0.0.1:{p}" for p in ports}  # shortest_queue spreads the load
    assert httpx.post(ctrl.url + "/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    pieces: list[str] = []
    answer = send_test_message(
        ctrl.url, "tiny-med", "Describe the chest radiograph.", max_new_tokens=8, temperature=0, on_text=pieces.append
    )
    assert answer and "".join(pieces).strip() == answer
    res = CliRunner().invoke(
        app,
        ["serve", "test-message", "--controller", ctrl.url, "--served-model-name", "tiny-med", "--max-new-tokens", "6"],
    )
    assert res.exit_code == 0, res.output
    assert "Models: ['tiny-med']" in res.output and "worker_addr: http://127.0.0.1:" in res.output
    # The original protocol through the controller: full text (prompt + answer) per NUL-delimited frame.
    prompt = render_prompt([Message.from_text("user", "<image>\nWhat is shown?")], "vicuna_v1")
    image = base64.b64encode((shared_dir / "images" / "synpic42202.jpg").read_bytes()).decode()
    frames = list(
        stream_worker(
            ctrl.url + "/worker_generate_stream",
            {"model": "tiny-med", "prompt": prompt, "images": [image], "temperature": 0, "max_new_tokens": 6},
        )
    )
    assert frames and all(f["error_code"] == 0 and f["text"].startswith(prompt) for f in frames)
    assert all(len(a["text"]) <= len(b["text"]) for a, b in zip(frames, frames[1:]))
    bad = list(
        stream_worker(ctrl.url + "/worker_generate_stream", {"model": "tiny-med", "prompt": prompt, "images": []})
    )
    assert bad[-1]["error_code"] == 1 and SERVER_ERROR_MSG in bad[-1]["text"] and "placeholder" in bad[-1]["text"]
    none = list(stream_worker(ctrl.url + "/worker_generate_stream", {"model": "nope", "prompt": "x"}))
    assert none == [{"text": SERVER_ERROR_MSG, "error_code": 2}]


def test_killed_worker_is_dropped_and_traffic_continues(cluster) -> None:
    ctrl, procs, ports = cluster
    procs[0].kill()
    procs[0].wait(10)
    dead = f"http://127.0.0.1:{ports[0]}"
    # Right away (before expiry) the controller's stream endpoint skips the dead worker.
    prompt = render_prompt([Message.from_text("user", "Hello?")], "vicuna_v1")
    for _ in range(3):
        frames = list(
            stream_worker(
                ctrl.url + "/worker_generate_stream",
                {"model": "tiny-med", "prompt": prompt, "temperature": 0, "max_new_tokens": 4},
            )
        )
        assert frames and frames[-1]["error_code"] == 0
    # Heart beats stop: the controller expires it (2 s here; 30 s by default).
    registry = ctrl.server.config.app.state.controller.worker_info
    deadline = time.monotonic() + 15
    while dead in registry and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(registry) == [f"http://127.0.0.1:{ports[1]}"]
    for _ in range(3):
        assert (
            httpx.post(ctrl.url + "/get_worker_address", json={"model": "tiny-med"}).json()["address"]
            == f"http://127.0.0.1:{ports[1]}"
        )
    assert send_test_message(ctrl.url, "tiny-med", "Any findings?", max_new_tokens=6, temperature=0)
