"""The web app under a real uvicorn, on a free port, in a thread of its own.

The server gets its own event loop (uvicorn's ``run``), so the test's loop can block, cut a
proxy or query the database without stalling the server, and requests travel over sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.types import ASGIApp

from tests.support.servers import uvicorn_thread


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    with uvicorn_thread(app, timeout_graceful_shutdown=5) as (host, port):
        yield f"http://{host}:{port}"
