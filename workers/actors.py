"""The dramatiq actors. ``register(broker)`` declares them on an already configured broker.

``reconcile`` is a plain (threaded) actor so it can read its own retry count; the work itself is
a coroutine run on the worker process's event loop (dramatiq's AsyncIO middleware), where the
process's engine, HTTP client and rate limiter live (``workers.runtime``).

A reconcile's upstream calls share a time budget (``RECONCILE_UPSTREAM_BUDGET_S``), so a slow
upstream holds a worker thread for that long at most per attempt; a worker that stops cancels
what is still running and sends those messages again (``workers.runtime.stop_reconciles``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import CurrentMessage
from prometheus_client import Counter, Gauge, Histogram

from service.broker import RECONCILE_ACTOR, RECONCILE_QUEUE, reconcile_message
from service.db import session_scope
from service.domain import Platform, ReconcileRequest, SyncSource
from service.pandapon.client import upstream_budget
from service.pandapon.errors import LOG_TEXT_LIMIT, PandaPonError, clean_text
from service.pandapon.ratelimit import AccountPaused, defer_when_paused
from workers import policy
from workers.reconcile import Outcome, count_open_failures, reconcile_order
from workers.runtime import (
    WorkerStopping,
    cancelled_by_shutdown,
    get_runtime,
    reconcile_in_flight,
)

log = structlog.get_logger(__name__)

# Another worker holds the order: look again shortly, as a new message (not a retry).
BUSY_DELAY_MS = 250
# Past an account's pause, so the deferred reconcile finds the calls open again.
DEFER_SLACK_MS = 250
# Well above the upstream timeouts times the calls of one reconcile, well below dramatiq's 10 min.
TIME_LIMIT_MS = 180_000

RECONCILES = Counter(
    "pandasync_reconcile_total", "Reconcile runs by outcome", ["platform", "source", "outcome"]
)
FAILURES_OPEN = Gauge(
    "pandasync_sync_failures_open",
    "Orders whose last sync failed and that no sync has fixed since (sync_failures)",
    multiprocess_mode="mostrecent",
)
RECONCILE_SECONDS = Histogram(
    "pandasync_reconcile_seconds",
    "Duration of a reconcile run (lock, fetch, write)",
    ["platform"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


async def run_reconcile(request: ReconcileRequest, retries: int) -> Outcome | policy.Decision:
    """One attempt; upstream failures become a policy decision, recorded when final. A worker
    that is stopping gives the message back instead."""
    try:
        with reconcile_in_flight():
            return await _attempt(request, retries)
    except WorkerStopping:
        return policy.GiveBack()


async def _attempt(request: ReconcileRequest, retries: int) -> Outcome | policy.Decision:
    runtime = await get_runtime()
    try:
        # One account: its client, whatever account_id an old message names.
        several = len(runtime.settings.accounts()) > 1
        client = runtime.client_for(request.account_id) if several else runtime.client
        with (
            upstream_budget(runtime.settings.reconcile_upstream_budget_s),
            defer_when_paused(),
        ):
            result = await reconcile_order(runtime.engine, runtime.sessions, client, request)
    except AccountPaused as paused:
        log.info("deferred: the account's upstream calls are paused", seconds=paused.seconds)
        return policy.Defer(int(paused.seconds * 1000) + DEFER_SLACK_MS)
    except Exception as error:
        if cancelled_by_shutdown():
            raise  # the shutdown's doing, not the order's: the message goes back
        decision = policy.decide(error, retries)
        if isinstance(decision, policy.Record):
            async with session_scope(runtime.sessions) as session:
                await policy.record_failure(session, request, error, decision.kind, retries + 1)
                FAILURES_OPEN.set(await count_open_failures(session))
        context = error.context() if isinstance(error, PandaPonError) else {}
        log.warning(
            "reconcile failed",
            error=clean_text(f"{type(error).__name__}: {error}", LOG_TEXT_LIMIT),
            decision=type(decision).__name__.lower(),
            retries=retries,
            **context,
        )
        return decision
    if result.failures_resolved:
        async with runtime.sessions() as session:
            FAILURES_OPEN.set(await count_open_failures(session))
    return result.outcome


def reconcile(
    account_id: str,
    platform: str,
    order_id: str,
    source: str = SyncSource.WEBHOOK.value,
    inbox_id: int | None = None,
    request_id: str | None = None,
    refund_id: str | None = None,
) -> None:
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message else 0
    request = ReconcileRequest(
        account_id, Platform(platform), order_id, SyncSource(source), inbox_id, refund_id
    )
    loop = get_event_loop_thread()
    if loop is None:
        raise RuntimeError("the AsyncIO middleware is not running on this broker")
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(
        request_id=request_id, platform=platform, order_id=order_id, source=source
    ):
        outcome = loop.run_coroutine(run_reconcile(request, retries))
        RECONCILE_SECONDS.labels(platform).observe(time.perf_counter() - started)
        label = outcome.value if isinstance(outcome, Outcome) else type(outcome).__name__.lower()
        RECONCILES.labels(platform, source, label).inc()
        if isinstance(outcome, policy.Retry):
            raise dramatiq.Retry(delay=outcome.delay_ms)
        if outcome is Outcome.BUSY or isinstance(outcome, policy.GiveBack | policy.Defer):
            again = reconcile_message(
                account_id,
                platform,
                order_id,
                source=source,
                inbox_id=inbox_id,
                request_id=request_id,
                refund_id=refund_id,
            )
            if isinstance(outcome, policy.GiveBack):
                # Interrupted, not failed: the next attempt keeps this one's retry count.
                dramatiq.get_broker().enqueue(again.copy(options={"retries": retries}))
                log.info("given back: the worker is stopping")
            elif isinstance(outcome, policy.Defer):
                # Not failed either: after the account's pause, with the same retry count.
                dramatiq.get_broker().enqueue(
                    again.copy(options={"retries": retries}), delay=outcome.delay_ms
                )
            else:
                dramatiq.get_broker().enqueue(again, delay=BUSY_DELAY_MS)
        if isinstance(outcome, Outcome):
            log.info("reconciled", outcome=outcome.value, detail=outcome.detail)


def register(broker: dramatiq.Broker) -> dramatiq.Actor[Any, Any]:
    """Declare the actors on ``broker`` (call once per broker, after configuring it)."""
    if not any(isinstance(m, CurrentMessage) for m in broker.middleware):
        broker.add_middleware(CurrentMessage())
    logging.getLogger("dramatiq.middleware.retries.Retries").setLevel(logging.WARNING)
    declare = dramatiq.actor(
        actor_name=RECONCILE_ACTOR,
        queue_name=RECONCILE_QUEUE,
        broker=broker,
        max_retries=policy.MAX_RETRIES + 1,
        time_limit=TIME_LIMIT_MS,
    )
    actor: dramatiq.Actor[Any, Any] = declare(reconcile)
    return actor
