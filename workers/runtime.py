"""Per-process resources of a worker: one engine, one HTTP client, one rate limiter.

Created lazily on the worker's event loop (the first reconcile) and reused by every actor run
of the process; ``close_runtime`` releases them at shutdown.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.ratelimit import RateLimiter, make_rate_limiter


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    limiter: RateLimiter
    client: PandaPonClient

    @classmethod
    def build(cls, settings: Settings) -> WorkerRuntime:
        if not settings.database_url:
            raise RuntimeError("PANDASYNC_DATABASE_URL is not set")
        engine = make_engine(settings.database_url, settings, application_name="pandasync-worker")
        http = make_http_client(settings)
        limiter = make_rate_limiter(settings)
        client = PandaPonClient(settings, http, limiter=limiter)
        return cls(settings, engine, make_sessionmaker(engine), http, limiter, client)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.limiter.aclose()
        await self.engine.dispose()


_runtime: WorkerRuntime | None = None
_lock = asyncio.Lock()


async def get_runtime() -> WorkerRuntime:
    global _runtime
    async with _lock:
        if _runtime is None:
            _runtime = WorkerRuntime.build(get_settings())
        return _runtime


async def close_runtime() -> None:
    global _runtime
    async with _lock:
        if _runtime is not None:
            await _runtime.aclose()
            _runtime = None
