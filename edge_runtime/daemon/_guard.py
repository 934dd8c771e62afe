"""Browser guard for the HTTP API: no cross-site requests, no DNS rebinding.

The daemon has no authentication; binding to loopback keeps other machines
out, but not the web pages the user's own browser runs. Two holes:

* **Cross-site requests.** Any page may POST to ``http://127.0.0.1:PORT`` with
  a ``text/plain`` body (no CORS preflight for that), so it could make the
  daemon generate and escalate to the paid cloud. Browsers put an ``Origin``
  header on such requests; clients that are not browsers (curl, the OpenAI
  SDKs, our CLI) send none. So a request whose ``Origin`` is not a loopback
  origin is refused.
* **DNS rebinding.** A page on ``attacker.example`` whose name later resolves
  to 127.0.0.1 makes same-origin requests (no ``Origin`` on a GET) that reach
  the daemon with ``Host: attacker.example``. While the daemon is bound to
  loopback, a ``Host`` that is not a loopback name or address is refused.
  With ``server.allow_remote`` the daemon cannot know the names it is reached
  by, so only the ``Origin`` rule applies (put a proxy in front).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BrowserGuard", "is_loopback_host"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (IPv6 may be bracketed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _host_name(value: str) -> str:
    """The name or address of a ``Host`` header value, without its port."""
    value = value.strip()
    if value.startswith("["):  # [::1]:8080
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.hostname is not None and is_loopback_host(parts.hostname)
    except ValueError:
        return False


class BrowserGuard:
    """ASGI middleware: refuses (403, OpenAI's error shape) what only a web page would send, (400, connection
    closed) a request with two framings, and (415) a body in a content encoding."""

    def __init__(self, app: ASGIApp, *, check_host: bool,
                 on_refused: Callable[[str, str, str], None] | None = None) -> None:
        self.app = app
        self.check_host = check_host
        self.on_refused = on_refused  # (path, code, message): a refusal is logged and counted, not silent

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if "transfer-encoding" in headers and "content-length" in headers:
                # two framings: a proxy in front (allow_remote) may read the other one, and smuggle a request in
                # the rest of this body (RFC 9112 6.1); refused, and the connection closed
                await self._refuse(scope, send, "invalid_request", "a request may not carry both Content-Length and "
                                   "Transfer-Encoding", status=400, close=True)
                return
            refusal = self._refusal(headers)
            if refusal is not None:
                await self._refuse(scope, send, *refusal)
                return
            encoding = headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                # a gzip body was read as (broken) JSON, and a false header was ignored: neither is what was sent
                await self._refuse(scope, send, "unsupported_media_type", f"Content-Encoding {encoding[:40]!r} is not "
                                   "supported: send the body uncompressed", status=415)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> tuple[str, str] | None:
        origin = headers.get("origin")
        if origin is not None and not _loopback_origin(origin):
            return ("forbidden_origin",
                    f"cross-origin request refused: Origin {origin[:100]!r} is not a loopback origin "
                    "(web pages cannot call this daemon)")
        host = headers.get("host")
        if self.check_host and host is not None and not is_loopback_host(_host_name(host)):
            return ("forbidden_host",
                    f"request refused: Host {host[:100]!r} is not a loopback name or address; this daemon "
                    "is bound to loopback (set server.allow_remote to serve other names)")
        return None

    async def _refuse(self, scope: Scope, send: Any, code: str, message: str, *, status: int = 403,
                      close: bool = False) -> None:
        if self.on_refused is not None:
            self.on_refused(str(scope.get("path", "")), code, message)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
