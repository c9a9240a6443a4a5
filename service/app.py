"""The web role: app factory and lifespan.

The lifespan owns the long-lived things: the database engine, the broker, the inbox writer
(group commit), the hand-off of committed rows to the broker and the relay loop. They reach
the endpoints through ``request.app.state.pandasync``. Settings that cannot work (signature
verification without credentials) fail ``create_app``, before the server listens.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import dramatiq
import structlog
from dramatiq.brokers.stub import StubBroker
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from service.broker import RECONCILE_QUEUE, broker_problem, make_broker
from service.config import Settings, get_settings
from service.console import console_routes
from service.db import make_engine, make_sessionmaker
from service.webhooks.endpoint import Receiver
from service.webhooks.handoff import BrokerSender, Handoff, InlineSender, make_sender
from service.webhooks.inbox import InboxWriter, describe_error
from service.webhooks.relay import run_relay
from service.webhooks.request_ids import RequestIdMiddleware

log = structlog.get_logger("pandasync.web")

WEBHOOK_PATH = "/webhooks/pandapon"
# /readyz answers within about this long even when a dependency hangs.
READY_CHECK_TIMEOUT_S = 2.0


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    broker: dramatiq.Broker
    writer: InboxWriter
    handoff: Handoff


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.pandasync
    return state


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check_database(engine: AsyncEngine) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as error:
        return f"unavailable: {type(error).__name__}"
    return "ok"


async def _check_broker(broker: dramatiq.Broker) -> str:
    """Redis pinged, RabbitMQ connected to (a connection of its own, short timeouts), off the
    event loop: both clients block."""
    if isinstance(broker, StubBroker):
        return "ok"
    try:
        problem = await asyncio.wait_for(
            asyncio.to_thread(broker_problem, broker), READY_CHECK_TIMEOUT_S
        )
    except TimeoutError:
        return "unavailable: TimeoutError"
    if problem is not None:
        return f"unavailable: {problem.split(':', 1)[0]}"
    return "ok"


async def readyz(request: Request) -> Response:
    state = state_of(request)
    database, broker = await asyncio.gather(
        _check_database(state.engine), _check_broker(state.broker)
    )
    checks = {"database": database, "broker": broker}
    ready = database == "ok" and broker == "ok"
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


def multiprocess_metrics() -> bool:
    """Whether the metrics are kept in files shared by several web processes
    (``pandasync serve --workers N`` sets PROMETHEUS_MULTIPROC_DIR for them)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


async def metrics(request: Request) -> Response:
    """This process's metrics, or those of every web process summed (multiprocess mode)."""
    if multiprocess_metrics():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def close_broker(broker: dramatiq.Broker) -> None:
    """Close the broker and the connections of its client (dramatiq leaves Redis's open)."""
    broker.close()
    client = getattr(broker, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()


def create_app(
    settings: Settings | None = None, *, broker: dramatiq.Broker | None = None
) -> Starlette:
    """The web role's app. ``broker``: share one (``pandasync dev``'s in-process broker)
    instead of building one from settings; the caller then owns it."""
    settings = settings or get_settings()
    shared_broker = broker
    if not settings.database_url:
        raise RuntimeError("PANDASYNC_DATABASE_URL is not set (the CLI sets the embedded one)")
    database_url = settings.database_url
    receiver = Receiver(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = make_engine(database_url, settings, application_name="pandasync-web")
        sessions = make_sessionmaker(engine)
        broker = shared_broker or make_broker(settings)
        broker.declare_queue(RECONCILE_QUEUE)
        handoff_sender = make_sender(broker, settings)
        # The relay sends rarely: a thread (its own, so it never waits behind the hand-off).
        relay_sender: BrokerSender | InlineSender = (
            handoff_sender if isinstance(handoff_sender, InlineSender) else BrokerSender(broker)
        )
        timeout_s = settings.inbox_write_timeout_ms / 1000
        handoff = Handoff(handoff_sender, engine, db_timeout_s=max(timeout_s, 1.0))
        writer = InboxWriter(engine, timeout_s=timeout_s, on_committed=handoff.submit)
        handoff.start()
        writer.start()
        receiver.attach(writer)
        relay = asyncio.create_task(
            run_relay(sessions, broker, settings, sender=relay_sender), name="pandasync-relay"
        )
        app.state.pandasync = AppState(settings, engine, sessions, broker, writer, handoff)
        # What exists now (SQLAlchemy, pydantic, prometheus, the app) lives as long as the
        # process: keep the collector from rescanning it in every full collection, which
        # showed as tail latency under load.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            receiver.attach(None)
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
            await writer.close()
            await handoff.close()
            handoff_sender.close()
            relay_sender.close()
            await engine.dispose()
            if multiprocess_metrics():
                # A gauge of a process gone must not be reported: drop its live values.
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
            try:
                if shared_broker is None:
                    close_broker(broker)
            except Exception as error:
                log.warning("broker.close_failed", error=describe_error(error))

    routes: list[BaseRoute] = [
        Route(WEBHOOK_PATH, receiver, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if any(account.tokens for account in settings.accounts()):
        routes.append(Route(WEBHOOK_PATH + "/{token}", receiver, methods=["POST"]))
    # The operator console: routes of its own, nothing of it on the webhook path.
    routes += console_routes(settings)
    app = Starlette(routes=routes, middleware=[Middleware(RequestIdMiddleware)], lifespan=lifespan)
    # No redirect to the path without its trailing slash: it would echo the token in Location.
    # A path that does not match exactly is a 404.
    app.router.redirect_slashes = False
    return app
