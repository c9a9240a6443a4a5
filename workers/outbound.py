"""The outbound dispatcher: the change feed fanned out into deliveries, each sent signed per
Standard Webhooks, retried on the schedule, the attempts logged (``service.ledger.outbound``).

It runs as its own role (``pandasync deliver``), with its own database pool, HTTP client and
concurrency limit (``OUTBOUND_CONCURRENCY``), apart from the reconcile workers: a slow or dead
endpoint holds only its own deliveries, never a reconcile.

A message: ``POST`` of ``{"type", "timestamp", "data"}`` (``data`` is the change's payload) with
the headers ``webhook-id`` (one per endpoint and change, the same on every attempt),
``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed by the secret's base64 part).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.db import make_sessionmaker, session_scope
from service.ledger import outbound
from service.ledger.models import DeliveryState

log = structlog.get_logger(__name__)

DELIVERIES = Counter(
    "pandasync_outbound_deliveries_total",
    "Outbound webhook attempts by outcome (delivered, retry, failed)",
    ["outcome"],
)
DELIVERY_SECONDS = Histogram(
    "pandasync_outbound_delivery_seconds",
    "Duration of one outbound webhook attempt (request to answer)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PENDING = Gauge(
    "pandasync_outbound_pending",
    "Outbound deliveries waiting to be sent or retried",
    multiprocess_mode="mostrecent",
)
ENDPOINTS_DISABLED = Counter(
    "pandasync_outbound_endpoints_disabled_total",
    "Endpoints disabled because every attempt failed for OUTBOUND_DISABLE_AFTER_S",
)
PURGED = Counter(
    "pandasync_outbound_deliveries_purged_total",
    "Delivered and failed deliveries deleted after OUTBOUND_RETENTION_DAYS",
)

# How often the dispatcher deletes deliveries past their retention.
PURGE_INTERVAL_S = 3600.0

USER_AGENT = "pandasync-webhooks/1"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of ``body`` (Standard Webhooks, v1)."""
    key = base64.b64decode(secret.removeprefix(outbound.SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event_body(kind: str, recorded_at: datetime, payload: dict[str, Any]) -> bytes:
    """The message body; the same bytes on every attempt."""
    document = {"type": kind, "timestamp": recorded_at.isoformat(), "data": payload}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None
    latency_ms: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post(
    client: httpx.AsyncClient, url: str, secret: str, msg_id: str, body: bytes, timeout_s: float
) -> Answer:
    """Send one signed message; what came back (never raises for a network failure)."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    started = time.perf_counter()
    try:
        # httpx's timeout bounds each read; this bounds the whole request (a receiver that
        # answers a byte at a time), which the claim's lease relies on.
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, content=body, headers=headers)
    except TimeoutError:
        latency = int((time.perf_counter() - started) * 1000)
        return Answer(None, latency, f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as failure:
        latency = int((time.perf_counter() - started) * 1000)
        return Answer(None, latency, f"{type(failure).__name__}: {failure}"[:500])
    latency = int((time.perf_counter() - started) * 1000)
    refused = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    return Answer(response.status_code, latency, refused)


class Dispatcher:
    """Fans the feed out and sends what is due, ``concurrency`` at a time."""

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        client: httpx.AsyncClient,
        *,
        concurrency: int,
        timeout_s: float,
        schedule: Sequence[float],
        disable_after_s: float,
        retention_s: float,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.client = client
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.lease_s = timeout_s + outbound.LEASE_MARGIN_S
        self.schedule = tuple(schedule)
        self.disable_after_s = disable_after_s
        self.retention_s = retention_s
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()  # a delivery ended: a slot is free, its successor due

    async def fan_out(self) -> int:
        async with self.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                return await outbound.fan_out(conn)

    async def send_due(self) -> int:
        """Claim what is due (up to the free slots) and start sending it; how many started."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        async with session_scope(self.sessions) as session:
            claimed = await outbound.claim(session, free, self.lease_s)
        for due in claimed:
            task = asyncio.create_task(self._deliver(due))
            self._in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._freed.set()

    async def _deliver(self, due: outbound.Due) -> None:
        async with self._slots:
            body = event_body(due.kind, due.recorded_at, due.payload)
            msg_id = outbound.message_id(due.endpoint_id, due.change_id)
            answer = await post(self.client, due.url, due.secret, msg_id, body, self.timeout_s)
        DELIVERY_SECONDS.observe(answer.latency_ms / 1000)
        try:
            async with session_scope(self.sessions) as session:
                state = await outbound.record_attempt(
                    session,
                    due,
                    status=answer.status,
                    latency_ms=answer.latency_ms,
                    error=answer.error,
                    schedule=self.schedule,
                )
                disabled_since = None
                if state is not DeliveryState.DELIVERED:
                    disabled_since = await outbound.disable_if_failing(
                        session, due.endpoint_id, self.disable_after_s
                    )
        except Exception as error:  # the lease runs out and it is sent again: logged, not lost
            log.warning(
                "outbound attempt not recorded",
                delivery_id=due.id,
                error=f"{type(error).__name__}: {error}"[:300],
            )
            return
        outcome = {
            DeliveryState.DELIVERED: "delivered",
            DeliveryState.PENDING: "retry",
            DeliveryState.FAILED: "failed",
        }[state]
        DELIVERIES.labels(outcome).inc()
        if state is not DeliveryState.DELIVERED:
            log.info(
                "outbound attempt failed",
                delivery_id=due.id,
                endpoint_id=due.endpoint_id,
                attempt=due.attempts,
                status=answer.status,
                error=answer.error,
                outcome=outcome,
            )
        if disabled_since is not None:
            ENDPOINTS_DISABLED.inc()
            log.warning(
                "outbound endpoint disabled: every delivery failed; fix the receiver, then "
                "`pandasync endpoints enable ID`",
                endpoint_id=due.endpoint_id,
                failing_since=disabled_since.isoformat(),
            )

    async def purge(self) -> int:
        """Delete the deliveries past their retention; how many."""
        purged = await outbound.purge_finished(self.sessions, self.retention_s)
        PURGED.inc(purged)
        if purged:
            log.info("outbound deliveries purged", deliveries=purged)
        return purged

    async def step(self) -> int:
        """One pass: fan out, then send what is due; how many deliveries started."""
        await self.fan_out()
        started = await self.send_due()
        async with self.sessions() as session:
            PENDING.set(await outbound.pending_count(session))
        return started

    async def run(self, stop: asyncio.Event, poll_interval_s: float) -> None:
        """Pass after pass until ``stop``; what is in flight then is finished (or, if the
        process dies first, sent again once its lease has passed)."""
        stopped = asyncio.create_task(stop.wait())
        fanned_out = -poll_interval_s
        purged = -PURGE_INTERVAL_S
        while not stop.is_set():
            self._freed.clear()
            try:
                if time.monotonic() - purged >= PURGE_INTERVAL_S:
                    purged = time.monotonic()
                    await self.purge()
                # The fan-out and the gauge once per poll interval; claims whenever a slot
                # frees (a pass per freed slot would cost more than the delivery itself).
                if time.monotonic() - fanned_out >= poll_interval_s:
                    fanned_out = time.monotonic()
                    await self.fan_out()
                    async with self.sessions() as session:
                        PENDING.set(await outbound.pending_count(session))
                started = await self.send_due()
            except Exception as error:
                started = 0
                log.warning("outbound pass failed", error=f"{type(error).__name__}: {error}"[:300])
            if started and len(self._in_flight) < self.concurrency:
                continue  # there may be more due at once
            # The next pass: when a delivery ends (its slot, and its order's next event, are
            # free), or after the poll interval (new changes; retries come due).
            freed = asyncio.create_task(self._freed.wait())
            await asyncio.wait(
                {stopped, freed}, timeout=poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            freed.cancel()
        stopped.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)


async def run_dispatcher(settings: Settings, engine: AsyncEngine, stop: asyncio.Event) -> None:
    """The dispatcher as configured (``OUTBOUND_*`` settings), until ``stop``: the body of
    ``pandasync deliver``, and a task of ``pandasync dev``."""
    limits = httpx.Limits(max_connections=settings.outbound_concurrency)
    async with httpx.AsyncClient(timeout=settings.outbound_timeout_s, limits=limits) as http:
        dispatcher = Dispatcher(
            engine,
            make_sessionmaker(engine),
            http,
            concurrency=settings.outbound_concurrency,
            timeout_s=settings.outbound_timeout_s,
            schedule=settings.outbound_retry_schedule_s,
            disable_after_s=settings.outbound_disable_after_s,
            retention_s=settings.outbound_retention_days * 86400,
        )
        await dispatcher.run(stop, settings.outbound_poll_interval_s)
