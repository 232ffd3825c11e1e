"""A real HTTP server on 127.0.0.1 serving generated PMC-like tarballs, with scripted misbehaviour.

Used by tests/test_download.py and benchmarks/bench_download.py. Each path has a list of
behaviours, one per request (the last one repeats): serve bytes (optionally slowly), answer with a
status code, or reset the connection after part of the body. Every request may be delayed by a
fixed latency. Also runnable as a script serving a folder (the benchmark runs it in its own
process so the server does not share the client's GIL):

    python tests/helpers_tarserver.py --dir DIR --latency 0.05 --port-file PORT_FILE
"""

from __future__ import annotations

import argparse
import io
import socket
import struct
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Serve:
    """Answer 200 with ``body``; ``chunk``/``chunk_delay`` throttle the sending (slow server)."""

    body: bytes
    chunk: int = 1 << 16
    chunk_delay: float = 0.0


@dataclass
class Status:
    """Answer with an error status and a short body."""

    code: int
    retry_after: int | None = None


@dataclass
class Reset:
    """Announce the whole ``body`` but send only ``after`` bytes of it, then reset the connection (RST)."""

    body: bytes
    after: int


@dataclass
class Route:
    """Behaviours for one path, one per request; the last repeats."""

    behaviours: list
    hits: int = 0


@dataclass
class TarServer:
    """The server: start it with ``with TarServer() as srv`` and add routes with :meth:`add`."""

    latency: float = 0.0
    folder: Path | None = None
    routes: dict[str, Route] = field(default_factory=dict)

    def add(self, path: str, *behaviours) -> str:
        """Register behaviours for ``path``; returns the full URL."""
        self.routes[path] = Route(list(behaviours))
        return self.url(path)

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        """How many requests ``path`` received."""
        return self.routes[path].hits

    def _next(self, path: str):
        route = self.routes.get(path)
        if route is None:
            if self.folder is not None and (self.folder / path.lstrip("/")).is_file():
                return Serve((self.folder / path.lstrip("/")).read_bytes())
            return Status(404)
        with self._lock:
            b = route.behaviours[min(route.hits, len(route.behaviours) - 1)]
            route.hits += 1
        return b

    def __enter__(self) -> TarServer:
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                if server.latency:
                    time.sleep(server.latency)
                b = server._next(self.path)
                if isinstance(b, Status):
                    body = f"status {b.code}\n".encode()
                    self.send_response(b.code)
                    if b.retry_after is not None:
                        self.send_header("Retry-After", str(b.retry_after))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(b.body)))
                self.end_headers()
                if isinstance(b, Reset):
                    self.wfile.write(b.body[: b.after])
                    self.wfile.flush()
                    # SO_LINGER 0 makes close() send a TCP RST: a "connection reset by peer" for the client.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                try:
                    for i in range(0, len(b.body), b.chunk):
                        self.wfile.write(b.body[i : i + b.chunk])
                        if b.chunk_delay:
                            self.wfile.flush()
                            time.sleep(b.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (early stop, or killed)

            def finish(self) -> None:
                try:
                    super().finish()
                except (OSError, ValueError):
                    pass  # the connection was reset on purpose or by the client

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # client disconnects are part of the scripted scenarios

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def make_image(seed: int, fmt: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    """A small noisy RGB image encoded as ``fmt`` (noise keeps it from compressing away)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_tarball(
    files: dict[str, bytes],
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
    devices: list[str] | None = None,
    gz: bool = True,
) -> bytes:
    """Build a (gzipped) tar: regular ``files``, ``symlinks`` / ``hardlinks`` name -> target, char ``devices``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks or {}), (tarfile.LNKTYPE, hardlinks or {})):
            for name, target in links.items():
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = kind, target
                tf.addfile(ti)
        for name in devices or []:
            ti = tarfile.TarInfo(name)
            ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(ti)
    return buf.getvalue()


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder whose files are served by path")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--port-file", type=Path, required=True, help="the port is written here once serving")
    args = ap.parse_args()
    with TarServer(latency=args.latency, folder=args.dir) as srv:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(srv.port))
        tmp.replace(args.port_file)
        threading.Event().wait()


if __name__ == "__main__":
    _main()
