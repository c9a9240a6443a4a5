"""Unmapped values on Postgres: the reconcile's helper (``service.ledger.unmapped``), the
reconcile that calls it, the message-type CTE of the inbox writer's batch statement, and the
sandbox's control call that makes PandaPon send a status of its own."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from service.app import create_app
from service.db import asyncpg_dsn, make_sessionmaker, session_scope
from service.ledger.models import (
    InboxState,
    MessageKind,
    OrderStatus,
    Platform,
    RefundStatus,
    SyncSource,
    UnmappedField,
)
from service.ledger.unmapped import record_unmapped
from service.ledger.write import OrderTruth, write_order
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot
from service.webhooks.inbox import STORE_BATCH, InboxRow, batch_arguments
from tests.support.servers import SandboxServer
from tests.support.webhook_checks import fetch, sample
from tests.support.webhook_requests import (
    WEBHOOK,
    encode,
    receiver_settings,
    signed,
    taobao_status,
)
from tests.support.webhook_server import serving
from workers.reconcile import Outcome, ReconcileRequest, reconcile_order

pytest_plugins = ["tests.support.sandbox"]

ACCOUNT = "acct-unmapped"
METRIC = "pandasync_unmapped_values_total"
UNMAPPED_ROWS = (
    "SELECT platform, field, value, seen_count, last_order_id, first_seen_at, last_seen_at "
    "FROM unmapped_values ORDER BY field, value"
)


def order(
    order_id: str = "O1",
    *,
    status: OrderStatus = OrderStatus.PAID,
    raw_status: str = "WAIT_SELLER_SEND_GOODS",
) -> OrderSnapshot:
    return OrderSnapshot(Platform.TAOBAO, order_id, status, raw_status)


def refund(raw_status: str, status: RefundStatus = RefundStatus.UNKNOWN) -> RefundSnapshot:
    return RefundSnapshot(
        Platform.TAOBAO, f"R-{uuid.uuid4().hex[:8]}", "O1", status, raw_status, line_id="L1"
    )


def parcel(raw_status: str | None) -> ShipmentSnapshot:
    return ShipmentSnapshot(f"YT{uuid.uuid4().hex[:8]}", raw_status=raw_status)


def truth(
    snapshot: OrderSnapshot,
    shipments: Sequence[ShipmentSnapshot] = (),
    refunds: Sequence[RefundSnapshot] = (),
) -> OrderTruth:
    return OrderTruth(snapshot, shipments, refunds, fetched_at=datetime.now(UTC))


@pytest.fixture
async def engine(fresh_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(fresh_database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def rows(url: str, query: str = UNMAPPED_ROWS) -> list[dict[str, Any]]:
    return [dict(r) for r in await fetch(url, query)]


# --- the helper -------------------------------------------------------------------------------


async def test_nothing_unknown_sends_no_statement(db_session: AsyncSession) -> None:
    known = truth(
        order(),
        shipments=[parcel("SIGN"), parcel(None)],
        refunds=[refund("WAIT_SELLER_AGREE", RefundStatus.REQUESTED)],
    )
    statements: list[str] = []
    conn = (await db_session.connection()).sync_connection
    assert conn is not None

    def seen(*args: Any) -> None:
        statements.append(args[2])

    event.listen(conn, "before_cursor_execute", seen)
    try:
        found = await record_unmapped(db_session, ACCOUNT, known)
        await db_session.execute(text("SELECT 'listening'"))
    finally:
        event.remove(conn, "before_cursor_execute", seen)
    assert not found
    assert statements == ["SELECT 'listening'"]


async def test_unknown_values_are_upserted_with_their_counts(
    engine: AsyncEngine, fresh_database_url: str
) -> None:
    sessions = make_sessionmaker(engine)
    first = truth(
        order("O1", status=OrderStatus.UNKNOWN, raw_status="SOMETHING_NEW"),
        shipments=[parcel("LOST_IN_SPACE"), parcel("LOST_IN_SPACE"), parcel("SIGN")],
        refunds=[refund("WAIT_SOMETHING")],
    )
    async with session_scope(sessions) as session:
        await write_order(session, ACCOUNT, first, source=SyncSource.WEBHOOK)
        found = await record_unmapped(session, ACCOUNT, first)
    assert found == {
        (UnmappedField.ORDER_STATUS, "SOMETHING_NEW"): 1,
        (UnmappedField.PARCEL_STATUS, "LOST_IN_SPACE"): 2,
        (UnmappedField.REFUND_STATUS, "WAIT_SOMETHING"): 1,
    }
    before = await rows(fresh_database_url)
    assert [(r["field"], r["value"], r["seen_count"], r["last_order_id"]) for r in before] == [
        ("order_status", "SOMETHING_NEW", 1, "O1"),
        ("parcel_status", "LOST_IN_SPACE", 2, "O1"),
        ("refund_status", "WAIT_SOMETHING", 1, "O1"),
    ]
    assert all(r["platform"] == "taobao" for r in before)
    assert all(r["first_seen_at"] == r["last_seen_at"] for r in before)

    # A second order in a later transaction: the count grows, first sight stays.
    second = truth(order("O2", status=OrderStatus.UNKNOWN, raw_status="SOMETHING_NEW"))
    async with session_scope(sessions) as session:
        await write_order(session, ACCOUNT, second, source=SyncSource.SWEEP)
        await record_unmapped(session, ACCOUNT, second)
    [after] = [r for r in await rows(fresh_database_url) if r["field"] == "order_status"]
    [was] = [r for r in before if r["field"] == "order_status"]
    assert (after["seen_count"], after["last_order_id"]) == (2, "O2")
    assert after["first_seen_at"] == was["first_seen_at"]
    assert after["last_seen_at"] > was["last_seen_at"]

    # The views: orders holding each value now, and the count per account and platform.
    report = await rows(
        fresh_database_url,
        "SELECT field, value, orders, seen_count FROM report_unmapped_values ORDER BY field",
    )
    assert report == [
        {"field": "order_status", "value": "SOMETHING_NEW", "orders": 2, "seen_count": 2},
        {"field": "parcel_status", "value": "LOST_IN_SPACE", "orders": 1, "seen_count": 2},
        {"field": "refund_status", "value": "WAIT_SOMETHING", "orders": 1, "seen_count": 1},
    ]
    [health] = await rows(
        fresh_database_url,
        "SELECT account_id, platform, unmapped_values, unmapped_last_seen_at "
        "FROM report_sync_health",
    )
    assert (health["account_id"], health["platform"], health["unmapped_values"]) == (
        ACCOUNT,
        "taobao",
        3,
    )
    assert health["unmapped_last_seen_at"] == after["last_seen_at"]


async def test_values_are_cleaned_of_nul_and_cut_to_128_characters(
    db_session: AsyncSession,
) -> None:
    long = "L" * 128
    odd = truth(
        order(status=OrderStatus.UNKNOWN, raw_status="NEW\x00STATUS"),
        refunds=[
            refund(long + "A"),
            refund(long + "B"),  # the same value once cut: one row, seen twice
            refund("A\x00B"),
            refund("AB"),
        ],
    )
    found = await record_unmapped(db_session, ACCOUNT, odd)
    assert found == {
        (UnmappedField.ORDER_STATUS, "NEWSTATUS"): 1,
        (UnmappedField.REFUND_STATUS, long): 2,
        (UnmappedField.REFUND_STATUS, "AB"): 2,
    }
    stored = (
        await db_session.execute(
            text("SELECT field, value, seen_count FROM unmapped_values ORDER BY 1, 2")
        )
    ).all()
    assert [tuple(r) for r in stored] == [
        ("order_status", "NEWSTATUS", 1),
        ("refund_status", "AB", 2),
        ("refund_status", long, 2),
    ]


# --- the reconcile ----------------------------------------------------------------------------


@dataclass
class Upstream:
    """PandaPon answering one order detail, no parcels, no refunds."""

    snapshot: OrderSnapshot

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot:
        return replace(self.snapshot, order_id=order_id)

    async def logistics(
        self, platform: Platform, order: OrderSnapshot
    ) -> Sequence[ShipmentSnapshot]:
        return ()

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot:
        raise AssertionError("no refund to fetch")


async def reconcile(engine: AsyncEngine, snapshot: OrderSnapshot, order_id: str) -> Outcome:
    request = ReconcileRequest(ACCOUNT, Platform.TAOBAO, order_id, SyncSource.WEBHOOK)
    result = await reconcile_order(engine, make_sessionmaker(engine), Upstream(snapshot), request)
    return result.outcome


async def test_a_reconcile_records_and_counts_an_unknown_status_with_the_order(
    engine: AsyncEngine, fresh_database_url: str
) -> None:
    labels = {"platform": "taobao", "field": "order_status"}
    before = sample(METRIC, **labels)
    unknown = order(status=OrderStatus.UNKNOWN, raw_status="SOMETHING_NEW")
    assert await reconcile(engine, unknown, "O-new") is Outcome.WRITTEN
    assert sample(METRIC, **labels) == before + 1
    [row] = await rows(fresh_database_url)
    assert (row["field"], row["value"], row["last_order_id"]) == (
        "order_status",
        "SOMETHING_NEW",
        "O-new",
    )
    [stored] = await rows(fresh_database_url, "SELECT status, raw_status FROM orders")
    assert stored == {"status": "unknown", "raw_status": "SOMETHING_NEW"}

    # A known status: nothing recorded, nothing counted.
    assert await reconcile(engine, order(), "O-known") is Outcome.WRITTEN
    assert sample(METRIC, **labels) == before + 1
    assert len(await rows(fresh_database_url)) == 1


# --- message types: the inbox writer's CTE -----------------------------------------------------


def inbox_row(message_type: str, *, unknown: bool = True, **changes: Any) -> InboxRow:
    base = InboxRow(
        account_id=ACCOUNT,
        dedupe_key=uuid.uuid4().hex,
        message_type=message_type,
        kind=MessageKind.STATUS,
        platform=Platform.TAOBAO,
        order_id=uuid.uuid4().hex[:16],
        refund_id=None,
        pushed_at=None,
        raw_body=b"{}",
        headers_json=json.dumps({}),
        request_id=None,
        state=InboxState.RECEIVED,
        nonce=uuid.uuid4().hex,
        unknown_type=unknown,
    )
    return replace(base, **changes)


async def store_batch(url: str, batch: list[InboxRow]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(STORE_BATCH, *batch_arguments(batch))
    finally:
        await conn.close()


async def test_unknown_types_of_newly_stored_messages_are_recorded_once_each(
    fresh_database_url: str,
) -> None:
    odd, other = "TAOBAO_ORDER_SOMETHING_ODD", "ACCOUNT_NOTICE"
    first_odd = inbox_row(odd)
    later_odd = inbox_row(odd)
    platformless = inbox_row(other, platform=None, order_id="N1", state=InboxState.IGNORED)
    known = inbox_row("TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE", unknown=False)
    await store_batch(fresh_database_url, [first_odd, later_odd, platformless, known])
    recorded = await rows(fresh_database_url)
    assert [
        (r["platform"], r["field"], r["value"], r["seen_count"], r["last_order_id"])
        for r in recorded
    ] == [
        (None, "message_type", other, 1, "N1"),
        ("taobao", "message_type", odd, 2, later_odd.order_id),
    ]

    # A duplicate (same message, new nonce) and a replayed nonce store nothing and count
    # nothing; a new message of a type seen without a platform counts on the same row, which
    # keeps the last order named.
    duplicate = replace(first_odd, nonce=uuid.uuid4().hex)
    replayed = inbox_row(odd, nonce=known.nonce)
    again = inbox_row(other, platform=None, order_id=None, state=InboxState.IGNORED)
    returned = await store_batch(fresh_database_url, [duplicate, replayed, again])
    assert sorted((r["fresh"], r["id"] is not None) for r in returned) == [
        (False, False),
        (True, False),
        (True, True),
    ]
    counts = {
        (r["platform"], r["value"]): (r["seen_count"], r["last_order_id"])
        for r in await rows(fresh_database_url)
    }
    assert counts == {(None, other): (2, "N1"), ("taobao", odd): (2, later_odd.order_id)}


async def test_the_receiver_records_and_counts_an_unknown_type_once(
    fresh_database_url: str,
) -> None:
    labels = {"platform": "taobao", "field": "message_type"}
    before = sample(METRIC, **labels)
    unknown = {"messageType": "TAOBAO_ORDER_SOMETHING_NEW", "messageBody": {"salesOrderId": "5"}}
    app = create_app(receiver_settings(fresh_database_url))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for body in (unknown, unknown, taobao_status()):  # the second is a duplicate
            answer = await client.post(WEBHOOK, content=encode(body), headers=signed())
            assert answer.status_code == 200
    recorded = await rows(fresh_database_url)
    assert [(r["value"], r["seen_count"], r["last_order_id"]) for r in recorded] == [
        ("TAOBAO_ORDER_SOMETHING_NEW", 1, "5")
    ]
    assert sample(METRIC, **labels) == before + 1


# --- the sandbox's control call -----------------------------------------------------------------


@pytest.mark.parametrize("payload_case", ["camel", "snake"])
async def test_the_sandbox_renders_a_raw_status_of_its_own_until_cleared(
    sandbox_server: SandboxServer, payload_case: str
) -> None:
    remote = sandbox_server.remote
    await remote.set_upstream(payload_case=payload_case)
    order_id = (await remote.create_order("taobao"))["order_id"]
    await remote.pay("taobao", order_id)
    settings = sandbox_server.service_settings()
    async with make_http_client(settings) as http:
        client = PandaPonClient(settings, http)
        truth = await remote.set_raw_status("taobao", order_id, "SOMETHING_NEW")
        odd = await client.order_detail(Platform.TAOBAO, order_id)
        await remote.set_raw_status("taobao", order_id, None)
        back = await client.order_detail(Platform.TAOBAO, order_id)
    assert truth["status"] == "paid"  # the world keeps its own terms
    assert (odd.status, odd.raw_status) == (OrderStatus.UNKNOWN, "SOMETHING_NEW")
    assert back.status is OrderStatus.PAID
    assert odd.modified_at is not None
    assert back.modified_at is not None
    assert back.modified_at > odd.modified_at  # each is a change
