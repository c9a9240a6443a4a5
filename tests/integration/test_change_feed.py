"""The change feed: a ``ledger_changes`` row per real change, in the write's own transaction,
announced by NOTIFY on commit; replays, unchanged syncs and remaps add none."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import asyncpg_dsn, session_scope
from service.ledger import payments
from service.ledger.changes import CHANNEL
from service.ledger.models import (
    OrderStatus,
    PaymentState,
    Platform,
    RefundStatus,
    SyncSource,
)
from service.ledger.write import OrderTruth, write_order
from service.pandapon.models import (
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)
from service.sandbox import scenario
from service.sandbox.world import World
from tests.support import reconciled
from workers.remap import remap

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
ACCOUNT = "acct-feed"
ORDER = "5550001"


def snap(
    status: OrderStatus = OrderStatus.PAID, total: str = "105.00", minutes: int = 0
) -> OrderSnapshot:
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=ORDER,
        status=status,
        raw_status=status.value.upper(),
        total_amount=Decimal(total),
        product_amount=Decimal(total) - Decimal("5.00"),
        shipping_fee=Decimal("5.00"),
        created_at=T0 - timedelta(hours=1),
        modified_at=T0 + timedelta(minutes=minutes),
    )


def truth(
    order: OrderSnapshot,
    minutes: int = 0,
    shipments: tuple[ShipmentSnapshot, ...] = (),
    refunds: tuple[RefundSnapshot, ...] = (),
) -> OrderTruth:
    return OrderTruth(
        order, shipments, refunds, fetched_at=T0 + timedelta(minutes=minutes, seconds=5)
    )


def parcel(delivered: bool = False) -> ShipmentSnapshot:
    events = (ShipmentEventSnapshot(event_key="e1", event_at=T0, description="picked up"),)
    if delivered:
        events += (
            ShipmentEventSnapshot(
                event_key="e2", event_at=T0 + timedelta(hours=30), description="signed"
            ),
        )
    return ShipmentSnapshot(
        tracking_number="YT42", carrier="YTO", events=events, delivered=delivered
    )


def refund(status: RefundStatus, minutes: int) -> RefundSnapshot:
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id="R1",
        order_id=ORDER,
        status=status,
        raw_status=status.value.upper(),
        amount=Decimal("100.00"),
        modified_at=T0 + timedelta(minutes=minutes),
    )


async def feed(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(
        text("SELECT id, kind, order_id, order_pk, payload FROM ledger_changes ORDER BY id")
    )
    return [dict(row) for row in rows.mappings().all()]


async def write(session: AsyncSession, t: OrderTruth, **options: Any) -> None:
    await write_order(session, ACCOUNT, t, source=SyncSource.WEBHOOK, **options)


async def test_each_real_change_adds_one_row_and_a_replay_adds_none(
    db_session: AsyncSession,
) -> None:
    first = truth(snap(OrderStatus.PAID))
    await write(db_session, first)
    rows = await feed(db_session)
    assert [r["kind"] for r in rows] == ["order.status_changed"]
    assert rows[0]["payload"]["to_status"] == "paid"
    assert rows[0]["payload"]["from_status"] is None
    assert rows[0]["payload"]["order_id"] == ORDER

    await write(db_session, first)  # a replay of the same truth
    await write(db_session, truth(snap(OrderStatus.PAID), minutes=1))  # unchanged, newer
    await write(db_session, first, force=True)  # a resync of what is stored
    assert len(await feed(db_session)) == 1

    await write(db_session, truth(snap(OrderStatus.PAID, total="99.00", minutes=2), minutes=2))
    shipped = snap(OrderStatus.SHIPPED, total="99.00", minutes=3)
    await write(db_session, truth(shipped, 3, shipments=(parcel(),)))
    await write(db_session, truth(shipped, 4, shipments=(parcel(),)))  # the same parcel
    await write(db_session, truth(shipped, 5, shipments=(parcel(delivered=True),)))
    await write(
        db_session,
        truth(
            shipped, 6, shipments=(parcel(delivered=True),),
            refunds=(refund(RefundStatus.REQUESTED, 6),),
        ),
    )  # fmt: skip
    await write(
        db_session,
        truth(
            shipped, 7, shipments=(parcel(delivered=True),),
            refunds=(refund(RefundStatus.REFUNDED, 7),),
        ),
    )  # fmt: skip
    rows = await feed(db_session)
    assert [r["kind"] for r in rows] == [
        "order.status_changed",
        "order.price_changed",
        "order.status_changed",
        "order.shipped",
        "order.delivered",
        "order.refund_changed",
        "order.refund_changed",
    ]
    price = rows[1]["payload"]
    assert (price["old_total_amount"], price["new_total_amount"]) == ("105.00", "99.00")
    assert rows[3]["payload"]["tracking_number"] == "YT42"
    assert rows[3]["payload"]["carrier"] == "YTO"
    assert rows[4]["payload"]["delivered_at"] is not None
    assert rows[5]["payload"]["to_refund_state"] == "requested"
    assert rows[6]["payload"]["from_refund_state"] == "requested"
    assert rows[6]["payload"]["to_refund_state"] == "refunded"
    assert rows[6]["payload"]["refunded_amount"] == "100.00"
    assert {r["order_pk"] for r in rows} == {rows[0]["order_pk"]}

    # A stale truth (fetched before what is stored) changes nothing and says nothing.
    await write(db_session, truth(snap(OrderStatus.PAID), minutes=0))
    assert len(await feed(db_session)) == 7


async def test_a_payment_outcome_is_a_change(db_session: AsyncSession) -> None:
    await write(db_session, truth(snap(OrderStatus.PENDING_PAYMENT)))
    attempt = await payments.start_attempt(
        db_session,
        account_id=ACCOUNT,
        platform=Platform.TAOBAO,
        order_id=ORDER,
        run_id="run-1",
        requested_by="tester",
        amount=Decimal("105.00"),
        currency="CNY",
    )
    assert attempt is not None
    assert [r["kind"] for r in await feed(db_session)] == ["order.status_changed"]
    assert await payments.finish_attempt(db_session, attempt, PaymentState.PAID)
    assert not await payments.finish_attempt(db_session, attempt, PaymentState.FAILED)
    rows = await feed(db_session)
    assert [r["kind"] for r in rows] == ["order.status_changed", "payment.outcome"]
    assert rows[1]["payload"]["state"] == "paid"
    assert rows[1]["payload"]["attempt_id"] == attempt
    assert rows[1]["order_pk"] == rows[0]["order_pk"]


async def test_a_rolled_back_write_leaves_no_change_and_sends_no_notify(
    fresh_database_url: str, fresh_sessions: async_sessionmaker[AsyncSession]
) -> None:
    listener = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[3]))
    try:
        async with fresh_sessions() as session, session.begin():
            await write(session, truth(snap(OrderStatus.PAID)))
            assert len(await feed(session)) == 1  # inside the transaction
            await session.rollback()
        async with fresh_sessions() as session:
            assert await feed(session) == []
        await asyncio.sleep(0.3)
        assert heard.empty()

        async with session_scope(fresh_sessions) as session:
            await write(session, truth(snap(OrderStatus.PAID)))
            await asyncio.sleep(0.3)
            assert heard.empty()  # not before the commit
        payload = await asyncio.wait_for(heard.get(), 5)
        async with fresh_sessions() as session:
            rows = await feed(session)
        assert [str(r["id"]) for r in rows] == [payload]
    finally:
        await listener.close()


async def test_a_remap_of_an_unchanged_ledger_adds_no_change(
    fresh_sessions: async_sessionmaker[AsyncSession],
) -> None:
    world = World(seed=5, clock=lambda: datetime(2026, 11, 28, 8, 0, tzinfo=UTC))
    made = scenario.generate(world, random.Random(5), orders=15, steps=6)
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    async with session_scope(fresh_sessions) as session:
        for order in made:
            t = reconciled.truth_of(order, "camel", fetched_at=at)
            await write_order(session, ACCOUNT, t, source=SyncSource.SWEEP)
            # the same truth again, re-derived: nothing changed
            await write_order(
                session,
                ACCOUNT,
                dataclasses.replace(t, fetched_at=at),
                source=SyncSource.REMAP,
                rederived=True,
            )
    async with fresh_sessions() as session:
        before = await feed(session)
    assert len(before) >= len(made)  # each order's first status at least
    await remap(fresh_sessions)
    async with fresh_sessions() as session:
        assert await feed(session) == before


async def test_the_horizon_keeps_a_slow_transaction_s_row(
    fresh_sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A row with a smaller id committed after a larger one is still read by a consumer that
    keeps the horizon (docs/reporting.md), though it would be skipped by ``id > last``."""
    from service.ledger.changes import settled_horizon

    slow = fresh_sessions()
    await slow.begin()
    await write(slow, truth(snap(OrderStatus.PAID)))  # takes the smaller id, not committed
    other = dataclasses.replace(snap(OrderStatus.PAID), order_id="5550002")
    async with session_scope(fresh_sessions) as session:
        await write(session, truth(other))

    async def consume(horizon: int) -> tuple[int, list[int]]:
        async with fresh_sessions() as session:
            conn = await session.connection()
            await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            new_horizon = await settled_horizon(conn)
            ids = (
                await conn.execute(
                    text(
                        "SELECT id FROM ledger_changes WHERE tx_id >= :h "
                        "AND tx_id < :new ORDER BY id"
                    ),
                    {"h": horizon, "new": new_horizon},
                )
            ).scalars()
            return new_horizon, list(ids)

    horizon, seen = await consume(0)
    assert seen == []  # the committed row is not settled while the slow one runs
    await slow.commit()
    await slow.close()
    async with fresh_sessions() as session:
        everything = [r["id"] for r in await feed(session)]
    assert len(everything) == 2
    # The horizon is the server's: other databases' transactions may hold it back a while.
    deadline = asyncio.get_running_loop().time() + 60
    while sorted(seen) != everything:
        assert asyncio.get_running_loop().time() < deadline, (seen, everything)
        await asyncio.sleep(0.2)
        horizon, more = await consume(horizon)
        seen += more
    assert len(seen) == len(set(seen))  # each row read once
