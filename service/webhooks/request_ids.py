"""A request id on every request: taken from ``X-Request-ID`` when sane, else made here.

It is bound into structlog's context variables for the request's log lines, written on the
inbox row, carried in the reconcile message, and returned in the ``X-Request-ID`` header.
A plain ASGI middleware (not ``BaseHTTPMiddleware``) so it costs next to nothing per request.
"""

from __future__ import annotations

import os
import re

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "pandasync.request_id"
HEADER = b"x-request-id"
# The inbox column is varchar(64); anything else in the header is replaced, not trusted.
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def request_id_of(scope: Scope) -> str | None:
    value = scope.get(SCOPE_KEY)
    return value if isinstance(value, str) else None


def _incoming(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            text = value.decode("latin-1")
            return text if _ACCEPTABLE.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming(scope) or os.urandom(16).hex()
        scope[SCOPE_KEY] = request_id
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        # bind/reset rather than bound_contextvars(), which copies the whole context each time.
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
