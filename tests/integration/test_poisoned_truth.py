"""Poisoned but parseable upstream answers (issue 16): a far-future version cannot freeze an
order, an answer that cannot be true is refused before any write, phantom lines do not outlive
the fix, and ``resync`` writes what it fetched whatever the stored version says."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db import asyncpg_dsn, session_scope
from service.ledger.migrations import alembic_config
from service.ledger.models import OrderStatus, Platform, RefundStatus, SyncSource
from service.ledger.write import OrderTruth, write_order
from service.pandapon.models import LineSnapshot, OrderSnapshot, RefundSnapshot, ShipmentSnapshot
from service.pandapon.sanity import ImplausibleAnswer
from workers.reconcile import Outcome, ReconcileRequest, reconcile_order

ACCOUNT = "acct-poison"
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
FAR = datetime(9999, 12, 31, 23, 59, tzinfo=UTC)


def order(
    modified: datetime | None,
    *,
    status: OrderStatus = OrderStatus.PAID,
    lines: Sequence[str] = ("L1",),
    total: str = "10.00",
) -> OrderSnapshot:
    return OrderSnapshot(
        Platform.TAOBAO,
        "O1",
        status,
        status.value,
        total_amount=Decimal(total),
        modified_at=modified,
        lines=tuple(LineSnapshot(line_id, quantity=1) for line_id in lines),
    )


def refund(modified: datetime | None, status: RefundStatus) -> RefundSnapshot:
    return RefundSnapshot(
        Platform.TAOBAO, "R1", "O1", status, status.value, amount=Decimal("1"), modified_at=modified
    )


@pytest.fixture
def engine(fresh_engine: AsyncEngine) -> AsyncEngine:
    return fresh_engine


@pytest.fixture
def sessions(fresh_sessions: async_sessionmaker[AsyncSession]) -> async_sessionmaker[AsyncSession]:
    return fresh_sessions


async def write(
    sessions: async_sessionmaker[AsyncSession],
    snapshot: OrderSnapshot,
    fetched_at: datetime,
    refunds: Sequence[RefundSnapshot] = (),
    **options: Any,
) -> Any:
    async with session_scope(sessions) as session:
        truth = OrderTruth(snapshot, (), refunds, fetched_at=fetched_at)
        return await write_order(session, ACCOUNT, truth, source=SyncSource.WEBHOOK, **options)


async def query(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_a_far_future_version_is_written_flagged_and_does_not_freeze_the_order(
    sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    poisoned = await write(sessions, order(FAR), T0)
    assert poisoned.anomaly is not None
    assert "9999-12-31" in poisoned.anomaly
    [row] = await query(fresh_database_url, "SELECT * FROM orders")
    assert row["upstream_modified_at"] is None
    assert "9999-12-31" in row["upstream_anomaly"]

    # The next sane truth is not refused as older, and the flag goes.
    later = await write(sessions, order(T0, status=OrderStatus.SHIPPED), T0 + timedelta(minutes=1))
    assert not later.stale
    assert later.status_changed
    [row] = await query(fresh_database_url, "SELECT * FROM orders")
    assert (row["status"], row["upstream_modified_at"], row["upstream_anomaly"]) == (
        "shipped",
        T0,
        None,
    )


async def test_an_order_frozen_before_the_fix_takes_the_next_truth(
    sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    await write(sessions, order(T0), T0)
    await query(fresh_database_url, "UPDATE orders SET upstream_modified_at = '9999-12-31'")
    result = await write(
        sessions, order(T0 + timedelta(minutes=5), status=OrderStatus.SHIPPED), T0 + timedelta(1)
    )
    assert not result.stale
    [row] = await query(fresh_database_url, "SELECT status FROM orders")
    assert row["status"] == "shipped"


async def test_a_far_future_refund_time_does_not_freeze_the_refund(
    sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    await write(sessions, order(T0), T0, [refund(FAR, RefundStatus.REQUESTED)])
    later = T0 + timedelta(minutes=1)
    await write(sessions, order(later), later, [refund(later, RefundStatus.REFUNDED)])
    [row] = await query(fresh_database_url, "SELECT status, upstream_modified_at FROM refunds")
    assert (row["status"], row["upstream_modified_at"]) == ("refunded", later)


async def test_the_migration_repairs_orders_frozen_before_it(fresh_database_url: str) -> None:
    config = alembic_config(fresh_database_url)
    await asyncio.to_thread(command.downgrade, config, "0005")
    await query(
        fresh_database_url,
        "INSERT INTO orders (account_id, platform, order_id, status, raw_status, "
        "upstream_modified_at, snapshot_at) VALUES "
        "('a', 'taobao', 'frozen', 'paid', 'x', '9999-12-31', now()), "
        "('a', 'taobao', 'sane', 'paid', 'x', '2026-11-30', now())",
    )
    await asyncio.to_thread(command.upgrade, config, "head")
    rows = await query(
        fresh_database_url,
        "SELECT order_id, upstream_modified_at, upstream_anomaly FROM orders ORDER BY order_id",
    )
    [frozen, sane] = rows
    assert frozen["upstream_modified_at"] is None
    assert "in the future" in frozen["upstream_anomaly"]
    assert sane["upstream_modified_at"] is not None
    assert sane["upstream_anomaly"] is None


async def test_lines_no_longer_in_the_truth_are_removed(
    sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    phantom = [f"P{i}" for i in range(300)]
    await write(sessions, order(T0, lines=["L1", *phantom]), T0)
    later = T0 + timedelta(minutes=1)
    await write(sessions, order(later, lines=["L1"]), later)
    lines = await query(fresh_database_url, "SELECT line_id FROM order_lines")
    assert [r["line_id"] for r in lines] == ["L1"]
    # An answer that lists no line says nothing about them: they stay.
    latest = later + timedelta(minutes=1)
    await write(sessions, order(latest, lines=[]), latest)
    assert len(await query(fresh_database_url, "SELECT line_id FROM order_lines")) == 1


async def test_force_writes_a_truth_the_version_guard_would_refuse(
    sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    await write(sessions, order(T0 + timedelta(hours=1), status=OrderStatus.SHIPPED), T0)
    refused = await write(sessions, order(T0), T0 + timedelta(minutes=1))
    assert refused.stale
    forced = await write(sessions, order(T0), T0 + timedelta(minutes=2), force=True)
    assert not forced.stale
    [row] = await query(fresh_database_url, "SELECT status FROM orders")
    assert row["status"] == "paid"


class Upstream:
    """The PandaPon boundary: answers one order detail, no parcels, no refunds."""

    def __init__(self, snapshot: OrderSnapshot) -> None:
        self.snapshot = snapshot

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot:
        return self.snapshot

    async def logistics(
        self, platform: Platform, order: OrderSnapshot
    ) -> Sequence[ShipmentSnapshot]:
        return ()

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot:
        raise AssertionError("no refund asked for")


@pytest.mark.parametrize(
    ("poison", "field"),
    [
        (lambda o: replace(o, total_amount=Decimal("-5")), "total_amount"),
        (lambda o: replace(o, lines=tuple(LineSnapshot(f"L{i}") for i in range(10_000))), "lines"),
        (lambda o: replace(o, total_amount=Decimal("1e12")), "total_amount"),
        (lambda o: replace(o, lines=(LineSnapshot("L1", quantity=-3),)), "line L1 quantity"),
        # Longer than its column: refused by name, not by a database error mid-write.
        (lambda o: replace(o, raw_status="WAIT_" * 13), "raw_status"),
    ],
)
async def test_an_answer_that_cannot_be_true_is_refused_before_any_write(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    fresh_database_url: str,
    poison: Any,
    field: str,
) -> None:
    await write(sessions, order(T0), T0)
    request = ReconcileRequest(ACCOUNT, Platform.TAOBAO, "O1", SyncSource.WEBHOOK)
    with pytest.raises(ImplausibleAnswer) as refused:
        await reconcile_order(engine, sessions, Upstream(poison(order(None))), request)
    assert refused.value.field == field
    [row] = await query(fresh_database_url, "SELECT total_amount FROM orders")
    assert row["total_amount"] == Decimal("10.00")
    assert len(await query(fresh_database_url, "SELECT * FROM order_lines")) == 1


async def test_resync_writes_what_it_fetched_whatever_the_stored_version(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    await write(sessions, order(T0 + timedelta(hours=2), status=OrderStatus.SHIPPED), T0)
    upstream = Upstream(order(T0))
    webhook = ReconcileRequest(ACCOUNT, Platform.TAOBAO, "O1", SyncSource.WEBHOOK)
    assert (await reconcile_order(engine, sessions, upstream, webhook)).outcome is Outcome.STALE
    manual = replace(webhook, source=SyncSource.MANUAL)
    assert (await reconcile_order(engine, sessions, upstream, manual)).outcome is Outcome.WRITTEN
    [row] = await query(fresh_database_url, "SELECT status FROM orders")
    assert row["status"] == "paid"
