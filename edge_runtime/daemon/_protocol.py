"""uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but
it waits forever for the headers of a request that has not arrived: on a new
connection, or one whose client sends its headers a byte at a time. A
thousand such connections use up the process' file descriptors and the daemon
accepts no one else. Here a connection must deliver a request's headers within
``HEADERS_TIMEOUT_S`` of opening, or of its previous response; a slow *body* is
bounded by the app (``server.max_body_bytes`` and ``_http.BODY_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADERS_TIMEOUT_S", "H11WithHeadersTimeout"]

HEADERS_TIMEOUT_S = 10.0


class H11WithHeadersTimeout(H11Protocol):
    headers_timeout_s = HEADERS_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._headers_timer = self.loop.call_later(self.headers_timeout_s, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        # a request whose headers arrived meanwhile has a cycle that is not complete: it runs on
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
