"""Operator commands behind ``pandasync replay``, ``resync`` and ``status``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import dramatiq
from sqlalchemy import Interval, func, select, text, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.broker import queue_depth, reconcile_message
from service.db import session_scope
from service.domain import WAITING_INBOX_STATES, InboxState, Platform, SyncSource, UnmappedField
from service.ledger.models import RefundSweepCursor, SweepCursor, SyncFailure, WebhookInbox
from workers.reconcile import count_open_failures


@dataclass(frozen=True, slots=True)
class FailureRef:
    id: int
    account_id: str
    platform: Platform
    order_id: str


async def open_failures(
    sessions: async_sessionmaker[AsyncSession],
    *,
    platform: Platform | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[FailureRef]:
    query = select(
        SyncFailure.id, SyncFailure.account_id, SyncFailure.platform, SyncFailure.order_id
    ).where(SyncFailure.resolved_at.is_(None))
    if platform is not None:
        query = query.where(SyncFailure.platform == platform)
    if since is not None:
        query = query.where(SyncFailure.last_failed_at >= since)
    if until is not None:
        query = query.where(SyncFailure.last_failed_at < until)
    async with sessions() as session:
        rows = (await session.execute(query.order_by(SyncFailure.id))).all()
    return [FailureRef(*row) for row in rows]


async def mark_replayed(sessions: async_sessionmaker[AsyncSession], ids: list[int]) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            update(SyncFailure)
            .where(SyncFailure.id.in_(ids))
            .values(replayed_at=func.now(), replay_count=SyncFailure.replay_count + 1)
        )


def enqueue_replay(broker: dramatiq.Broker, failures: list[FailureRef]) -> None:
    for failure in failures:
        broker.enqueue(
            reconcile_message(
                failure.account_id,
                failure.platform.value,
                failure.order_id,
                source=SyncSource.REPLAY.value,
            )
        )


@dataclass(frozen=True, slots=True)
class SweepStatus:
    account_id: str
    platform: Platform
    last_finished_at: datetime | None
    last_examined: int
    last_drift: int


@dataclass(frozen=True, slots=True)
class UnmappedStatus:
    """One unplaced value, accounts summed: the ``orders`` that hold it now (None for a
    message type, counted in ``seen`` messages instead)."""

    platform: Platform | None
    field: UnmappedField
    value: str
    orders: int | None
    seen: int
    first_seen_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class Status:
    inbox_backlog: int
    inbox_unqueued: int
    oldest_unprocessed_age: timedelta | None
    open_failures: int
    queue_depth: int | None
    sweeps: list[SweepStatus]
    refund_sweeps: list[SweepStatus]
    unmapped: tuple[UnmappedStatus, ...] = ()
    unmapped_total: int = 0  # more than ``unmapped`` lists when over UNMAPPED_SHOWN


async def gather_status(
    sessions: async_sessionmaker[AsyncSession], broker: dramatiq.Broker | None
) -> Status:
    async with sessions() as session:
        backlog, unqueued, oldest = (
            await session.execute(
                select(
                    func.count(),
                    func.count().filter(WebhookInbox.state == InboxState.RECEIVED),
                    type_coerce(func.now() - func.min(WebhookInbox.received_at), Interval()),
                ).where(WebhookInbox.state.in_(WAITING_INBOX_STATES))
            )
        ).one()
        failures = await count_open_failures(session)
        sweep_rows = await _sweeps(session, SweepCursor)
        refund_sweep_rows = await _sweeps(session, RefundSweepCursor)
        unmapped, unmapped_total = await _unmapped_values(session)
    return Status(
        int(backlog),
        int(unqueued),
        oldest,
        int(failures),
        queue_depth(broker),
        sweep_rows,
        refund_sweeps=refund_sweep_rows,
        unmapped=unmapped,
        unmapped_total=unmapped_total,
    )


async def _sweeps(
    session: AsyncSession, table: type[SweepCursor] | type[RefundSweepCursor]
) -> list[SweepStatus]:
    """The last run of one kind of sweep, per account and platform."""
    rows = await session.execute(
        select(
            table.account_id,
            table.platform,
            table.last_finished_at,
            table.last_examined,
            table.last_drift,
        ).order_by(table.platform)
    )
    return [SweepStatus(*row) for row in rows.all()]


# The most recently seen first; the rest are in the view.
UNMAPPED_SHOWN = 20
_UNMAPPED = text(
    """
SELECT platform, field, value, sum(orders) AS orders, sum(seen_count) AS seen,
       min(first_seen_at) AS first_seen_at, max(last_seen_at) AS last_seen_at,
       count(*) OVER () AS total
FROM report_unmapped_values
GROUP BY platform, field, value
ORDER BY max(last_seen_at) DESC, platform, field, value
LIMIT :shown
"""
)


async def _unmapped_values(session: AsyncSession) -> tuple[tuple[UnmappedStatus, ...], int]:
    """The values the mapping could not place (``report_unmapped_values``, accounts summed):
    the UNMAPPED_SHOWN seen last, and how many there are."""
    rows = (await session.execute(_UNMAPPED, {"shown": UNMAPPED_SHOWN})).all()
    listed = tuple(
        UnmappedStatus(
            Platform(r.platform) if r.platform else None,
            UnmappedField(r.field),
            r.value,
            None if r.orders is None else int(r.orders),
            int(r.seen),
            r.first_seen_at,
            r.last_seen_at,
        )
        for r in rows
    )
    return listed, int(rows[0].total) if rows else 0
