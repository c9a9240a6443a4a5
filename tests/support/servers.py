"""Serve an ASGI app over a real socket from a background thread, for as long as a test needs.

The socket is bound before the server starts (port 0: the OS picks a free one), so there is no
window in which another process could take the port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import Settings, load_settings
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import (
    DEV_ACCESS_KEY,
    DEV_ACCESS_SECRET,
    DEV_USER_ID,
    DeliverySettings,
    SandboxSettings,
)

STARTUP_TIMEOUT_S = 20.0


@contextmanager
def uvicorn_thread(
    app: Any, *, host: str = "127.0.0.1", **options: Any
) -> Iterator[tuple[str, int]]:
    """Run ``app`` under uvicorn in a thread of its own (its own event loop, so the test's
    loop may block); yields its (host, port); stops it on exit. ``options`` are
    ``uvicorn.Config`` keywords."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets that say they are TCP,
    # and without it every response waits out the client's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    settings = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 2, **options}
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start (see its log)")
            time.sleep(0.01)
        yield host, port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the test server did not stop")


@contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1") -> Iterator[str]:
    """``uvicorn_thread`` on plain h11 and asyncio; yields the base URL."""
    with uvicorn_thread(app, host=host, ws="none", http="h11", loop="asyncio") as (_, port):
        yield f"http://{host}:{port}"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingReceiver:
    """A webhook endpoint that records every request and answers from ``statuses`` in turn.

    When ``statuses`` runs out it answers ``default_status``.
    """

    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            body = await request.body()
            with self._lock:
                self.received.append(Received(dict(request.headers), body))
                status = self.statuses.pop(0) if self.statuses else self.default_status
            return Response(status_code=status)

        return Starlette(routes=[Route("/webhooks/pandapon", receive, methods=["POST"])])

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)


def sandbox_test_settings(**overrides: Any) -> SandboxSettings:
    """Sandbox settings independent of the environment: dev credentials, fast retries."""
    values: dict[str, Any] = {
        "access_key": DEV_ACCESS_KEY,
        "access_secret": DEV_ACCESS_SECRET,
        "user_id": DEV_USER_ID,
        "timestamp_unit": "ms",
        "endpoint_overrides": {},
        "seed": 20261125,
        "delivery": DeliverySettings(retry_interval_s=0.05),
        "faults": {},
    }
    values.update(overrides)
    return SandboxSettings(**values)


@dataclass
class SandboxServer:
    url: str
    settings: SandboxSettings
    remote: SandboxRemote

    def service_settings(self, **overrides: Any) -> Settings:
        """Service Settings whose PandaPon is this sandbox, with the sandbox's credentials."""
        values: dict[str, Any] = {
            "api_base_url": self.url,
            "access_key": self.settings.access_key,
            "access_secret": self.settings.access_secret.get_secret_value(),
            "user_id": self.settings.user_id,
            "timestamp_unit": self.settings.timestamp_unit,
            "endpoint_overrides": self.settings.endpoint_overrides,
            "broker_url": None,
            "upstream_rate_limit_rps": 1000.0,
            "http_read_timeout_s": 5.0,
        }
        values.update(overrides)
        return load_settings(**values)
