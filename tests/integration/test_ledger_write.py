"""The reconcile write: idempotent, order-independent, history only for real changes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.ledger.models import (
    Order,
    OrderLine,
    OrderPriceChange,
    OrderStatus,
    OrderStatusHistory,
    Platform,
    Refund,
    RefundState,
    RefundStatus,
    ShipmentEvent,
    SyncSource,
)
from service.ledger.write import OrderTruth, refund_state_of, write_order
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
ACCOUNT = "acct-1"


def order(
    status: OrderStatus = OrderStatus.PAID,
    raw: str = "WAIT_SELLER_SEND_GOODS",
    total: str = "105.00",
    modified: datetime = T0,
) -> OrderSnapshot:
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id="3682557363260579405",
        status=status,
        raw_status=raw,
        total_amount=Decimal(total),
        product_amount=Decimal(total) - Decimal("5.00"),
        shipping_fee=Decimal("5.00"),
        created_at=T0 - timedelta(hours=1),
        modified_at=modified,
        paid_at=T0 - timedelta(minutes=55),
        lines=(
            LineSnapshot(
                line_id="L1",
                product_id="P1",
                title="cup",
                quantity=2,
                amount=Decimal(total) - Decimal("5.00"),
            ),
        ),
    )


def event(minutes: int, text_: str) -> ShipmentEventSnapshot:
    return ShipmentEventSnapshot(
        event_key=f"k-{minutes}-{text_}",
        event_at=T0 + timedelta(minutes=minutes),
        status="TRANSPORT",
        description=text_,
    )


def parcel(*events: ShipmentEventSnapshot, delivered: bool = False) -> ShipmentSnapshot:
    return ShipmentSnapshot(
        tracking_number="YT100", carrier="YTO", events=events, delivered=delivered, line_id="L1"
    )


async def count(session: AsyncSession, model: type) -> int:
    return int((await session.execute(select(func.count()).select_from(model))).scalar_one())


async def stored(session: AsyncSession) -> Order:
    session.expire_all()
    return (await session.execute(select(Order))).scalar_one()


async def test_first_write_creates_order_lines_and_one_history_row(
    db_session: AsyncSession,
) -> None:
    result = await write_order(
        db_session, ACCOUNT, OrderTruth(order(), fetched_at=T0), source=SyncSource.WEBHOOK
    )
    assert result.created
    assert result.status_changed
    assert not result.price_changed
    row = await stored(db_session)
    assert (row.status, row.raw_status, row.total_amount) == (
        OrderStatus.PAID,
        "WAIT_SELLER_SEND_GOODS",
        Decimal("105.00"),
    )
    assert row.account_id == ACCOUNT
    assert await count(db_session, OrderLine) == 1
    history = (await db_session.execute(select(OrderStatusHistory))).scalar_one()
    assert (history.from_status, history.to_status, history.source) == (
        None,
        OrderStatus.PAID,
        SyncSource.WEBHOOK,
    )
    assert await count(db_session, OrderPriceChange) == 0


async def test_replaying_the_same_truth_writes_no_history(db_session: AsyncSession) -> None:
    truth = OrderTruth(order(), shipments=[parcel(event(1, "picked up"))], fetched_at=T0)
    await write_order(db_session, ACCOUNT, truth, source=SyncSource.WEBHOOK)
    for i in range(3):
        again = dataclasses.replace(truth, fetched_at=T0 + timedelta(seconds=i + 1))
        result = await write_order(db_session, ACCOUNT, again, source=SyncSource.SWEEP)
        assert not result.status_changed
        assert not result.price_changed
        assert result.new_events == 0
    assert await count(db_session, OrderStatusHistory) == 1
    assert await count(db_session, OrderPriceChange) == 0
    assert await count(db_session, ShipmentEvent) == 1


async def test_status_and_price_changes_append_history(db_session: AsyncSession) -> None:
    await write_order(
        db_session, ACCOUNT, OrderTruth(order(), fetched_at=T0), source=SyncSource.WEBHOOK
    )
    repriced = order(total="99.50", modified=T0 + timedelta(minutes=5))
    result = await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(repriced, fetched_at=T0 + timedelta(minutes=6)),
        source=SyncSource.WEBHOOK,
    )
    assert result.price_changed
    assert not result.status_changed
    change = (await db_session.execute(select(OrderPriceChange))).scalar_one()
    assert (change.old_total_amount, change.new_total_amount) == (
        Decimal("105.00"),
        Decimal("99.50"),
    )
    shipped = order(
        OrderStatus.SHIPPED,
        "WAIT_BUYER_CONFIRM_GOODS",
        "99.50",
        modified=T0 + timedelta(minutes=10),
    )
    await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(
            shipped, shipments=[parcel(event(9, "out"))], fetched_at=T0 + timedelta(minutes=11)
        ),
        source=SyncSource.SWEEP,
    )
    rows = (
        await db_session.execute(
            select(OrderStatusHistory.from_status, OrderStatusHistory.to_status).order_by(
                OrderStatusHistory.id
            )
        )
    ).all()
    assert [tuple(r) for r in rows] == [
        (None, OrderStatus.PAID),
        (OrderStatus.PAID, OrderStatus.SHIPPED),
    ]
    row = await stored(db_session)
    assert row.shipped_at == T0 + timedelta(minutes=9)


async def test_an_older_snapshot_never_overwrites_a_newer_one(db_session: AsyncSession) -> None:
    newer = order(OrderStatus.SHIPPED, "WAIT_BUYER_CONFIRM_GOODS", modified=T0 + timedelta(hours=1))
    await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(newer, fetched_at=T0 + timedelta(hours=1)),
        source=SyncSource.WEBHOOK,
    )
    # Fetched earlier but written later (a slow worker), and fetched later but older upstream.
    for truth in (
        OrderTruth(order(), fetched_at=T0),
        OrderTruth(order(modified=T0), fetched_at=T0 + timedelta(hours=2)),
    ):
        result = await write_order(db_session, ACCOUNT, truth, source=SyncSource.WEBHOOK)
        assert result.stale
    row = await stored(db_session)
    assert row.status == OrderStatus.SHIPPED
    assert await count(db_session, OrderStatusHistory) == 1


async def test_events_accumulate_and_delivery_is_recorded(db_session: AsyncSession) -> None:
    first = OrderTruth(
        order(OrderStatus.SHIPPED, "WAIT_BUYER_CONFIRM_GOODS"),
        shipments=[parcel(event(1, "a"), event(2, "b"))],
        fetched_at=T0,
    )
    await write_order(db_session, ACCOUNT, first, source=SyncSource.WEBHOOK)
    later = OrderTruth(
        order(OrderStatus.SHIPPED, "WAIT_BUYER_CONFIRM_GOODS", modified=T0 + timedelta(hours=2)),
        shipments=[parcel(event(1, "a"), event(2, "b"), event(90, "signed"), delivered=True)],
        fetched_at=T0 + timedelta(hours=2),
    )
    result = await write_order(db_session, ACCOUNT, later, source=SyncSource.REFRESH)
    assert result.new_events == 1
    assert await count(db_session, ShipmentEvent) == 3
    row = await stored(db_session)
    assert row.delivered_at == T0 + timedelta(minutes=90)


def refund(status: RefundStatus, raw: str, modified: datetime) -> RefundSnapshot:
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id="RF1",
        order_id="3682557363260579405",
        status=status,
        raw_status=raw,
        amount=Decimal("20.00"),
        requested_at=T0,
        modified_at=modified,
        resolved_at=modified if status == RefundStatus.REFUNDED else None,
    )


async def test_refunds_drive_the_order_refund_state(db_session: AsyncSession) -> None:
    opened = refund(RefundStatus.REQUESTED, "WAIT_SELLER_AGREE", T0)
    await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(order(), refunds=[opened], fetched_at=T0),
        source=SyncSource.WEBHOOK,
    )
    assert (await stored(db_session)).refund_state == RefundState.REQUESTED
    done = refund(RefundStatus.REFUNDED, "SUCCESS", T0 + timedelta(hours=3))
    await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(order(), refunds=[done], fetched_at=T0 + timedelta(hours=3)),
        source=SyncSource.WEBHOOK,
    )
    row = await stored(db_session)
    assert (row.refund_state, row.refunded_amount) == (RefundState.REFUNDED, Decimal("20.00"))
    # A late read of the opened record does not reopen it.
    await write_order(
        db_session,
        ACCOUNT,
        OrderTruth(order(), refunds=[opened], fetched_at=T0 + timedelta(hours=4)),
        source=SyncSource.WEBHOOK,
    )
    db_session.expire_all()
    assert (await db_session.execute(select(Refund.status))).scalar_one() == RefundStatus.REFUNDED
    assert (await stored(db_session)).refund_state == RefundState.REFUNDED


async def test_inbox_rows_received_before_the_fetch_are_marked_processed(
    db_session: AsyncSession,
) -> None:
    insert = text(
        "INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, platform, "
        "order_id, raw_body, headers, state, received_at) VALUES (:a, :k, 'X', 'status', "
        "'taobao', '3682557363260579405', '\\x7b7d', '{}'::jsonb, 'queued', :at)"
    )
    await db_session.execute(insert, {"a": ACCOUNT, "k": "before", "at": T0 - timedelta(seconds=1)})
    await db_session.execute(insert, {"a": ACCOUNT, "k": "after", "at": T0 + timedelta(seconds=1)})
    result = await write_order(
        db_session, ACCOUNT, OrderTruth(order(), fetched_at=T0), source=SyncSource.WEBHOOK
    )
    assert result.inbox_processed == 1
    states = dict(
        (await db_session.execute(text("SELECT dedupe_key, state FROM webhook_inbox"))).all()
    )
    assert states == {"before": "processed", "after": "queued"}


def test_refund_state_precedence() -> None:
    assert refund_state_of([]) == RefundState.NONE
    assert refund_state_of([RefundStatus.CANCELLED]) == RefundState.NONE
    assert refund_state_of([RefundStatus.REJECTED, RefundStatus.REFUNDED]) == RefundState.REFUNDED
    assert refund_state_of([RefundStatus.REFUNDED, RefundStatus.REQUESTED]) == RefundState.REQUESTED
