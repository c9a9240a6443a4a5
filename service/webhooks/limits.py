"""The web role's HTTP limits, enforced where uvicorn reads requests, before the app sees them.

uvicorn's httptools protocol has no limit on a request's head, and no read timeout: its
keep-alive timer only runs between requests and is reset by every byte, so a client sending a
header forever (or one byte at a time) holds memory and a connection for good. The web role
therefore runs ``LimitedHttpToolsProtocol``, uvicorn's protocol plus a count and two timers:

- **head size**: a request's head over ``MAX_HEADER_BYTES`` is answered 431 and the connection
  closed, as soon as that many bytes have come without the head's end (the parser never holds
  more than one read beyond the limit). Chunk framing and trailers of a chunked body count
  against the same budget: every byte of a request that is not its body.
- **head timeout**: a connection that has not sent a complete head ``HEADER_TIMEOUT_S`` after
  it opened, or after the first byte of its next request, is answered 408 (or just closed when
  it sent nothing) and closed.
- **body timeout**: a body not complete ``BODY_TIMEOUT_S`` + 1 s after its head: the
  connection is closed. The webhook endpoint answers 408 itself at ``BODY_TIMEOUT_S``
  (endpoint.py); this is the backstop for what no endpoint reads, such as a body still
  dripping in after an early 413.

uvicorn's own options do the rest (``web_server_options``): ``limit_concurrency`` (503 beyond
MAX_CONNECTIONS) and ``timeout_keep_alive``. ``pandasync serve``, ``pandasync dev`` and the
tests all build the server from ``web_server_options``.

A subclass of httptools' protocol rather than h11's: h11 has a head limit of its own
(``h11_max_incomplete_event_size``) but no timeouts either, and costs more CPU per request.
The subclass relies on uvicorn's parser callbacks and its ``url`` and ``headers``; an upgrade
of uvicorn that changes them fails tests/integration/test_http_limits.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import Settings

log = structlog.get_logger("pandasync.http")

# The endpoint answers 408 at BODY_TIMEOUT_S; the connection goes this much later, so that
# answer is sent first.
BODY_TIMEOUT_GRACE_S = 1.0
# ": " and CRLF of each header field, as received.
FIELD_OVERHEAD = 4


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        )


def _refusal(status: int, phrase: str, reason: str) -> bytes:
    body = json.dumps({"error": reason}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


HEAD_TOO_LARGE = _refusal(431, "Request Header Fields Too Large", "headers_too_large")
HEAD_TIMEOUT = _refusal(408, "Request Timeout", "header_timeout")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit and head and body read timeouts."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        # The current request, from the read after the previous one ended: bytes received
        # (counted a read at a time) and bytes of them that were body.
        self._received = 0
        self._body_received = 0
        self._reading_head = True
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Armed before any byte: a connection that never sends one is closed too.
        self._head_timer = self.loop.call_later(self._limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        super().data_received(data)
        if self.transport.is_closing():  # refused by the parser (400), or closed by the app
            return
        if self._head_too_large:
            self._refuse_head()
            return
        if not self._received:  # the request ended in this read; nothing is pending
            return
        if self._received - self._body_received > self._limits.max_header_bytes:
            if self._reading_head:
                self._refuse_head()
            else:
                self._close("trailers_too_large")
            return
        if self._reading_head:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self._limits.header_timeout_s, self._head_timed_out
                )
        elif self._body_timer is None:
            self._body_timer = self.loop.call_later(
                self._limits.body_timeout_s + BODY_TIMEOUT_GRACE_S, self._body_timed_out
            )

    # --- parser callbacks ---------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._cancel_head_timer()
        # A head and more can come in one read: only then is the head measured field by field.
        if self._received > self._limits.max_header_bytes and (
            self._head_size() > self._limits.max_header_bytes
        ):
            self._head_too_large = True  # refused once the parser returns; no app call
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_too_large:
            return
        self._body_received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_too_large:
            return
        self._cancel_body_timer()
        self._received = self._body_received = 0
        self._reading_head = True
        super().on_message_complete()

    # --- refusals -----------------------------------------------------------------------

    def _head_size(self) -> int:
        return len(self.url) + sum(len(n) + len(v) + FIELD_OVERHEAD for n, v in self.headers)

    def _refuse_head(self) -> None:
        log.warning(
            "http.refused",
            status=431,
            reason="headers_too_large",
            limit=self._limits.max_header_bytes,
            client=self._client_text(),
        )
        self.transport.write(HEAD_TOO_LARGE)
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._received:
            self.transport.write(HEAD_TIMEOUT)
        self._close("header_timeout")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self._close("body_timeout")

    def _close(self, reason: str) -> None:
        log.info("http.closed", reason=reason, client=self._client_text())
        self.transport.close()

    def _client_text(self) -> str | None:
        return f"{self.client[0]}:{self.client[1]}" if self.client else None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


def web_server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options of the web role (``uvicorn.run`` / ``uvicorn.Config`` keywords), with
    its HTTP limits; the caller adds the app, the address and the shutdown grace."""
    return {
        # A partial, not a class built here: it pickles, for `serve --workers N`'s processes.
        "http": functools.partial(
            LimitedHttpToolsProtocol, limits=HttpLimits.from_settings(settings)
        ),
        "ws": "none",  # no WebSocket route; an upgrade must not swap the protocol out
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "proxy_headers": True,
        "log_config": None,
    }
