"""The sandbox's generated orders (``pandasync dev --demo``, soaks, benchmarks) live plausible
lives: paid, shipped, delivered and completed in that order, hours and days apart, so the
report views show fulfilment times as a real account's would, and never a negative one.

The orders go into the ledger as a reconcile writes them (rendered as PandaPon answers, both
spellings, through the client's mapping) and are read back through ``report_fulfilment``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from statistics import median

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.domain import Platform
from service.ledger.models import SyncSource
from service.ledger.write import write_order
from service.sandbox import render, scenario
from service.sandbox.world import NewLine, World
from tests.support import reconciled

ACCOUNT = "acct-demo-times"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


async def fill(
    sessions: async_sessionmaker[AsyncSession], world: World, case: render.PayloadCase
) -> None:
    async with session_scope(sessions) as session:
        for order in world.orders():
            truth = reconciled.truth_of(order, case, fetched_at=world.now())
            await write_order(session, ACCOUNT, truth, source=SyncSource.SWEEP)


async def fulfilment(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, object]]:
    async with sessions() as session:
        rows = await session.execute(
            text(
                "SELECT platform::text AS platform, order_id, paid_at, shipped_at, delivered_at, "
                "completed_at, time_to_ship, time_in_transit, time_to_deliver "
                "FROM report_fulfilment WHERE account_id = :a"
            ),
            {"a": ACCOUNT},
        )
        return [dict(row) for row in rows.mappings()]


@pytest.mark.parametrize("case", ["camel", "snake"])
async def test_demo_orders_have_fulfilment_times_in_order_and_apart(
    fresh_sessions: async_sessionmaker[AsyncSession], case: render.PayloadCase
) -> None:
    # The clock stands still, as when the demo makes an order and its steps in one request.
    world = World(seed=5, clock=lambda: NOW)
    rng = random.Random(5)
    scenario.generate(world, rng, orders=80, steps=8)
    scenario.advance(world, rng, changes=40)
    await fill(fresh_sessions, world, case)

    rows = await fulfilment(fresh_sessions)
    shipped = [r for r in rows if r["time_to_ship"] is not None]
    delivered = [r for r in rows if r["time_to_deliver"] is not None]
    assert {r["platform"] for r in shipped} == {p.value for p in Platform}
    assert len(delivered) >= 10, rows
    zero = timedelta(0)
    for row in rows:
        for column in ("time_to_ship", "time_in_transit", "time_to_deliver"):
            value = row[column]
            assert value is None or value >= zero, row
        times = [row[c] for c in ("paid_at", "shipped_at", "delivered_at", "completed_at")]
        known = [t for t in times if t is not None]
        assert known == sorted(known), row
        # Never in the future (a frozen clock stamps changes a second apart past it).
        assert all(t <= NOW + timedelta(minutes=1) for t in known), row
    # Realistic: hours to ship and days to deliver, not the seconds of one request.
    assert median(r["time_to_ship"] for r in shipped) >= timedelta(hours=3)
    assert median(r["time_to_deliver"] for r in delivered) >= timedelta(days=1)


async def test_a_same_second_life_never_goes_back_in_time(
    fresh_sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The control API's steps, made as fast as a script makes them: all in one second."""
    world = World(seed=1, clock=lambda: NOW)
    for platform in Platform:
        order = world.create_order(platform, [NewLine("杯子", 1, Decimal("9.90"))])
        world.pay(order)
        world.ship(order)
        world.deliver(order)
        world.confirm(order)
    await fill(fresh_sessions, world, "camel")

    rows = await fulfilment(fresh_sessions)
    assert len(rows) == 2
    for row in rows:
        assert row["time_to_ship"] >= timedelta(0), row
        assert row["time_in_transit"] >= timedelta(0), row
        assert row["time_to_deliver"] >= timedelta(0), row
