"""Fetching a remote image for ``--allow-remote-images`` without becoming a proxy into the network.

- **Every hop is resolved and filtered.** The host name is resolved once per connection and every
  address it resolves to must be globally routable (no loopback, private, link-local such as the cloud
  metadata address 169.254.169.254, shared, multicast, reserved or unspecified address; IPv4-mapped,
  6to4, Teredo and NAT64 IPv6 addresses are judged by the IPv4 address inside). Numeric spellings such
  as ``0x7f000001``, ``2130706433`` or ``127.1`` resolve to the address they mean and are filtered like it.
  Networks the operator lists in ``ImageLimits.remote_allow_networks`` are let through.
- **The checked address is the one connected to** (httpcore with a network backend that connects to the
  resolved IP), so DNS rebinding between the check and the connection cannot redirect the fetch; TLS
  still verifies the certificate against the host name.
- **Redirects are followed by hand**, at most ``remote_max_redirects``, each hop checked the same way.
- **One total deadline** (``remote_timeout_s``) covers every hop: connect, TLS, headers and body. Each
  socket operation gets only the time left, so a server dripping one byte a second cannot hold a thread
  past it. (Name resolution uses the system resolver and its own timeouts.)
- **Uniform errors**: every failure (refused address, DNS, connection, timeout, HTTP status, size)
  gives the same message, so the API cannot be used to map which hosts and ports answer. The reason is
  logged on the server.
- No proxy from the environment is used; only ``http`` and ``https``; no credentials in URLs.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore

from medvlm.serve.images import ImageInputError, ImageLimits

log = logging.getLogger("medvlm.serve")
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RemoteRefused(Exception):
    """Why a fetch failed (logged on the server; clients get one uniform message)."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
) -> bool:
    """True when ``ip`` may be fetched: globally routable (judged by an embedded IPv4 if any), or allowed."""
    if any(ip.version == net.version and ip in net for net in allow):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return address_allowed(inner, allow)
        if ip.scope_id:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


def _networks(cidrs: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation gets only the time left before the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self.inner, self.deadline = inner, deadline

    def _left(self, timeout: float | None, exc: type[Exception]) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise exc("the fetch deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self.inner.start_tls(ssl_context, server_hostname, self._left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """Resolves the host, refuses it unless every address is allowed, and connects to the checked address."""

    def __init__(self, deadline: float, allow: tuple[Any, ...]):
        self.deadline, self.allow = deadline, allow
        self.inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError) as e:
            raise RemoteRefused(f"cannot resolve {host!r} ({e})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        bad = [a for a in addresses if not address_allowed(a, self.allow)]
        if not addresses or bad:
            raise RemoteRefused(f"{host!r} resolves to a non-public address ({bad[0] if bad else 'none'})")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the fetch deadline passed")
        stream = self.inner.connect_tcp(
            str(addresses[0]), port, min(timeout or left, left), local_address, socket_options
        )
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None):
        raise RemoteRefused("unix sockets are never fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self.deadline - time.monotonic())))


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RemoteRefused(f"scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise RemoteRefused("credentials in the URL")
    if not parts.hostname:
        raise RemoteRefused("no host")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise RemoteRefused(f"bad port ({e})") from None
    return url


def _fetch(url: str, limits: ImageLimits) -> bytes:
    deadline = time.monotonic() + limits.remote_timeout_s
    backend = _CheckedBackend(deadline, _networks(limits.remote_allow_networks))
    with httpcore.ConnectionPool(
        ssl_context=ssl.create_default_context(), network_backend=backend, max_connections=1, retries=0
    ) as pool:
        for _ in range(limits.remote_max_redirects + 1):
            _checked_url(url)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteRefused("deadline passed")
            timeouts = {"connect": left, "read": left, "write": left, "pool": left}
            with pool.stream(
                "GET",
                url,
                headers={"User-Agent": "medvlm-serve", "Accept": "image/*"},
                extensions={"timeout": timeouts},
            ) as r:
                if r.status in _REDIRECTS:
                    location = dict((k.lower(), v) for k, v in r.headers).get(b"location")
                    if not location:
                        raise RemoteRefused(f"HTTP {r.status} without Location")
                    url = urljoin(url, location.decode("latin-1"))
                    continue
                if r.status != 200:
                    raise RemoteRefused(f"HTTP {r.status}")
                declared = dict((k.lower(), v) for k, v in r.headers).get(b"content-length", b"")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise RemoteRefused(f"declared {int(declared)} bytes")
                chunks: list[bytes] = []
                size = 0
                for chunk in r.iter_stream():
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise RemoteRefused(f"more than {limits.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise RemoteRefused("deadline passed")
                    chunks.append(chunk)
                return b"".join(chunks)
        raise RemoteRefused(f"more than {limits.remote_max_redirects} redirects")


def fetch_remote(url: str, limits: ImageLimits, what: str = "image") -> bytes:
    """Download an ``http(s)`` image (public addresses only, redirects checked, one deadline); uniform errors."""
    try:
        return _fetch(url, limits)
    except (
        RemoteRefused,
        httpcore.TimeoutException,
        httpcore.NetworkError,
        httpcore.ProtocolError,
        httpcore.UnsupportedProtocol,
        OSError,
        ValueError,
        UnicodeError,
    ) as e:
        log.info("%s: remote fetch failed: %s: %s", what, type(e).__name__, e)
        raise ImageInputError(
            f"{what}: the image URL could not be fetched (only public http(s) addresses are "
            "fetched, within the size and time limits)"
        ) from None
