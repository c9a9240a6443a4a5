"""The database layer: one async engine per process and a session scope that commits once.

Request handlers and jobs own the transaction (``session_scope``); data helpers take a session
and never commit, so a handler that writes several rows stays atomic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.config import Settings


def asyncpg_dsn(url: str) -> str:
    """asyncpg itself wants ``postgresql://``; SQLAlchemy wants ``postgresql+asyncpg://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, database: str) -> str:
    """``url`` naming another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def make_engine(
    url: str, settings: Settings, *, application_name: str = "pandasync", pre_ping: bool = True
) -> AsyncEngine:
    """An asyncpg engine with a bounded pool; pre-ping so a restarted Postgres heals by itself.

    ``pre_ping=False`` saves a round trip per checkout; the caller then handles a disconnect
    itself: the statement that meets a dead connection fails with ``connection_invalidated``,
    and the pool replaces every connection older than that failure at its next checkout."""
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def session_scope(
    factory: async_sessionmaker[AsyncSession], *, bind: AsyncConnection | None = None
) -> AsyncIterator[AsyncSession]:
    """A unit of work: commit once on success, roll back on any error. ``bind``: run it on
    that connection (a job that already holds one) instead of one from the pool."""
    async with factory(**({"bind": bind} if bind is not None else {})) as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (the typed Result does not declare ``rowcount``)."""
    return int(getattr(result, "rowcount", 0) or 0)
