"""Connections the receiver keeps checked out of the engine's pool, with statements prepared.

The hot path runs one prepared statement per round trip straight on asyncpg, in autocommit
(each statement is its own transaction). Going through a session instead would add a pool
checkout with its ping, BEGIN and COMMIT: three more round trips, each waiting for a turn of
a busy event loop. The connections still come from, and go back to, the engine's pool, so
they share its URL, its settings and its ``dispose()``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

if TYPE_CHECKING:
    from asyncpg.prepared_stmt import PreparedStatement

    # Generic only in the stubs.
    Statement: TypeAlias = PreparedStatement[asyncpg.Record]

# A connection unused for this long is pinged before use: a restarted server would otherwise
# cost one failed statement per held connection.
IDLE_PING_S = 2.0


@dataclass(slots=True)
class Held:
    connection: AsyncConnection
    driver: asyncpg.Connection
    statements: list[Statement]
    last_used: float


class HeldConnections:
    """Up to as many connections as callers use at once, each with ``queries`` prepared."""

    def __init__(self, engine: AsyncEngine, queries: Sequence[str]) -> None:
        self._engine = engine
        self._queries = tuple(queries)
        self._idle: list[Held] = []
        self._closed = False

    async def acquire(self) -> Held:
        """An idle held connection (pinged if it sat idle), or a new one from the pool."""
        now = time.monotonic()
        while self._idle:
            held = self._idle.pop()
            if now - held.last_used < IDLE_PING_S:
                return held
            try:
                await held.driver.fetchval("SELECT 1")
            except Exception:
                await self.discard(held)
                continue
            return held
        connection = await self._engine.connect()
        try:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            if not isinstance(driver, asyncpg.Connection):
                raise TypeError("held connections need the asyncpg driver")
            statements = [await driver.prepare(query) for query in self._queries]
        except BaseException:
            await _drop(connection)
            raise
        return Held(connection, driver, statements, now)

    async def release(self, held: Held) -> None:
        """Back to the idle list; to the pool if closing."""
        held.last_used = time.monotonic()
        if self._closed:
            await held.connection.close()
        else:
            self._idle.append(held)

    async def discard(self, held: Held) -> None:
        """Drop a connection whose state is unknown (after a timeout or a broken socket)."""
        await _drop(held.connection)

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            await self._idle.pop().connection.close()


async def _drop(connection: AsyncConnection) -> None:
    # Invalidating terminates the socket without a round trip, so it cannot hang on a dead peer.
    with contextlib.suppress(Exception):
        await connection.invalidate()
    with contextlib.suppress(Exception):
        await connection.close()
