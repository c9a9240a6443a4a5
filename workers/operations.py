"""Operator commands behind ``pandasync replay``, ``resync`` and ``status``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import dramatiq
from sqlalchemy import Interval, func, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.ledger.models import (
    InboxState,
    Platform,
    SweepCursor,
    SyncFailure,
    SyncSource,
    WebhookInbox,
)
from workers.broker import queue_depth, reconcile_message
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
class Status:
    inbox_backlog: int
    inbox_unqueued: int
    oldest_unprocessed_age: timedelta | None
    open_failures: int
    queue_depth: int | None
    sweeps: list[SweepStatus]


async def gather_status(
    sessions: async_sessionmaker[AsyncSession], broker: dramatiq.Broker | None
) -> Status:
    open_states = [InboxState.RECEIVED, InboxState.QUEUED]
    async with sessions() as session:
        backlog, unqueued, oldest = (
            await session.execute(
                select(
                    func.count(),
                    func.count().filter(WebhookInbox.state == InboxState.RECEIVED),
                    type_coerce(func.now() - func.min(WebhookInbox.received_at), Interval()),
                ).where(WebhookInbox.state.in_(open_states))
            )
        ).one()
        failures = await count_open_failures(session)
        sweeps = (
            await session.execute(select(SweepCursor).order_by(SweepCursor.platform))
        ).scalars()
        sweep_rows = [
            SweepStatus(s.account_id, s.platform, s.last_finished_at, s.last_examined, s.last_drift)
            for s in sweeps
        ]
    return Status(
        int(backlog), int(unqueued), oldest, int(failures), queue_depth(broker), sweep_rows
    )
