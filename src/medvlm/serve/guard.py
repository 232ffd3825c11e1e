"""The request guard every medvlm server app runs behind (API, controller, worker, web UI).

A pure ASGI middleware, so it sees a request before any framework reads it:

1. **Key first.** When a key is configured, every request (every path: ``/v1/*``, ``/health``,
   ``/docs``, ``/openapi.json``, unknown paths) must carry ``Authorization: Bearer KEY``; otherwise it is
   answered 401 before one byte of its body is read.
2. **Body cap as it streams.** A declared ``Content-Length`` over the cap is refused at once (413); a
   body without one (``Transfer-Encoding: chunked``) is counted chunk by chunk as the app reads it and
   refused the moment it passes the cap, so no body larger than the cap is ever buffered.
3. Refusals close the connection (``Connection: close``), so the server stops reading the rest of a
   hostile body instead of draining it.
4. Optionally adds the research-only notice header to every response.

:func:`check_bind` is the start-up rule shared by every ``medvlm serve`` command: binding beyond
loopback without authentication is refused unless the operator says ``--insecure-no-auth``.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from typing import Any

from starlette.exceptions import HTTPException

from medvlm.errors import MedvlmError
from medvlm.notice import SHORT_NOTICE

NOTICE_HEADER = "X-Medvlm-Notice"
"""Response header carrying the research-only notice."""
AUTH_HINT = "send 'Authorization: Bearer KEY'"


class BodyTooLarge(HTTPException):
    """Raised into the app when the streamed body passes the cap (apps answer it as 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error JSON (used by every medvlm server for its own refusals)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def key_matches(header: str, key: str) -> bool:
    """True when an ``Authorization`` header value is ``Bearer <key>`` (constant-time comparison)."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def bearer(key: str | None) -> dict[str, str]:
    """The header a client sends to a server started with ``key`` (empty when there is no key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


class RequestGuard:
    """Pure ASGI middleware: key before body, streamed body cap, optional notice header.

    ``RequestGuard(app, max_body_bytes=..., api_key=...)`` or ``app.add_middleware(RequestGuard, ...)``.
    """

    def __init__(self, app: Any, *, max_body_bytes: int, api_key: str | None = None, notice: bool = True):
        if max_body_bytes < 1:
            raise MedvlmError("max_body_bytes must be >= 1")
        self.app, self.max_body, self.api_key, self.notice = app, int(max_body_bytes), api_key or None, notice

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and not key_matches(
            headers.get(b"authorization", b"").decode("latin-1"), self.api_key
        ):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            missing = not headers.get(b"authorization")
            await self._refuse(
                send,
                401,
                "missing API key (" + AUTH_HINT + ")" if missing else "wrong API key",
                "authentication_error",
                "missing_api_key" if missing else "invalid_api_key",
            )
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await self._refuse(
                send,
                413,
                f"request body of {int(length)} bytes exceeds the limit of {self.max_body} bytes",
                "invalid_request_error",
                "body_too_large",
            )
            return

        state = {"received": 0, "exceeded": False, "started": False, "replaced": False}

        async def capped_receive() -> dict:
            if state["exceeded"]:
                raise BodyTooLarge(self.max_body)
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    state["exceeded"] = True
                    raise BodyTooLarge(self.max_body)
            return message

        async def guarded_send(message: dict) -> None:
            if state["replaced"]:
                return  # the app's own answer to an over-long body is dropped: ours went out instead
            if message["type"] == "http.response.start":
                if state["exceeded"] and message.get("status") != 413:
                    # an app (or framework) that turned the cap into another error: answer 413 regardless
                    state["replaced"] = True
                    await self._refuse(
                        send,
                        413,
                        f"request body exceeds the limit of {self.max_body} bytes",
                        "invalid_request_error",
                        "body_too_large",
                    )
                    return
                state["started"] = True
                extra = [(b"connection", b"close")] if state["exceeded"] else []
                if self.notice:
                    extra.append((NOTICE_HEADER.lower().encode(), SHORT_NOTICE.encode()))
                message = {**message, "headers": list(message.get("headers") or []) + extra}
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
            if not state["started"] and not state["replaced"]:
                await self._refuse(
                    send,
                    413,
                    f"request body exceeds the limit of {self.max_body} bytes",
                    "invalid_request_error",
                    "body_too_large",
                )

    async def _refuse(self, send: Any, status: int, message: str, type_: str, code: str) -> None:
        body = json.dumps(error_body(message, type_, code)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if self.notice:
            headers.append((NOTICE_HEADER.lower().encode(), SHORT_NOTICE.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0, :: and names."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, authenticated: bool, insecure_no_auth: bool, what: str, key_option: str) -> None:
    """Refuse to bind ``host`` beyond loopback without authentication unless ``insecure_no_auth``.

    ``key_option`` names the option that sets the key (put in the error message).
    """
    if is_loopback(host) or authenticated or insecure_no_auth:
        return
    raise MedvlmError(
        f"{what}: --host {host} makes it reachable from other machines, and no key is set: give "
        f"{key_option} (clients then send 'Authorization: Bearer KEY'), bind 127.0.0.1, or pass "
        "--insecure-no-auth to serve without authentication anyway (see docs/security.md)"
    )
