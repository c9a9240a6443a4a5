"""A receiver of pandasync's outbound webhooks, as a reseller's system would run one: every
delivery verified with the official ``standardwebhooks`` package (the specification's
reference implementation), under a real uvicorn on a real socket.

Its behaviour can be changed while it runs: answer 500 (``failing``), answer late (``delay_s``).
It records each request it verified, and whether it answered 2xx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.servers import uvicorn_thread


@dataclass
class Delivery:
    msg_id: str
    type: str
    data: dict[str, Any]
    answered: int
    at: float


@dataclass
class Receiver:
    secret: str = ""
    failing: bool = False
    delay_s: float = 0.0
    url: str = ""
    received: list[Delivery] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # signature checks that failed
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        try:
            Webhook(self.secret).verify(body, dict(request.headers))
        except Exception as error:
            with self._lock:
                self.refused.append(f"{type(error).__name__}: {error}")
            return Response(status_code=400)
        with self._lock:
            self.in_flight += 1
        try:
            if self.delay_s:
                await anyio.sleep(self.delay_s)
            status = 500 if self.failing else 200
            document = json.loads(body)
            with self._lock:
                self.received.append(
                    Delivery(
                        request.headers["webhook-id"],
                        document["type"],
                        document["data"],
                        status,
                        time.monotonic(),
                    )
                )
            return Response(status_code=status)
        finally:
            with self._lock:
                self.in_flight -= 1

    def accepted(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.received if 200 <= d.answered < 300]


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hooks", receiver.handle, methods=["POST"])])
    with uvicorn_thread(app, ws="none", http="h11", loop="asyncio") as (host, port):
        receiver.url = f"http://{host}:{port}/hooks"
        yield receiver
