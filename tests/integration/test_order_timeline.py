"""``pandasync order``: an order's whole story on a real Postgres, oldest first.

The story is written by the ledger's own writers (``write_order``, the failure recorder, the
resolution of a reconcile); the inbox rows, the payment attempt and the dismissal are inserted
as their producers store them. Each step commits on its own, so the ledger's clock moves on
between steps; PandaPon's times (parcel events, refunds) are read from the same clock between
the steps where they belong.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import load_settings
from service.db import make_engine, make_sessionmaker, session_scope
from service.domain import (
    FailureKind,
    InboxState,
    MessageKind,
    OrderStatus,
    PaymentState,
    Platform,
    ReconcileRequest,
    RefundState,
    RefundStatus,
    SignatureState,
    SyncSource,
)
from service.ledger.models import PaymentAttempt, SyncFailure, WebhookInbox
from service.ledger.timeline import (
    EventKind,
    FailureInfo,
    InboxMessage,
    PaymentAttemptInfo,
    PriceChange,
    RefundInfo,
    ShipmentTrace,
    StatusChange,
    Timeline,
    find_orders,
    order_timeline,
    read_consistently,
)
from service.ledger.write import OrderTruth, write_order
from service.pandapon.errors import UpstreamRejected
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)
from tests.support.stack import PANDASYNC
from workers.policy import record_failure

ACCOUNT = "acct-story"
OTHER_ACCOUNT = "acct-other"
PLATFORM = Platform.TAOBAO
ORDER_ID = "3682557363260579405"
# Upstream chose it: a terminal escape must reach the operator's screen as text.
ESCAPE_DESCRIPTION = "到达分拣中心\x1b[2J"
SECRET_IN_BODY = "body-secret-5f2c"
SECRET_IN_HEADERS = "header-secret-91ab"

EXPECTED_KINDS = [
    EventKind.INBOX_MESSAGE,  # the order was placed
    EventKind.STATUS_CHANGE,  # (new) → pending_payment
    EventKind.INBOX_MESSAGE,  # price changed
    EventKind.PRICE_CHANGE,  # 105.00 → 99.50
    EventKind.PAYMENT_ATTEMPT,  # paid
    EventKind.SYNC_FAILURE,  # the first reconcile after paying failed
    EventKind.INBOX_MESSAGE,  # status: paid
    EventKind.STATUS_CHANGE,  # pending_payment → paid
    EventKind.FAILURE_CLOSED,  # that sync resolved the failure
    EventKind.SHIPMENT_EVENT,  # picked up
    EventKind.SHIPMENT_EVENT,  # at the sorting centre
    EventKind.INBOX_MESSAGE,  # status: shipped
    EventKind.STATUS_CHANGE,  # paid → shipped
    EventKind.REFUND,  # requested
    EventKind.REFUND_RESOLVED,  # refunded
    EventKind.INBOX_MESSAGE,  # the refund message, naming only the refund
    EventKind.SHIPMENT,  # a second parcel, with no trace yet at the last sync
    EventKind.SYNC_FAILURE,  # failed again
    EventKind.FAILURE_CLOSED,  # dismissed by a person
    EventKind.SYNC_FAILURE,  # and again: still open
]


@dataclass
class Story:
    inbox_ids: list[int]
    refund_requested_at: datetime
    refund_resolved_at: datetime
    picked_up_at: datetime


@pytest.fixture
async def sessions(fresh_database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    settings = load_settings(database_url=fresh_database_url)
    engine = make_engine(fresh_database_url, settings, application_name="pandasync-test")
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def clock(sessions: async_sessionmaker[AsyncSession]) -> datetime:
    """The database's clock now (the one ``now()`` of the next transaction will read)."""
    await asyncio.sleep(0.005)  # every step at a time of its own
    async with sessions() as session:
        at: datetime = (await session.execute(select(func.clock_timestamp()))).scalar_one()
    await asyncio.sleep(0.005)
    return at


async def message(
    sessions: async_sessionmaker[AsyncSession],
    kind: MessageKind,
    message_type: str,
    *,
    order_id: str | None = ORDER_ID,
    refund_id: str | None = None,
    account_id: str = ACCOUNT,
) -> int:
    """A stored callback, as the receiver stores it (state ``received``)."""
    async with session_scope(sessions) as session:
        inbox_id: int = (
            await session.execute(
                insert(WebhookInbox)
                .values(
                    account_id=account_id,
                    dedupe_key=uuid.uuid4().hex,
                    message_type=message_type,
                    kind=kind,
                    platform=PLATFORM,
                    order_id=order_id,
                    refund_id=refund_id,
                    raw_body=json.dumps({"token": SECRET_IN_BODY}).encode(),
                    headers={"x-forwarded-authorization": SECRET_IN_HEADERS},
                    request_id=f"req-{uuid.uuid4().hex[:8]}",
                    state=InboxState.RECEIVED,
                    signature_state=SignatureState.VALID,
                )
                .returning(WebhookInbox.id)
            )
        ).scalar_one()
    return inbox_id


def snapshot(
    status: OrderStatus, raw: str, total: str, modified: datetime, *, order_id: str = ORDER_ID
) -> OrderSnapshot:
    return OrderSnapshot(
        platform=PLATFORM,
        order_id=order_id,
        status=status,
        raw_status=raw,
        total_amount=Decimal(total),
        product_amount=Decimal(total) - Decimal("5.00"),
        shipping_fee=Decimal("5.00"),
        created_at=modified,
        modified_at=modified,
        lines=(LineSnapshot(line_id="L1", title="cup", quantity=2),),
    )


async def write(
    sessions: async_sessionmaker[AsyncSession],
    order: OrderSnapshot,
    *,
    inbox_id: int | None = None,
    shipments: tuple[ShipmentSnapshot, ...] = (),
    refunds: tuple[RefundSnapshot, ...] = (),
    account_id: str = ACCOUNT,
) -> None:
    """A reconcile's write: the truth, then the resolution of the order's open failure."""
    fetched_at = await clock(sessions)
    truth = OrderTruth(order, shipments=shipments, refunds=refunds, fetched_at=fetched_at)
    async with session_scope(sessions) as session:
        await write_order(
            session,
            account_id,
            truth,
            source=SyncSource.WEBHOOK,
            inbox_id=inbox_id,
            resolve_failures=True,
        )


async def fail(sessions: async_sessionmaker[AsyncSession], text: str) -> None:
    request = ReconcileRequest(ACCOUNT, PLATFORM, ORDER_ID, SyncSource.REFRESH)
    error = UpstreamRejected(
        f"taobao_order_detail: code 1001: {text}",
        endpoint="taobao_order_detail",
        code=1001,
        msg=text,
        request_id="up-req-1",
    )
    async with session_scope(sessions) as session:
        await record_failure(session, request, error, FailureKind.PERMANENT, 1)


async def build_story(sessions: async_sessionmaker[AsyncSession]) -> Story:
    placed = await message(sessions, MessageKind.STATUS, "TAOBAO_ORDER_BUYER_VIEW_ORDER_CREATE")
    t = await clock(sessions)
    await write(
        sessions,
        snapshot(OrderStatus.PENDING_PAYMENT, "WAIT_BUYER_PAY", "105.00", t),
        inbox_id=placed,
    )

    repriced = await message(sessions, MessageKind.PRICE, "TAOBAO_ORDER_PRICE_CHANGE")
    t = await clock(sessions)
    await write(
        sessions,
        snapshot(OrderStatus.PENDING_PAYMENT, "WAIT_BUYER_PAY", "99.50", t),
        inbox_id=repriced,
    )

    async with session_scope(sessions) as session:
        await session.execute(
            insert(PaymentAttempt).values(
                account_id=ACCOUNT,
                platform=PLATFORM,
                order_id=ORDER_ID,
                run_id=str(uuid.uuid4()),
                requested_by="alice",
                state=PaymentState.PAY_BY_HAND,
                amount=Decimal("99.50"),
                pay_url="https://pay.example/p/abc",
                upstream_code="200",
                finished_at=func.clock_timestamp(),
            )
        )
    await fail(sessions, "订单不存在")

    paid = await message(
        sessions, MessageKind.STATUS, "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"
    )
    t = await clock(sessions)
    await write(
        sessions, snapshot(OrderStatus.PAID, "WAIT_SELLER_SEND_GOODS", "99.50", t), inbox_id=paid
    )

    picked_up_at = await clock(sessions)
    sorted_at = await clock(sessions)
    parcels = (
        ShipmentSnapshot(
            tracking_number="YT100",
            carrier="YTO",
            raw_status="TRANSPORT",
            events=(
                ShipmentEventSnapshot("k1", picked_up_at, "ACCEPT", "揽收", "杭州"),
                ShipmentEventSnapshot("k2", sorted_at, "TRANSPORT", ESCAPE_DESCRIPTION),
            ),
        ),
        ShipmentSnapshot(tracking_number="YT200", carrier="YTO"),
    )
    shipped = await message(
        sessions, MessageKind.STATUS, "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"
    )
    t = await clock(sessions)
    await write(
        sessions,
        snapshot(OrderStatus.SHIPPED, "WAIT_BUYER_CONFIRM_GOODS", "99.50", t),
        inbox_id=shipped,
        shipments=parcels,
    )

    requested_at = await clock(sessions)
    resolved_at = await clock(sessions)
    refund_message = await message(
        sessions, MessageKind.REFUND, "TAOBAO_REFUND_CHANGE", order_id=None, refund_id="R1"
    )
    t = await clock(sessions)
    refund = RefundSnapshot(
        platform=PLATFORM,
        refund_id="R1",
        order_id=ORDER_ID,
        status=RefundStatus.REFUNDED,
        raw_status="SUCCESS",
        amount=Decimal("10.00"),
        reason="broken",
        requested_at=requested_at,
        resolved_at=resolved_at,
        modified_at=resolved_at,
    )
    await write(
        sessions,
        snapshot(OrderStatus.SHIPPED, "WAIT_BUYER_CONFIRM_GOODS", "99.50", t),
        shipments=parcels,
        refunds=(refund,),
    )

    await fail(sessions, "系统繁忙")
    async with session_scope(sessions) as session:  # as `pandasync dismiss` closes one
        await session.execute(
            update(SyncFailure)
            .where(SyncFailure.resolved_at.is_(None))
            .values(
                dismissed_at=func.now(),
                resolved_at=func.now(),
                dismissed_by="bob",
                dismissed_reason="PandaPon support ticket 42",
            )
        )
    await fail(sessions, "还在失败")

    # Neighbours that are not this order's story: another order's message, and an order of
    # the same id in another account.
    await message(sessions, MessageKind.STATUS, "TAOBAO_ORDER_CREATE", order_id="999")
    await message(sessions, MessageKind.STATUS, "TAOBAO_ORDER_CREATE", account_id=OTHER_ACCOUNT)
    t = await clock(sessions)
    await write(
        sessions,
        snapshot(OrderStatus.PAID, "WAIT_SELLER_SEND_GOODS", "1.00", t),
        account_id=OTHER_ACCOUNT,
    )
    return Story(
        [placed, repriced, paid, shipped, refund_message], requested_at, resolved_at, picked_up_at
    )


async def read_timeline(
    sessions: async_sessionmaker[AsyncSession], account_id: str | None
) -> list[Timeline]:
    async with sessions() as session:
        await read_consistently(session)
        found = await find_orders(session, PLATFORM, ORDER_ID, account_id)
        return [await order_timeline(session, order) for order in found]


async def test_the_timeline_tells_the_story_in_time_order(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    story = await build_story(sessions)
    (timeline,) = await read_timeline(sessions, ACCOUNT)

    assert [e.kind for e in timeline.events] == EXPECTED_KINDS
    times = [e.at for e in timeline.events]
    assert times == sorted(times)

    order = timeline.order
    assert (order.account_id, order.status, order.raw_status) == (
        ACCOUNT,
        OrderStatus.SHIPPED,
        "WAIT_BUYER_CONFIRM_GOODS",
    )
    assert (order.refund_state, order.refunded_amount) == (RefundState.REFUNDED, Decimal("10.00"))
    assert order.total_amount == Decimal("99.50")

    messages = [e.detail for e in timeline.events if isinstance(e.detail, InboxMessage)]
    assert [m.inbox_id for m in messages] == story.inbox_ids
    # The write marks the messages naming the order; the one naming only the refund is left
    # as stored here (the hand-off, not driven in this test, decides its fate).
    assert [m.state for m in messages] == [InboxState.PROCESSED] * 4 + [InboxState.RECEIVED]
    assert all(m.signature_state is SignatureState.VALID for m in messages)
    assert messages[-1].refund_id == "R1"  # found by its refund: it names no order
    assert {e.source for e in timeline.events if e.kind is EventKind.INBOX_MESSAGE} == {"webhook"}

    changes = [e for e in timeline.events if isinstance(e.detail, StatusChange)]
    assert [
        (c.detail.from_status, c.detail.to_status, c.detail.inbox_id, c.source)
        for c in changes
        if isinstance(c.detail, StatusChange)
    ] == [
        (None, OrderStatus.PENDING_PAYMENT, story.inbox_ids[0], "webhook"),
        (OrderStatus.PENDING_PAYMENT, OrderStatus.PAID, story.inbox_ids[2], "webhook"),
        (OrderStatus.PAID, OrderStatus.SHIPPED, story.inbox_ids[3], "webhook"),
    ]

    (price,) = [e.detail for e in timeline.events if isinstance(e.detail, PriceChange)]
    assert (price.old_total_amount, price.new_total_amount, price.inbox_id) == (
        Decimal("105.00"),
        Decimal("99.50"),
        story.inbox_ids[1],
    )

    traces = [e for e in timeline.events if isinstance(e.detail, ShipmentTrace)]
    picked, sorted_, bare = (t.detail for t in traces if isinstance(t.detail, ShipmentTrace))
    assert (picked.tracking_number, picked.carrier, picked.description, picked.location) == (
        "YT100",
        "YTO",
        "揽收",
        "杭州",
    )
    assert traces[0].at == story.picked_up_at  # PandaPon's time of the trace event
    assert (sorted_.event_status, sorted_.description) == ("TRANSPORT", ESCAPE_DESCRIPTION)
    assert (bare.tracking_number, bare.event_id) == ("YT200", None)
    assert {t.source for t in traces} == {"logistics"}

    refund_events = [e for e in timeline.events if isinstance(e.detail, RefundInfo)]
    assert [(e.kind, e.at) for e in refund_events] == [
        (EventKind.REFUND, story.refund_requested_at),
        (EventKind.REFUND_RESOLVED, story.refund_resolved_at),
    ]
    refund = refund_events[0].detail
    assert isinstance(refund, RefundInfo)
    assert (refund.refund_id, refund.status, refund.amount, refund.reason) == (
        "R1",
        RefundStatus.REFUNDED,
        Decimal("10.00"),
        "broken",
    )

    (attempt,) = [e.detail for e in timeline.events if isinstance(e.detail, PaymentAttemptInfo)]
    assert (attempt.state, attempt.amount, attempt.pay_url, attempt.requested_by) == (
        PaymentState.PAY_BY_HAND,
        Decimal("99.50"),
        "https://pay.example/p/abc",
        "alice",
    )
    assert attempt.finished_at is not None
    assert attempt.finished_at >= attempt.started_at

    failure_events = [e for e in timeline.events if isinstance(e.detail, FailureInfo)]
    assert [(e.kind, e.source) for e in failure_events] == [
        (EventKind.SYNC_FAILURE, "refresh"),
        (EventKind.FAILURE_CLOSED, "reconcile"),
        (EventKind.SYNC_FAILURE, "refresh"),
        (EventKind.FAILURE_CLOSED, "operator"),
        (EventKind.SYNC_FAILURE, "refresh"),
    ]
    dismissed = failure_events[3].detail
    assert isinstance(dismissed, FailureInfo)
    assert (dismissed.dismissed_by, dismissed.dismissed_reason) == (
        "bob",
        "PandaPon support ticket 42",
    )
    assert timeline.open_failure is not None
    assert timeline.open_failure.upstream_msg == "还在失败"
    assert timeline.open_failure == failure_events[-1].detail


async def test_an_order_of_one_id_in_two_accounts_is_found_in_each(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await build_story(sessions)
    both = await read_timeline(sessions, None)
    assert [t.order.account_id for t in both] == sorted([ACCOUNT, OTHER_ACCOUNT])
    other = next(t for t in both if t.order.account_id == OTHER_ACCOUNT)
    # Its own message and its own first status, nothing of the other account's order.
    assert [e.kind for e in other.events] == [EventKind.INBOX_MESSAGE, EventKind.STATUS_CHANGE]
    assert other.open_failure is None
    assert await read_timeline(sessions, "acct-nobody") == []


# --- the command ------------------------------------------------------------------------------


async def pandasync(
    tmp_path: Path, database_url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, *args],
        env={**clean, "PANDASYNC_DATABASE_URL": database_url},
        cwd=tmp_path,  # no .env of the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )


def walk(value: Any) -> list[str]:
    """Every key and string value in a JSON document."""
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in walk(v))]
    if isinstance(value, list):
        return [s for v in value for s in walk(v)]
    return [value] if isinstance(value, str) else []


async def test_the_command_shows_the_story_as_text_and_json(
    tmp_path: Path, fresh_database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await build_story(sessions)
    (timeline,) = await read_timeline(sessions, ACCOUNT)
    args = ("order", "taobao", ORDER_ID, "--account", ACCOUNT)

    text = await pandasync(tmp_path, fresh_database_url, *args)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"taobao {ORDER_ID}  (account {ACCOUNT})"
    header = "\n".join(lines[: lines.index("")])
    assert "status        shipped (WAIT_BUYER_CONFIRM_GOODS); refund refunded, 10.00 CNY" in header
    assert "total 99.50 CNY" in header
    assert "open failure" in header
    assert "还在失败" in header
    events = lines[lines.index("") + 2 :]
    assert lines[lines.index("") + 1] == "events (20, oldest first, times UTC):"
    assert [line.split()[2] for line in events] == [k.value for k in EXPECTED_KINDS]
    assert [line.rsplit("[", 1)[1].rstrip("]") for line in events] == [
        e.source for e in timeline.events
    ]
    assert "pending_payment → paid" in events[7]
    assert "price: total 105.00 → 99.50 CNY" in events[3]
    assert "parcel YT100 (YTO): ACCEPT 揽收 @ 杭州" in events[9]
    assert "payment pay_by_hand: 99.50 CNY by alice" in events[4]
    assert "https://pay.example/p/abc" in events[4]
    assert "refund R1 requested: 10.00 CNY, reason: broken; now refunded (SUCCESS)" in events[13]
    assert "dismissed by bob: PandaPon support ticket 42" in events[18]
    assert "\x1b" not in text.stdout
    assert "到达分拣中心\\x1b[2J" in events[10]
    for secret in (SECRET_IN_BODY, SECRET_IN_HEADERS):
        assert secret not in text.stdout

    raw = await pandasync(tmp_path, fresh_database_url, *args, "--json")
    assert raw.returncode == 0, raw.stderr
    document = json.loads(raw.stdout)
    assert set(document) == {"order", "events"}
    order = document["order"]
    assert (order["status"], order["total_amount"], order["refunded_amount"]) == (
        "shipped",
        "99.50",
        "10.00",
    )
    assert order["open_failure"]["upstream_msg"] == "还在失败"
    assert datetime.fromisoformat(order["last_synced_at"]).utcoffset() == timedelta(0)
    assert [e["kind"] for e in document["events"]] == [k.value for k in EXPECTED_KINDS]
    assert [datetime.fromisoformat(e["at"]) for e in document["events"]] == [
        e.at for e in timeline.events
    ]
    assert {frozenset(e) for e in document["events"]} == {
        frozenset({"at", "kind", "source", "summary", "detail"})
    }
    price = document["events"][3]["detail"]
    assert (price["old_total_amount"], price["new_total_amount"]) == ("105.00", "99.50")
    payment = document["events"][4]["detail"]
    assert (payment["state"], payment["amount"], payment["pay_url"]) == (
        "pay_by_hand",
        "99.50",
        "https://pay.example/p/abc",
    )
    assert document["events"][10]["detail"]["description"] == ESCAPE_DESCRIPTION
    strings = walk(document)
    assert "raw_body" not in strings
    assert "headers" not in strings
    assert not any(SECRET_IN_BODY in s or SECRET_IN_HEADERS in s for s in strings)


async def test_an_unknown_order_is_one_line_and_exit_1(
    tmp_path: Path, fresh_database_url: str
) -> None:
    result = await pandasync(tmp_path, fresh_database_url, "order", "taobao", "123")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "pandasync order: no order taobao 123 in the ledger: try `pandasync resync taobao 123`"
    ]
    named = await pandasync(tmp_path, fresh_database_url, "order", "1688", "12 3", "--account", "X")
    assert named.returncode == 1
    assert named.stderr.splitlines() == [
        "pandasync order: no order 1688 12 3 in the ledger (for account X): "
        "try `pandasync resync 1688 '12 3'`"
    ]


async def test_several_accounts_holding_the_order_ask_for_one(
    tmp_path: Path, fresh_database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    await build_story(sessions)
    result = await pandasync(tmp_path, fresh_database_url, "order", "taobao", ORDER_ID)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"pandasync order: taobao {ORDER_ID} is in the ledger of 2 accounts "
        f"({OTHER_ACCOUNT}, {ACCOUNT}): name one with --account"
    ]
    other = await pandasync(
        tmp_path,
        fresh_database_url,
        "order",
        "taobao",
        ORDER_ID,
        "--account",
        OTHER_ACCOUNT,
        "--json",
    )
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["order"]["account_id"] == OTHER_ACCOUNT
