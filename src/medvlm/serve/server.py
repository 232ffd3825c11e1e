"""Run an ASGI app with uvicorn in a background thread (notebooks, tests, benchmarks) and find free ports."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from medvlm.errors import MedvlmError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """``with BackgroundServer(app) as srv: httpx.get(srv.url + "/v1/models")`` - uvicorn in a thread.

    Startup and lifespan run in the thread; leaving the block shuts the server down gracefully.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
    ):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on"
        )
        self.server = uvicorn.Server(self.config)
        self.startup_timeout = startup_timeout
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start and wait until the server accepts connections."""
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MedvlmError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
