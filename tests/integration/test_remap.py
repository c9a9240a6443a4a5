"""``pandasync remap``: the ledger derived again from its stored payloads, no upstream call.

The ledger is filled as a reconcile fills it: sandbox orders rendered as PandaPon answers
(both spellings), over the wire, through the client's mapping, into ``write_order``. What an
older mapping would have left behind (unknown statuses, missing amounts, undelivered parcels) is
then written into the normalized columns by hand, and remap must put the truth back.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db import session_scope
from service.ledger.models import Platform, SyncSource
from service.ledger.write import OrderTruth, write_order
from service.sandbox import render, scenario
from service.sandbox.world import World, WorldOrder
from tests.support import reconciled
from workers.remap import remap

ACCOUNT = "acct-remap"
SNAPSHOT_AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
# Every table remap may write, in a stable order, with every column.
TABLES = {
    "orders": "id",
    "order_lines": "id",
    "order_status_history": "id",
    "order_price_changes": "id",
    "shipments": "id",
    "shipment_events": "id",
    "refunds": "id",
    "webhook_inbox": "id",
}


def truth_of(order: WorldOrder, case: render.PayloadCase) -> OrderTruth:
    return reconciled.truth_of(order, case, fetched_at=SNAPSHOT_AT)


@pytest.fixture
def engine(fresh_engine: AsyncEngine) -> AsyncEngine:
    return fresh_engine


@pytest.fixture
def sessions(fresh_sessions: async_sessionmaker[AsyncSession]) -> async_sessionmaker[AsyncSession]:
    return fresh_sessions


async def fill(
    sessions: async_sessionmaker[AsyncSession], case: render.PayloadCase, orders: int = 40
) -> list[WorldOrder]:
    world = World(seed=11, clock=lambda: datetime(2026, 11, 28, 8, 0, tzinfo=UTC))
    made = scenario.generate(world, random.Random(11), orders=orders, steps=6)
    async with session_scope(sessions) as session:
        for order in made:
            await write_order(session, ACCOUNT, truth_of(order, case), source=SyncSource.SWEEP)
    return made


async def dump(sessions: async_sessionmaker[AsyncSession]) -> dict[str, list[dict[str, Any]]]:
    async with session_scope(sessions) as session:
        return {
            table: [
                dict(row)
                for row in (await session.execute(text(f"SELECT * FROM {table} ORDER BY {key}")))
                .mappings()
                .all()
            ]
            for table, key in TABLES.items()
        }


async def execute(sessions: async_sessionmaker[AsyncSession], statement: str) -> int:
    async with session_scope(sessions) as session:
        result = await session.execute(text(statement))
        return int(getattr(result, "rowcount", 0) or 0)


@pytest.mark.parametrize("case", ["camel", "snake"])
async def test_remap_of_a_ledger_the_mapping_wrote_changes_nothing(
    sessions: async_sessionmaker[AsyncSession], case: render.PayloadCase
) -> None:
    await fill(sessions, case)
    before = await dump(sessions)
    progress = await remap(sessions, batch_size=7)
    assert progress.examined == len(before["orders"])
    assert (progress.changed, progress.newer, progress.unreadable) == (0, 0, 0)
    assert progress.rewritten == 0  # every order already held what the mapping derives
    assert await dump(sessions) == before  # last_synced_at included: nothing was synced


async def test_remap_puts_back_what_an_older_mapping_got_wrong(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    made = await fill(sessions, "camel")
    truth = await dump(sessions)
    # As an older mapping would have stored them: statuses it could not place, amounts it did
    # not find, parcels it did not see delivered, refunds it could not read.
    async with session_scope(sessions) as session:
        touched = (
            await session.execute(
                text(
                    "SELECT count(*) FROM orders o WHERE status IN ('paid', 'shipped') "
                    "OR refund_state <> 'none' OR delivered_at IS NOT NULL "
                    "OR EXISTS (SELECT FROM shipments s WHERE s.order_pk = o.id "
                    "           AND s.delivered_at IS NOT NULL) "
                    "OR EXISTS (SELECT FROM refunds r WHERE r.order_pk = o.id)"
                )
            )
        ).scalar_one()
    spoiled = await execute(
        sessions,
        "UPDATE orders SET status = 'unknown', total_amount = NULL "
        "WHERE status IN ('paid', 'shipped')",
    )
    await execute(sessions, "UPDATE shipments SET delivered_at = NULL")
    await execute(sessions, "UPDATE refunds SET status = 'unknown', amount = NULL")
    await execute(sessions, "UPDATE orders SET refund_state = 'none', delivered_at = NULL")
    assert spoiled > 0

    progress = await remap(sessions, batch_size=9)
    assert progress.examined == len(made)
    assert progress.rewritten == touched  # and only those: the others are not written
    assert progress.status_changed == spoiled
    assert progress.price_changed == spoiled  # the totals came back
    after = await dump(sessions)
    for table in ("orders", "order_lines", "shipments", "shipment_events", "refunds"):
        assert after[table] == truth[table], table
    remapped = [h for h in after["order_status_history"] if h["source"] == "remap"]
    assert len(remapped) == spoiled
    assert {h["from_status"] for h in remapped} == {"unknown"}
    assert all(h["to_status"] in ("paid", "shipped") for h in remapped)

    # A second run finds the ledger as the mapping makes it: nothing to change, no history.
    again = await remap(sessions)
    assert (again.changed, again.newer, again.unreadable, again.rewritten) == (0, 0, 0, 0)
    assert await dump(sessions) == after


async def test_a_line_or_an_event_key_the_ledger_lacks_gets_the_order_written_again(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await fill(sessions, "camel")
    truth = await dump(sessions)
    assert truth["shipment_events"], "the scenario made no parcel events"
    event = truth["shipment_events"][0]
    line = truth["order_lines"][-1]
    # As an older mapping keyed it: the current key is not stored.
    await execute(
        sessions, f"UPDATE shipment_events SET event_key = 'old' WHERE id = {event['id']}"
    )
    await execute(sessions, f"UPDATE order_lines SET title = 'old' WHERE id = {line['id']}")

    progress = await remap(sessions)
    assert progress.rewritten == len({line["order_pk"], *[
        s["order_pk"] for s in truth["shipments"] if s["id"] == event["shipment_id"]
    ]})  # fmt: skip
    after = await dump(sessions)
    assert after["order_lines"] == truth["order_lines"]

    def events(rows: dict[str, list[dict[str, Any]]]) -> set[tuple[int, str]]:
        return {(e["shipment_id"], e["event_key"]) for e in rows["shipment_events"]}

    # The event under its current key is back beside the old one (events are never deleted).
    assert events(after) == events(truth) | {(event["shipment_id"], "old")}


async def test_a_payload_the_mapping_cannot_read_is_left_and_reported(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    made = await fill(sessions, "camel", orders=5)
    victim = made[2]
    await execute(
        sessions,
        'UPDATE orders SET raw = \'{"nothing": "useful"}\'::jsonb '
        f"WHERE order_id = '{victim.order_id}'",
    )
    before = await dump(sessions)
    progress = await remap(sessions)
    assert progress.unreadable == 1
    [item] = progress.unreadable_orders
    assert (item.platform, item.order_id) == (victim.platform, victim.order_id)
    assert await dump(sessions) == before


async def test_remap_of_one_platform_leaves_the_other(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await fill(sessions, "camel")
    await execute(sessions, "UPDATE orders SET status = 'unknown'")
    progress = await remap(sessions, platform=Platform.ALIBABA_1688)
    rows = await dump(sessions)
    by_platform = {
        platform: [o["status"] for o in rows["orders"] if o["platform"] == platform]
        for platform in ("taobao", "1688")
    }
    assert set(by_platform["taobao"]) == {"unknown"}
    assert "unknown" not in by_platform["1688"]
    assert progress.examined == len(by_platform["1688"])


async def test_an_order_synced_after_its_payload_was_read_keeps_the_newer_truth(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # A worker wrote a newer snapshot between remap's read and its write: the write's version
    # guard must keep the newer one (remap counts it as synced meanwhile).
    made = await fill(sessions, "camel", orders=3)
    order = made[0]
    old = truth_of(order, "camel")
    newer = OrderTruth(
        old.order, old.shipments, old.refunds, fetched_at=SNAPSHOT_AT.replace(hour=13)
    )
    async with session_scope(sessions) as session:
        await write_order(session, ACCOUNT, newer, source=SyncSource.WEBHOOK)
        await session.execute(text("UPDATE orders SET status = 'unknown' WHERE order_id = :id"),
                              {"id": order.order_id})  # fmt: skip
    async with session_scope(sessions) as session:
        result = await write_order(session, ACCOUNT, old, source=SyncSource.REMAP, rederived=True)
    assert result.stale
    rows = await dump(sessions)
    [stored] = [o for o in rows["orders"] if o["order_id"] == order.order_id]
    assert stored["status"] == "unknown"  # untouched by the older re-derived truth


async def test_statuses_the_mapping_now_places_leave_unmapped_values(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await fill(sessions, "camel", orders=3)
    await execute(
        sessions,
        "INSERT INTO unmapped_values (account_id, platform, field, value) VALUES "
        "('acct-remap', 'taobao', 'order_status', 'WAIT_BUYER_P'), "  # placed by now
        "('acct-remap', 'taobao', 'order_status', 'SOMETHING_NEW'), "  # still unknown
        "('acct-remap', '1688', 'refund_status', 'waitbuyermodify'), "  # placed by now
        "('acct-remap', 'taobao', 'parcel_status', 'SIGNED'), "  # placed by now
        "('acct-remap', NULL, 'message_type', 'ORDER_SOMETHING_NEW')",  # messages: kept
    )
    progress = await remap(sessions)
    assert progress.placed == 3
    async with session_scope(sessions) as session:
        left = (
            await session.execute(text("SELECT field, value FROM unmapped_values ORDER BY value"))
        ).all()
    assert [tuple(r) for r in left] == [
        ("message_type", "ORDER_SOMETHING_NEW"),
        ("order_status", "SOMETHING_NEW"),
    ]
