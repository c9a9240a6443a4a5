"""A TCP forwarder a test can cut and restore, to take Postgres or Redis away mid-test.

It runs its own event loop on a daemon thread, so cutting and restoring does not depend on
the loop of the code under test. ``cut()`` drops every open connection at once and refuses
new ones (each is closed as soon as it is accepted), which is what a crashed or unreachable
server looks like to a client; ``restore()`` forwards again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any


class TcpProxy:
    """Listens on 127.0.0.1 (``port``); forwards to (host, port) or to a Unix socket path."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="tcp-proxy", daemon=True)
        self._is_cut = False
        self._transports: set[asyncio.BaseTransport] = set()
        self.connections_made = 0

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until ``restore``."""
        self._run(self._cut())

    def restore(self) -> None:
        self._run(self._restore())

    @property
    def is_cut(self) -> bool:
        return self._is_cut

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _cut(self) -> None:
        self._is_cut = True
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _restore(self) -> None:
        self._is_cut = False

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            for transport in list(self._transports):
                transport.abort()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._is_cut:
            writer.transport.abort()
            return
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self._is_cut:
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections_made += 1
        self._transports.update((writer.transport, up_writer.transport))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._transports.discard(writer.transport)
            self._transports.discard(up_writer.transport)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Either side closing ends the pair, as it would for a direct connection.
        sink.transport.abort()
