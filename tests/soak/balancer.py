"""The load balancer in front of the web processes, which also witnesses every callback.

A deployment puts its web processes behind a load balancer; so does the soak. This one is a
small HTTP/1.1 forwarder on its own thread and event loop: each request goes to the next
backend in turn, and to the one after when a backend refuses the connection (a killed
process), as a load balancer's "next upstream on connect error" does. A backend that fails
after the request was sent gets the client a 502 (the sender retries, as PandaPon does).

It records every exchange: when it started, how long the answer took (the ack latency the
sender sees), the status, the backend and a digest of the body, so the soak can check that
every message answered 200 is in the inbox without relying on the sandbox's bounded log. The
headers of the latest requests answered 200 are kept too: the "replay" bad client resends
them (with a forged body), as an eavesdropper would.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
CAPTURED = 256


@dataclass(frozen=True, slots=True)
class Exchange:
    started: float  # time.monotonic()
    latency_s: float
    backend: int | None  # index of the backend that answered; None: none could
    status: int  # 502 when the backend failed after the request was sent, or none answered
    body_sha256: str
    peer: str = ""  # the sender's address


Backend = int | tuple[str, int]  # a port of 127.0.0.1, or (host, port)


class Balancer:
    def __init__(self, backends: Sequence[Backend], host: str = "127.0.0.1") -> None:
        self.backends = list(backends)
        self.host = host  # where it listens
        self.port = 0
        self.exchanges: list[Exchange] = []
        self._captured: deque[dict[str, str]] = deque(maxlen=CAPTURED)
        self._lock = threading.Lock()
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="soak-balancer", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/webhooks/pandapon"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the balancer did not start")

    def captured(self) -> list[dict[str, str]]:
        """The headers of the latest requests answered 200 (a copy)."""
        with self._lock:
            return list(self._captured)

    def close(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._client, self.host, 0, backlog=512)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str((writer.get_extra_info("peername") or ("",))[0])
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    return
                body = await reader.readexactly(length) if length else b""
                started = time.monotonic()
                status, backend, answer = await self._forward(lines, body)
                writer.write(answer)
                await writer.drain()
                self.exchanges.append(
                    Exchange(
                        started,
                        time.monotonic() - started,
                        backend,
                        status,
                        hashlib.sha256(body).hexdigest(),
                        peer,
                    )
                )
                if status == 200:
                    with self._lock:
                        self._captured.append(headers)
                # Every answer is sent with "connection: close" (see _forward).
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.transport.abort()

    async def _forward(self, lines: list[str], body: bytes) -> tuple[int, int | None, bytes]:
        kept = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
        request = "\r\n".join([lines[0], *kept, "connection: close", "", ""]).encode("latin-1")
        for attempt in range(len(self.backends)):
            index = (self._next + attempt) % len(self.backends)
            backend = self.backends[index]
            host, port = ("127.0.0.1", backend) if isinstance(backend, int) else backend
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                continue  # refused: try the next backend
            self._next = (index + 1) % len(self.backends)
            try:
                up_writer.write(request + body)
                await up_writer.drain()
                answer = await asyncio.wait_for(up_reader.read(-1), 30)
            except (OSError, TimeoutError):
                answer = b""
            finally:
                up_writer.transport.abort()
            try:
                status = int(answer.split(b" ", 2)[1])
            except (IndexError, ValueError):
                return 502, index, bad_gateway()
            return status, index, closing(answer)
        return 502, None, bad_gateway()


def closing(answer: bytes) -> bytes:
    """The backend's answer, saying "connection: close" whatever the backend said."""
    head, sep, rest = answer.partition(b"\r\n\r\n")
    lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"connection: close"]) + sep + rest


def bad_gateway() -> bytes:
    return b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
