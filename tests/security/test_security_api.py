"""Attacks on ``medvlm serve api`` sent for real over loopback to a server process started with its defaults.

Each attack gets a 4xx, the process keeps serving, and its resident memory grows by less than 200 MB
(the kernel's peak RSS, reset before the attack).
"""

from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from medvlm.serve.server import free_port
from security_helpers import RSS_BUDGET, DripServer, Recorder, RssWatch, ServerProcess, send_chunked
from serve_helpers import data_url, image_bytes, tiny_checkpoint

KEY = "sec-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = {"model": "tiny-med", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory)
    # Default limits, plus remote images allowed from 127.0.0.2 only (stands for the public internet here).
    args = [
        "api",
        "--model",
        str(ckpt),
        "--served-model-name",
        "tiny-med",
        "--api-key-env",
        "MEDVLM_SEC_KEY",
        "--allow-remote-images",
        "--remote-allow-network",
        "127.0.0.2/32",
        "--remote-timeout",
        "1",
    ]
    with ServerProcess(args, env={"MEDVLM_SEC_KEY": KEY}, probe="/health") as srv:
        yield srv


def _still_serving(srv: ServerProcess) -> None:
    assert srv.alive()
    r = httpx.post(srv.url + "/v1/chat/completions", json=HI, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_chunked_body_without_key_is_refused_before_it_is_read(api) -> None:
    with RssWatch(api.pid) as rss:
        status, sent = send_chunked(api.url, "/v1/chat/completions", {}, total=300 * 2**20)
    assert status == 401
    assert sent < 300 * 2**20  # the server answered and closed long before the body ended
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def test_chunked_body_with_key_is_capped_as_it_streams(api) -> None:
    with RssWatch(api.pid) as rss:
        status, sent = send_chunked(api.url, "/v1/chat/completions", AUTH, total=300 * 2**20)
    assert status == 413
    assert sent < 300 * 2**20
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def test_declared_content_length_over_the_cap_is_refused_at_once(api) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 314572800\r\n\r\n"
            ).encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")  # answered without a byte of body sent


def test_huge_prompt_is_refused_before_tokenising(api) -> None:
    body = {"model": "tiny-med", "messages": [{"role": "user", "content": "lung " * 4_000_000}]}  # 20 MB
    with RssWatch(api.pid) as rss:
        r = httpx.post(api.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def _big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 90, 90)).save(buf, "PNG")  # one colour: a few KB on the wire
    return buf.getvalue()


def test_decoded_memory_is_bounded_per_request_before_decoding(api) -> None:
    # The attack: three concurrent requests of four 6324^2 PNGs (+3.15 GB before the fix).
    url = data_url(_big_png(6324))
    body = {
        "model": "tiny-med",
        "messages": [
            {
                "role": "user",
                "content": [
                    *[{"type": "image_url", "image_url": {"url": url}} for _ in range(4)],
                    {"type": "text", "text": "?"},
                ],
            }
        ],
    }
    with RssWatch(api.pid) as rss, ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda _: httpx.post(api.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120), range(3)
            )
        )
    assert [r.status_code for r in results] == [413] * 3
    assert all(r.json()["error"]["code"] == "image_too_large" for r in results)
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def test_remote_images_reach_no_internal_address_and_errors_are_uniform(api) -> None:
    png = image_bytes("PNG", (16, 16))
    with Recorder("127.0.0.1") as internal, DripServer("127.0.0.2", interval=0.2) as drip:
        port = internal.server_address[1]
        routes = {
            "/ok.png": (200, {"Content-Type": "image/png"}, png),
            "/to-internal": (302, {"Location": internal.url + "/x"}, b""),
            "/to-mapped": (302, {"Location": f"http://[::ffff:127.0.0.1]:{port}/x"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        with Recorder("127.0.0.2", routes=routes, default=(404, {}, b"")) as public:
            closed = f"http://127.0.0.2:{free_port('127.0.0.2')}"  # nothing listens there
            attacks = [
                internal.url + "/x",
                f"http://localhost:{port}/x",
                f"http://0x7f000001:{port}/x",
                f"http://2130706433:{port}/x",
                f"http://127.1:{port}/x",
                f"http://0177.0.0.1:{port}/x",
                f"http://[::1]:{port}/x",
                f"http://[::ffff:127.0.0.1]:{port}/x",
                "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/x",
                f"http://u:p@127.0.0.2:{port}/",
                public.url + "/to-internal",
                public.url + "/to-mapped",
                public.url + "/to-metadata",
                public.url + "/loop",
                public.url + "/missing.png",
                closed + "/x",
                drip.url + "/slow.png",
            ]
            messages = set()
            with RssWatch(api.pid) as rss:
                for url in attacks:
                    body = {
                        "model": "tiny-med",
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": "?"},
                                ],
                            }
                        ],
                    }
                    r = httpx.post(api.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
                    assert r.status_code == 400, (url, r.text)
                    messages.add(r.json()["error"]["message"])
            assert len(messages) == 1, messages  # open, closed, 404, refused and slow all read the same
            assert internal.hits == []  # no hop ever reached the internal service
            assert "GET /to-internal" in public.hits and "GET /loop" in public.hits
            assert public.hits.count("GET /loop") <= 4  # the hop cap (3 redirects)
            # The fetch hung up on the drip server after the 1 s deadline plus slack, not after its 2000 s of header.
            deadline = time.monotonic() + 10
            while not drip.closed_after and time.monotonic() < deadline:
                time.sleep(0.1)  # the drip thread notices the hang-up at its next byte
            assert drip.closed_after and max(drip.closed_after) < 10, drip.closed_after
            # control: the same server fetches a public image
            ok = {
                "model": "tiny-med",
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": public.url + "/ok.png"}},
                            {"type": "text", "text": "?"},
                        ],
                    }
                ],
            }
            assert httpx.post(api.url + "/v1/chat/completions", json=ok, headers=AUTH, timeout=60).status_code == 200
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def test_health_docs_and_openapi_need_the_key(api) -> None:
    for path in ("/health", "/docs", "/openapi.json", "/redoc", "/v1/models", "/no-such-path"):
        assert httpx.get(api.url + path, timeout=10).status_code == 401, path
        assert httpx.get(api.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    for path in ("/health", "/docs", "/openapi.json"):
        assert httpx.get(api.url + path, headers=AUTH, timeout=10).status_code == 200, path


def test_concurrent_unauthenticated_bodies_cost_nothing(api) -> None:
    with RssWatch(api.pid) as rss, ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda _: send_chunked(api.url, "/v1/chat/completions", {}, total=300 * 2**20), range(4))
        )
    assert [status for status, _ in results] == [401] * 4
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)


def test_dicom_inflation_bomb_in_a_data_url_is_refused_with_bounded_memory(api) -> None:
    from data_attack_helpers import deflated_zeros  # tests/security is on sys.path (no __init__.py)

    bomb = deflated_zeros(200 << 20)  # ~200 KB on the wire that inflates to 200 MB of zeros
    content = [
        {"type": "text", "text": "What modality?"},
        {"type": "image_url", "image_url": {"url": data_url(bomb, "application/dicom")}},
    ]
    body = {"model": "tiny-med", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    with RssWatch(api.pid) as rss:
        r = httpx.post(api.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 413, r.text
    assert "DICOM" in r.json()["error"]["message"]
    assert rss.growth < RSS_BUDGET, rss.growth
    _still_serving(api)
