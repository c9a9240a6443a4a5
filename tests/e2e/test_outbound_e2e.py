"""Outbound webhooks with the real processes: the sandbox drives orders, the worker writes the
ledger (and its change feed), ``pandasync deliver`` sends each change to a receiver that checks
every signature with the official ``standardwebhooks`` package.

On Redis only: outbound delivery reads the change feed in Postgres, not the broker, whose
reconcile messages test_reconcile_e2e runs on both brokers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from service.sandbox.remote import SandboxRemote
from tests.support.ledger_truth import fetch
from tests.support.outbound_receiver import Delivery, Receiver, running_receiver
from tests.support.stack import PANDASYNC, Role, Stack, run_command

pytestmark = pytest.mark.e2e

LINES = [{"title": "保温杯", "quantity": 2, "unit_price": "25.00", "product_id": "p-cup"}]
# Fast retries, so that a receiver failing "for a while" is a few seconds here.
DELIVER_ENV = {
    "PANDASYNC_OUTBOUND_RETRY_SCHEDULE_S": "[0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
    "PANDASYNC_OUTBOUND_POLL_INTERVAL_S": "0.2",
    "PANDASYNC_OUTBOUND_TIMEOUT_S": "4",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


@pytest.fixture
async def stack(
    fresh_database_url: str, clean_redis: str, tmp_path: Path, receiver: Receiver
) -> AsyncIterator[Stack]:
    running = Stack(fresh_database_url, clean_redis, tmp_path)
    try:
        await running.start()
        added = await run_command(running, "endpoints", "add", receiver.url)
        assert added.returncode == 0, added.stderr
        secret = re.search(r"whsec_\S+", added.stdout)
        assert secret is not None, added.stdout
        receiver.secret = secret.group(0)
        yield running
    finally:
        running.stop()
        print(running.logs())


def start_deliver(stack: Stack, name: str = "deliver") -> Role:
    role = stack.add(name, [PANDASYNC, "deliver"], **DELIVER_ENV)
    role.start()
    return role


async def until(check: Callable[[], bool], within_s: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within_s} s\n{stack.logs()}")
        await asyncio.sleep(0.1)


def of_order(deliveries: list[Delivery], order_id: str) -> list[Delivery]:
    return [d for d in deliveries if d.data.get("order_id") == order_id]


def paid(d: Delivery) -> bool:
    return d.type == "order.status_changed" and d.data["to_status"] == "paid"


def shipped(d: Delivery) -> bool:
    return d.type == "order.shipped"


def refunded(d: Delivery) -> bool:
    return d.type == "order.refund_changed" and d.data["to_refund_state"] == "refunded"


async def test_paid_shipped_refunded_arrive_in_order_and_verified(
    stack: Stack, receiver: Receiver
) -> None:
    start_deliver(stack)

    async def arrived(seen: Callable[[Delivery], bool]) -> None:
        # Each step reaches the endpoint before the next one happens upstream.
        await until(
            lambda: any(seen(d) for d in of_order(receiver.accepted(), order)),
            30,
            f"the {seen.__name__} event",
            stack,
        )

    async with SandboxRemote(stack.sandbox_url) as sb:
        order = (await sb.create_order("taobao", LINES))["order_id"]
        await sb.pay("taobao", order)
        await arrived(paid)
        await sb.ship("taobao", order, events=[{"description": "快件已揽收"}])
        await arrived(shipped)
        refund = await sb.open_refund("taobao", order, "50.00", reason="破损")
        await sb.resolve_refund("taobao", refund["refund_id"], "refunded")
        await arrived(refunded)
    events = of_order(receiver.accepted(), order)
    firsts = [
        next(i for i, d in enumerate(events) if seen(d)) for seen in (paid, shipped, refunded)
    ]
    assert firsts == sorted(firsts)
    assert events[firsts[1]].data["tracking_number"]
    assert receiver.refused == []
    ids = [d.msg_id for d in events]
    assert len(ids) == len(set(ids))
    # The feed's order is the delivery order: change ids increase along what arrived.
    change_ids = [int(i.rsplit("_", 1)[1]) for i in ids]
    assert change_ids == sorted(change_ids)
    listed = await run_command(stack, "endpoints", "deliveries", "1")
    assert listed.returncode == 0, listed.stderr
    assert "delivered" in listed.stdout


async def test_a_receiver_failing_for_a_while_gets_everything_once_it_recovers(
    stack: Stack, receiver: Receiver
) -> None:
    receiver.failing = True
    start_deliver(stack)
    async with SandboxRemote(stack.sandbox_url) as sb:
        orders = [(await sb.create_order("taobao", LINES))["order_id"] for _ in range(3)]
        for order in orders:
            await sb.pay("taobao", order)
            await sb.ship("taobao", order, events=[{"description": "快件已揽收"}])
        await sb.drain(within_s=20)
    await until(lambda: len(receiver.received) >= 6, 30, "failed attempts", stack)
    failed = await fetch(
        stack.database_url, "SELECT count(*) AS n FROM outbound_delivery_attempts "
        "WHERE status_code = 500"
    )  # fmt: skip
    assert failed[0]["n"] >= 6
    receiver.failing = False

    async def settled() -> list[dict[str, object]]:
        rows = await fetch(stack.database_url, "SELECT id, state FROM outbound_deliveries")
        return [dict(r) for r in rows]

    deadline = time.monotonic() + 40
    while True:
        rows = await settled()
        if rows and all(r["state"] == "delivered" for r in rows):
            break
        assert time.monotonic() < deadline, (rows, stack.logs())
        await asyncio.sleep(0.2)
    changes = await fetch(stack.database_url, "SELECT count(*) AS n FROM ledger_changes")
    accepted = receiver.accepted()
    assert len(accepted) == changes[0]["n"] == len(rows)  # every change, each once after a 2xx
    assert len({d.msg_id for d in accepted}) == len(accepted)
    for order in orders:
        events = of_order(accepted, order)
        # Paid and shipped before any sync: the ledger saw (and says) it shipped.
        assert any(d.type == "order.status_changed" for d in events)
        assert any(shipped(d) for d in events)
        change_ids = [int(d.msg_id.rsplit("_", 1)[1]) for d in events]
        assert change_ids == sorted(change_ids)  # in order per order, retries included
    await asyncio.sleep(1.5)  # nothing is sent again once answered
    assert len(receiver.accepted()) == len(accepted)


async def test_a_sender_killed_mid_delivery_loses_nothing(stack: Stack, receiver: Receiver) -> None:
    receiver.delay_s = 2.5
    first = start_deliver(stack, "deliver")
    async with SandboxRemote(stack.sandbox_url) as sb:
        order = (await sb.create_order("taobao", LINES))["order_id"]
        await sb.pay("taobao", order)
        await sb.ship("taobao", order, events=[{"description": "快件已揽收"}])
        await sb.drain(within_s=20)
    await until(lambda: receiver.in_flight > 0, 30, "a delivery in flight", stack)
    first.signal_group(signal.SIGKILL)
    assert first.process is not None
    first.process.wait(10)
    receiver.delay_s = 0
    start_deliver(stack, "deliver2")

    deadline = time.monotonic() + 40
    while True:
        rows = await fetch(stack.database_url, "SELECT change_id, state FROM outbound_deliveries")
        changes = await fetch(stack.database_url, "SELECT id FROM ledger_changes")
        if rows and len(rows) == len(changes) and all(r["state"] == "delivered" for r in rows):
            break
        assert time.monotonic() < deadline, ([dict(r) for r in rows], stack.logs())
        await asyncio.sleep(0.2)
    got = {int(d.msg_id.rsplit("_", 1)[1]) for d in receiver.received}
    assert got == {r["id"] for r in changes}  # at least once each
    assert receiver.refused == []
