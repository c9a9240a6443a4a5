"""Looking at what the receiver did: the database as SQL sees it, metrics, and waiting for it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
from prometheus_client import REGISTRY

from service.db import asyncpg_dsn


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def count(url: str, table: str) -> int:
    rows = await fetch(url, f"SELECT count(*) AS n FROM {table}")
    return int(rows[0]["n"])


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 60) -> None:
    """Poll ``check()`` until it holds; fail if it never does within a generous bound.

    The bound only stops a broken run from hanging: no test asserts how long anything took.
    """
    deadline = asyncio.get_running_loop().time() + within_s
    for _ in itertools.count():
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process's registry (the server thread shares it)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def postgres_address(url: str) -> tuple[str, int] | str:
    """Where the server of an asyncpg URL listens: (host, port), or a Unix socket path."""
    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    port = parts.port or 5432
    if socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{port}"
    return (parts.hostname or "127.0.0.1", port)


def via_port(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port`` over TCP (a proxy), keeping user and database."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}", query=""))
