"""Per-process resources of a worker: one engine, one HTTP client, one rate limiter.

Created lazily on the worker's event loop (the first reconcile) and reused by every actor run
of the process; ``close_runtime`` releases them at shutdown.

Shutdown must not wait on upstream: a reconcile can sit in a slow call, or behind an
account-wide rate-limit pause, for a long while, holding its order's lock connection. So each
reconcile runs inside ``reconcile_in_flight``, and ``stop_reconciles`` (called when the worker
starts to stop) refuses new ones and, after ``SHUTDOWN_GRACE_S``, cancels those still running:
their transaction rolls back, their lock is released, and their messages go back to the broker.

The worker's metrics exposition (``serve_worker_metrics``) runs in a process of its own beside
the worker processes, on a listening socket that ``pandasync worker`` bound before it started
dramatiq: a taken port stops the command at once, in one line, instead of a traceback in a side
process while the workers run on without metrics.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.ratelimit import RateLimiter, make_rate_limiter


@dataclass
class WorkerRuntime:
    """``clients``: one PandaPon client per account (its credentials, base URL and rate
    limiter), by the account's user-id, the ``account_id`` of messages and rows."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    limiters: list[RateLimiter]
    clients: dict[str, PandaPonClient]

    @classmethod
    def build(cls, settings: Settings, *, pre_ping: bool = True) -> WorkerRuntime:
        """``pre_ping=False``: only for a process whose every use of the engine handles a
        dead connection itself (the reconcile worker's: ``get_runtime``)."""
        if not settings.database_url:
            raise RuntimeError("PANDASYNC_DATABASE_URL is not set")
        engine = make_engine(
            settings.database_url,
            settings,
            application_name="pandasync-worker",
            pre_ping=pre_ping,
        )
        http = make_http_client(settings)
        limiters: list[RateLimiter] = []
        clients: dict[str, PandaPonClient] = {}
        for account in settings.accounts():
            limiter = make_rate_limiter(settings, account=account)
            limiters.append(limiter)
            client = PandaPonClient(settings, http, limiter=limiter, account=account)
            clients[account.user_id or account.name] = client
        return cls(settings, engine, make_sessionmaker(engine), http, limiters, clients)

    @property
    def client(self) -> PandaPonClient:
        """The first account's client (the only one of a single-account deployment)."""
        return next(iter(self.clients.values()))

    @property
    def limiter(self) -> RateLimiter:
        return self.limiters[0]

    def client_for(self, account_id: str) -> PandaPonClient:
        """The client of the account whose user-id is ``account_id``. A message from before
        the accounts file (or of the single-account settings without PANDASYNC_USER_ID) names
        an account_id no client has: it is the only account's."""
        client = self.clients.get(account_id)
        if client is not None:
            return client
        if len(self.clients) == 1:
            return self.client
        raise UnknownAccount(account_id)

    async def aclose(self) -> None:
        await self.http.aclose()
        for limiter in self.limiters:
            await limiter.aclose()
        await self.engine.dispose()


class UnknownAccount(Exception):
    """A message names an account that is not configured (removed from the accounts file)."""

    def __init__(self, account_id: str) -> None:
        super().__init__(
            f"account_id {account_id!r} is not in PANDASYNC_ACCOUNTS_FILE: add the account "
            "back, or dismiss its failures (`pandasync failures dismiss`)"
        )
        self.account_id = account_id


_runtime: WorkerRuntime | None = None
_lock = asyncio.Lock()


async def get_runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is not None:  # every message after the first: no lock to take
        return _runtime
    async with _lock:
        if _runtime is None:
            # No pre-ping (a round trip per checkout): a reconcile's first statement, the
            # order's lock, is tried once more on a fresh connection when it meets a dead one
            # (``workers.reconcile.order_lock``); a later statement that does fails the attempt,
            # which the retry policy retries (``policy.database_away``).
            _runtime = WorkerRuntime.build(get_settings(), pre_ping=False)
        return _runtime


async def close_runtime() -> None:
    global _runtime
    async with _lock:
        if _runtime is not None:
            await _runtime.aclose()
            _runtime = None


# A healthy reconcile takes well under a second: this lets it finish rather than redo it.
SHUTDOWN_GRACE_S = 1.0


class WorkerStopping(Exception):
    """The worker is stopping: this reconcile did not run, or was cancelled, and its message
    goes back to the broker."""


_in_flight: set[asyncio.Task[object]] = set()
_stopping = False


@contextmanager
def reconcile_in_flight() -> Iterator[None]:
    """Run the block as a reconcile that shutdown may cancel; WorkerStopping when it was, or
    when the worker is already stopping. Call it from the reconcile's own task."""
    if _stopping:
        raise WorkerStopping
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("reconcile_in_flight needs a running task")
    _in_flight.add(task)
    try:
        yield
    except (asyncio.CancelledError, Exception):
        # Our own cancellation, or what it left behind (a connection cut mid-query): the
        # block's cleanup has run, and this is no failure of the order.
        if not cancelled_by_shutdown():
            raise
        task.uncancel()
        raise WorkerStopping from None
    finally:
        _in_flight.discard(task)


def cancelled_by_shutdown() -> bool:
    """True in a reconcile that ``stop_reconciles`` has cancelled."""
    task = asyncio.current_task()
    return _stopping and task is not None and task.cancelling() > 0


async def stop_reconciles(grace_s: float = SHUTDOWN_GRACE_S) -> int:
    """Refuse new reconciles; cancel those still running after ``grace_s``. Returns how many
    were cancelled."""
    global _stopping
    _stopping = True
    if _in_flight:
        await asyncio.wait(set(_in_flight), timeout=grace_s)
    running = [task for task in _in_flight if not task.done()]
    for task in running:
        task.cancel()
    return len(running)


# The listening socket's file descriptor, inherited from ``pandasync worker`` through dramatiq.
METRICS_FD_ENV = "PANDASYNC_WORKER_METRICS_FD"


def serve_worker_metrics() -> int:
    """Serve every worker process's metrics (prometheus_client multiprocess mode) until the
    process is stopped: a dramatiq fork function (``WorkerMetrics`` in ``workers.main``)."""
    from http.server import ThreadingHTTPServer

    from prometheus_client import CollectorRegistry, MetricsHandler
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    inherited = os.environ.get(METRICS_FD_ENV)
    if inherited:
        listener = socket.socket(fileno=int(inherited))
    else:  # started by ``dramatiq workers.main`` directly: bind here
        settings = get_settings()
        try:
            listener = socket.create_server((settings.host, settings.worker_metrics_port))
        except OSError as error:
            print(  # the side process's one way to the operator
                f"pandasync worker: no metrics: cannot listen on {settings.host}:"
                f"{settings.worker_metrics_port} ({error.strerror}); set "
                "PANDASYNC_WORKER_METRICS_PORT to a free port (0: no metrics server)",
                file=sys.stderr,
            )
            return 1

    class Exposition(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(
            self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
        ) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a scraper that hung up
                super().handle_error(request, client_address)

    server = Exposition(
        listener.getsockname()[:2], MetricsHandler.factory(registry), bind_and_activate=False
    )
    server.socket.close()
    server.socket = listener
    server.serve_forever()
    return 0


def release_metrics_socket() -> None:
    """In a worker process: close the inherited metrics socket, which only the exposition
    process serves (a connection must never wait on a process that does not accept)."""
    inherited = os.environ.get(METRICS_FD_ENV)
    if inherited:
        with suppress(OSError):
            os.close(int(inherited))
