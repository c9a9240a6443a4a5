"""Reconcile one order: fetch its truth from PandaPon and write it into the ledger.

The job, in order:

1. Take the order's lock (a Postgres session advisory lock, so it holds across every worker
   process and machine and dies with a killed worker's connection). If another worker holds it,
   answer ``BUSY``: the caller re-sends the message a little later.
2. Coalesce: a webhook message whose inbox row is already ``processed`` was covered by a fetch
   that started after it arrived; nothing to do.
3. Note the database clock, then fetch the order detail, its logistics and the after-sales
   records it needs (from refund messages, from the order itself, and open refunds in the ledger).
4. Write everything in ONE transaction (``service.ledger.write``), resolve any open sync
   failure of the order, and mark the inbox rows received before the fetch as processed.

Each upstream call goes through ``workers.policy.call_with_retries``; what still fails propagates
to the message-level retry policy (``workers.policy.decide``).
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Protocol

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db import rowcount, session_scope
from service.ledger.models import (
    InboxState,
    Order,
    Platform,
    Refund,
    RefundStatus,
    SyncFailure,
    SyncSource,
    WebhookInbox,
)
from service.ledger.write import OrderTruth, WriteResult, write_order
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot
from workers.policy import call_with_retries

# The first key of the two-int advisory lock form: keeps our locks apart from anyone else's.
ORDER_LOCK_CLASS = 0x5053  # "PS"


class UpstreamClient(Protocol):
    """What a reconcile needs from PandaPon (``service.pandapon.client.PandaPonClient``)."""

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot: ...

    async def logistics(
        self, platform: Platform, order: OrderSnapshot
    ) -> Sequence[ShipmentSnapshot]: ...

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot: ...


class Outcome(enum.StrEnum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"  # fetched and written, nothing in the current state changed
    STALE = "stale"  # a newer snapshot was already stored
    COALESCED = "coalesced"  # covered by a fetch that started after the message
    BUSY = "busy"  # another worker holds the order's lock


@dataclass(frozen=True, slots=True)
class ReconcileRequest:
    account_id: str
    platform: Platform
    order_id: str
    source: SyncSource
    inbox_id: int | None = None
    refund_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    outcome: Outcome
    write: WriteResult | None = None
    failures_resolved: int = 0


def order_lock_key(account_id: str, platform: Platform, order_id: str) -> int:
    """A stable signed 32-bit key for the order (advisory locks take int4 pairs)."""
    digest = zlib.crc32(f"{account_id}\x1f{platform.value}\x1f{order_id}".encode())
    return digest - (1 << 32) if digest >= (1 << 31) else digest


@asynccontextmanager
async def order_lock(engine: AsyncEngine, request: ReconcileRequest) -> AsyncIterator[bool]:
    """Hold the order's advisory lock for the block; yields False when another worker has it."""
    key = order_lock_key(request.account_id, request.platform, request.order_id)
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        acquired = bool(
            (
                await autocommit.execute(
                    text("SELECT pg_try_advisory_lock(:c, :k)"), {"c": ORDER_LOCK_CLASS, "k": key}
                )
            ).scalar_one()
        )
        try:
            yield acquired
        finally:
            if acquired:
                await autocommit.execute(
                    text("SELECT pg_advisory_unlock(:c, :k)"), {"c": ORDER_LOCK_CLASS, "k": key}
                )


async def _already_covered(session: AsyncSession, inbox_id: int) -> bool:
    state = (
        await session.execute(select(WebhookInbox.state).where(WebhookInbox.id == inbox_id))
    ).scalar_one_or_none()
    return state in (InboxState.PROCESSED, InboxState.IGNORED)


async def _refund_ids_to_fetch(
    session: AsyncSession, request: ReconcileRequest, snapshot: OrderSnapshot
) -> list[str]:
    """Refund messages not yet covered, refunds the order names, and open ones in the ledger."""
    ids: dict[str, None] = {}
    if request.refund_id:
        ids[request.refund_id] = None
    for refund_id in snapshot.refund_ids:
        ids[refund_id] = None
    from_inbox = await session.execute(
        select(WebhookInbox.refund_id)
        .where(
            WebhookInbox.account_id == request.account_id,
            WebhookInbox.platform == request.platform,
            WebhookInbox.order_id == request.order_id,
            WebhookInbox.refund_id.is_not(None),
            WebhookInbox.state.in_([InboxState.RECEIVED, InboxState.QUEUED]),
        )
        .distinct()
    )
    open_in_ledger = await session.execute(
        select(Refund.refund_id)
        .join(Order, Order.id == Refund.order_pk)
        .where(
            Order.account_id == request.account_id,
            Order.platform == request.platform,
            Order.order_id == request.order_id,
            Refund.status.in_([RefundStatus.REQUESTED, RefundStatus.UNKNOWN]),
        )
    )
    for refund_id in [*from_inbox.scalars(), *open_in_ledger.scalars()]:
        if refund_id:
            ids[refund_id] = None
    return list(ids)


async def reconcile_order(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    request: ReconcileRequest,
) -> ReconcileResult:
    async with order_lock(engine, request) as acquired:
        if not acquired:
            return ReconcileResult(Outcome.BUSY)
        async with sessions() as session:
            if request.inbox_id is not None and await _already_covered(session, request.inbox_id):
                return ReconcileResult(Outcome.COALESCED)
            fetched_at: datetime = (
                await session.execute(select(func.clock_timestamp()))
            ).scalar_one()
            await session.rollback()  # no transaction stays open across the fetch

        platform = request.platform
        snapshot = await call_with_retries(lambda: client.order_detail(platform, request.order_id))
        shipments = await call_with_retries(lambda: client.logistics(platform, snapshot))
        async with sessions() as session:
            refund_ids = await _refund_ids_to_fetch(session, request, snapshot)
        refunds = [
            await call_with_retries(partial(client.refund_detail, platform, refund_id))
            for refund_id in refund_ids
        ]

        truth = OrderTruth(snapshot, shipments, refunds, fetched_at=fetched_at)
        async with session_scope(sessions) as session:
            result = await write_order(
                session,
                request.account_id,
                truth,
                source=request.source,
                inbox_id=request.inbox_id,
            )
            resolved = await resolve_failures(session, request)
    if result.stale:
        return ReconcileResult(Outcome.STALE, result, resolved)
    changed = result.created or result.status_changed or result.price_changed or result.new_events
    return ReconcileResult(Outcome.WRITTEN if changed else Outcome.UNCHANGED, result, resolved)


async def resolve_failures(session: AsyncSession, request: ReconcileRequest) -> int:
    """A successful sync closes the order's open failure, if it had one; returns how many."""
    result = await session.execute(
        update(SyncFailure)
        .where(
            SyncFailure.account_id == request.account_id,
            SyncFailure.platform == request.platform,
            SyncFailure.order_id == request.order_id,
            SyncFailure.resolved_at.is_(None),
        )
        .values(resolved_at=func.now())
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


async def count_open_failures(session: AsyncSession) -> int:
    return int(
        (
            await session.execute(
                select(func.count())
                .select_from(SyncFailure)
                .where(SyncFailure.resolved_at.is_(None))
            )
        ).scalar_one()
    )
