"""The relay: committed inbox rows that never reached the broker are found and sent.

A row stays ``received`` when the send after its commit failed (broker down), was skipped
(broker slow) or never happened (the process died between commit and send). ``relay_once``
sends every such row older than ``RELAY_GRACE_S`` (younger ones are normally still on their
way) and marks it ``queued``, in batches, each batch one transaction holding its rows with
``FOR UPDATE SKIP LOCKED`` so any number of web processes and schedulers can relay at once
without sending a row twice. It runs in the web role's lifespan (``run_relay``) and is meant
to be called by the scheduler too.

A row ``queued`` but still not processed REQUEUE_AFTER_S after its hand-off is sent again only
once the broker's queue has moved on: when nothing waits there, or the oldest message waiting
was enqueued REQUEUE_AFTER_S after the row was handed off. Its message was then lost (Redis
restarted without persistence) rather than still waiting behind a backlog; sending every
waiting row again would only deepen that backlog, each pass. Rows of an order whose
reconcile failed for good (an open ``permanent`` sync failure) wait for ``pandasync replay``.

The same loop deletes signature nonces older than twice the tolerance: a request that old is
refused by its timestamp before its nonce matters.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import dramatiq
import structlog
from sqlalchemy import ColumnElement, and_, delete, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.broker import AGE_UNKNOWN, oldest_waiting
from service.config import Settings
from service.db import rowcount, session_scope
from service.domain import InboxState
from service.ledger.inbox import held_for_replay, mark_handed_off, mark_ignored
from service.ledger.models import WebhookInbox, WebhookNonce
from service.webhooks import metrics
from service.webhooks.handoff import (
    BrokerSender,
    InlineSender,
    PendingReconcile,
    send_reconciles,
)
from service.webhooks.inbox import describe_error

log = structlog.get_logger("pandasync.relay")

RELAY_BATCH = 500
NONCE_PURGE_INTERVAL_S = 60.0


async def relay_once(
    sessions: async_sessionmaker[AsyncSession],
    broker: dramatiq.Broker,
    settings: Settings,
    *,
    sender: BrokerSender | InlineSender | None = None,
    batch_size: int = RELAY_BATCH,
) -> int:
    """Hand off every row left ``received`` for longer than the grace, and again every row
    ``queued`` whose message the broker no longer holds (see above); return how many.

    Stops early (returning what it sent so far) when the broker fails; raises on a database
    error. ``sender`` bounds the blocking broker calls; without one they run in a thread.
    """
    grace = timedelta(seconds=settings.relay_grace_s)
    lost = await _lost_in_broker(broker, sender, timedelta(seconds=settings.requeue_after_s))
    handed_off = 0
    while True:
        async with session_scope(sessions) as session:
            rows = (
                await session.execute(
                    select(
                        WebhookInbox.id,
                        WebhookInbox.account_id,
                        WebhookInbox.platform,
                        WebhookInbox.order_id,
                        WebhookInbox.request_id,
                        WebhookInbox.state,
                    )
                    .where(
                        or_(
                            and_(
                                WebhookInbox.state == InboxState.RECEIVED,
                                WebhookInbox.received_at < func.now() - grace,
                            ),
                            lost,
                        )
                    )
                    .order_by(WebhookInbox.id)
                    .limit(batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            handed_off_before = {r.id for r in rows if r.state is InboxState.QUEUED}
            items = [
                PendingReconcile(r.id, r.account_id, r.platform.value, r.order_id, r.request_id)
                for r in rows
                if r.platform is not None and r.order_id is not None
            ]
            unroutable = [r.id for r in rows if r.platform is None or r.order_id is None]
            if unroutable:
                await mark_ignored(session, unroutable)
            sent: list[int] = []
            error: BaseException | None = None
            if items and sender is not None:
                sent, error = await sender.send(items)
            elif items:
                sent, error = await asyncio.to_thread(send_reconciles, broker, items)
            if sent:
                await mark_handed_off(session, sent)
        handed_off += len(sent)
        metrics.RELAY_HANDED_OFF.inc(len(sent))
        again = len(handed_off_before.intersection(sent))
        if again:
            log.warning("relay.handed_off_again", rows=again)
            metrics.RELAY_HANDED_OFF_AGAIN.inc(again)
        if error is not None:
            metrics.RELAY_FAILURES.inc()
            log.warning(
                "relay.broker_failed",
                error=describe_error(error),
                sent=handed_off,
                left=len(items) - len(sent),
            )
            break
        if len(rows) < batch_size:
            break
    if handed_off:
        log.info("relay.handed_off", rows=handed_off)
    return handed_off


async def _lost_in_broker(
    broker: dramatiq.Broker,
    sender: BrokerSender | InlineSender | None,
    requeue_after: timedelta,
) -> ColumnElement[bool]:
    """The condition on ``queued`` rows whose message the broker no longer holds."""
    try:
        if sender is not None:
            waiting_since = await sender.call(lambda: oldest_waiting(broker))
        else:
            waiting_since = await asyncio.to_thread(oldest_waiting, broker)
    except Exception as error:  # unreachable or busy: the sends would fail too; next pass
        log.warning("relay.broker_unreadable", error=describe_error(error))
        return false()
    if waiting_since is AGE_UNKNOWN:
        return false()
    moved_on = func.now() if waiting_since is None else func.least(func.now(), waiting_since)
    # A reconcile that failed for good (a refused request, a body we cannot read) leaves its
    # rows queued: they wait for `pandasync replay` once the cause is fixed, as the failure
    # does, rather than failing again every REQUEUE_AFTER_S. Exhausted retries (an outage
    # longer than the retry budget) are sent again: that heals by itself.
    return and_(
        WebhookInbox.state == InboxState.QUEUED,
        WebhookInbox.queued_at < moved_on - requeue_after,
        ~held_for_replay(),
    )


async def purge_nonces(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> int:
    """Delete nonces seen more than twice the signature tolerance ago; return how many."""
    window = timedelta(seconds=2 * settings.signature_tolerance_s)
    async with session_scope(sessions) as session:
        result = await session.execute(
            delete(WebhookNonce).where(WebhookNonce.seen_at < func.now() - window)
        )
    purged = rowcount(result)
    metrics.NONCES_PURGED.inc(purged)
    return purged


async def measure_backlog(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Set the backlog gauges from the inbox; return the number of rows not handed off."""
    async with session_scope(sessions) as session:
        count, oldest = (
            await session.execute(
                select(func.count(), func.min(WebhookInbox.received_at)).where(
                    WebhookInbox.state == InboxState.RECEIVED
                )
            )
        ).one()
    metrics.RELAY_BACKLOG.set(count)
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    metrics.RELAY_OLDEST_SECONDS.set(max(age, 0.0))
    return int(count)


async def run_relay(
    sessions: async_sessionmaker[AsyncSession],
    broker: dramatiq.Broker,
    settings: Settings,
    *,
    sender: BrokerSender | InlineSender | None = None,
) -> None:
    """Relay, measure the backlog and purge old nonces every RELAY_INTERVAL_S, until cancelled."""
    last_purge = float("-inf")
    while True:
        try:
            await relay_once(sessions, broker, settings, sender=sender)
            await measure_backlog(sessions)
            if time.monotonic() - last_purge >= NONCE_PURGE_INTERVAL_S:
                await purge_nonces(sessions, settings)
                last_purge = time.monotonic()
        except Exception as error:
            metrics.RELAY_FAILURES.inc()
            log.warning("relay.failed", error=describe_error(error))
        await asyncio.sleep(settings.relay_interval_s)
