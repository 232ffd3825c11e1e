"""Helpers of tests/security: servers in subprocesses, their RSS, and attacks sent over raw sockets."""

from __future__ import annotations

import http.server
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from medvlm.serve.server import free_port

RSS_BUDGET = 200 * 2**20
"""The most a server's resident memory may grow while it is attacked."""


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


class RssWatch:
    """``with RssWatch(pid) as w: attack()`` then ``w.growth``: peak RSS during the block minus RSS before.

    The kernel's peak (VmHWM) is reset at the start (``/proc/PID/clear_refs`` = 5), so the peak is exact,
    not sampled.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> RssWatch:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.before = _status_kb(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status_kb(self.pid, "VmHWM") - self.before
        print(f"[rss growth {self.growth / 2**20:.1f} MiB]")


class ServerProcess:
    """``medvlm serve VERB ...`` in a subprocess on a free loopback port; ``url``, ``pid``; stopped on exit."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        probe: str = "/",
        startup_timeout: float = 120.0,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "medvlm", "serve", *args, "--port", str(self.port)]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.probe, self.startup_timeout = probe, startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args} exited: {self.proc.stderr.read().decode()[-3000:]}")
            try:
                httpx.get(self.url + self.probe, timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.__exit__()
        raise AssertionError(f"{self.args} did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def send_chunked(
    url: str,
    path: str,
    headers: dict[str, str],
    total: int,
    chunk: int = 1 << 20,
    content_type: str = "application/json",
    prefix: bytes = b"",
) -> tuple[int, int]:
    """Stream ``total`` bytes as a ``Transfer-Encoding: chunked`` POST over a raw socket (no Content-Length).

    ``prefix`` is sent first (e.g. a multipart part header), then spaces. Stops sending as soon as the
    server answers or closes; returns (HTTP status, bytes sent).
    """
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Transfer-Encoding: chunked",
        f"Content-Type: {content_type}",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    if prefix:
        sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
    piece = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
    sent = 0
    try:
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server answered (or closed): stop sending
            sock.sendall(piece)
            sent += chunk
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    status = 0
    try:
        data = b""
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
        if data.startswith(b"HTTP/1.1 "):
            status = int(data.split()[1])
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return status, sent


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that records every request it gets (stands for an internal service)."""

    daemon_threads = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        routes: dict[str, tuple[int, dict[str, str], bytes]] | None = None,
        default: tuple[int, dict[str, str], bytes] = (200, {}, b"internal secret"),
    ):
        self.hits: list[str] = []
        self.routes = routes or {}
        self.default = default
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                recorder.hits.append(f"{self.command} {self.path}")
                status, headers, body = recorder.routes.get(self.path, recorder.default)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        super().__init__((host, free_port(host)), Handler)
        self.url = f"http://{host}:{self.server_address[1]}"

    def __enter__(self) -> Recorder:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class DripServer:
    """Answers every connection with one byte of a response header every ``interval`` s, forever (slow drip).

    ``closed_after`` records, per connection, how long the client stayed before hanging up.
    """

    def __init__(self, host: str = "127.0.0.1", interval: float = 0.2):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.interval = interval
        self.closed_after: list[float] = []
        self._stop = threading.Event()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.settimeout(0.2)
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        started = time.monotonic()
        header = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
        try:
            for byte in header:
                if self._stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                time.sleep(self.interval)
        except OSError:
            pass
        finally:
            self.closed_after.append(time.monotonic() - started)
            conn.close()

    def __enter__(self) -> DripServer:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()


def frames(body: bytes) -> list[dict]:
    """The NUL-delimited JSON frames of a LLaVA worker answer."""
    return [json.loads(c) for c in body.split(b"\0") if c]
