"""From messages to the true ledger, with the real processes.

``pandasync sandbox``, ``pandasync serve`` and ``pandasync worker`` run as subprocesses over real
sockets, on Redis and on RabbitMQ (``broker_url``); the sandbox drives orders through their lives
and sends its callbacks to the web role; the ledger is then compared with the sandbox's truth
through SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.broker import make_broker, queue_depth
from service.config import load_settings
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_USER_ID
from tests.support.ledger_truth import fetch, ledger_mismatches, wait_for_ledger
from tests.support.stack import (
    PANDASYNC,
    Stack,
    burst_detail_fetches,
    deliver_signed,
    run_command,
)

pytestmark = pytest.mark.e2e

LINES = [
    {"title": "保温杯", "quantity": 2, "unit_price": "25.00", "product_id": "p-cup"},
    {"title": "杯垫", "quantity": 3, "unit_price": "4.00", "product_id": "p-mat"},
]


@pytest.fixture
async def stack(
    fresh_database_url: str, broker_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    options: dict[str, Any] = getattr(request, "param", {})
    running = Stack(
        fresh_database_url,
        broker_url,
        tmp_path,
        settings=options.get("settings", {}),
        sandbox_settings=options.get("sandbox", {}),
    )
    try:
        await running.start(scheduler=options.get("scheduler", False))
        yield running
    finally:
        running.stop()
        print(running.logs())  # shown by pytest when the test failed


async def live_an_order_through_every_kind_of_message(sb: SandboxRemote, platform: str) -> None:
    """Price change, payment, shipping with a trace, delivery, confirmation, refunds, cancel."""
    full = await sb.create_order(platform, LINES, shipping_fee="8")
    oid = full["order_id"]
    await sb.change_price(platform, oid, total_amount="60.00")
    await sb.pay(platform, oid)
    tracking = await sb.ship(
        platform, oid, events=[{"description": "快件已揽收", "status": "ACCEPT"}]
    )
    await sb.add_event(platform, oid, tracking, "快件已发往 广州中心", status="TRANSPORT")
    await sb.deliver(platform, oid, tracking)
    await sb.confirm(platform, oid)
    refund = await sb.open_refund(platform, oid, "10.00", reason="少件")
    await sb.resolve_refund(platform, refund["refund_id"], "refunded")

    cancelled = await sb.create_order(platform, LINES[:1])
    await sb.pay(platform, cancelled["order_id"])
    await sb.cancel(platform, cancelled["order_id"], reason="不想要了")

    rejected = await sb.create_order(platform, LINES[1:])
    await sb.pay(platform, rejected["order_id"])
    refund = await sb.open_refund(platform, rejected["order_id"], "5.00")
    await sb.resolve_refund(platform, refund["refund_id"], "rejected")

    open_refund = await sb.create_order(platform, LINES)
    await sb.pay(platform, open_refund["order_id"])
    await sb.open_refund(platform, open_refund["order_id"], "12.00")

    await sb.create_order(platform, LINES[:1])  # awaiting payment


STYLES = {
    "platform": {"callback_style": "platform"},
    "platform-string-body": {"callback_style": "platform", "body_as_string": True},
    "flat": {"callback_style": "flat"},
}


# The contract's camelCase payloads, and the snake_case ones the public evidence shows
# (docs/upstream.md#evidence: Taobao Global's names, WAIT_BUYER_P, integer refund statuses, epoch
# times, the nested refund record, SIGNED parcels, 1688's 500_2 for an order not shipped yet),
# in every callback style, on Redis. Case and style are the receiver's and the mapping's business,
# not the broker's: RabbitMQ runs one of them (the same messages through the other broker).
@pytest.mark.parametrize(
    ("payload_case", "style", "broker_url"),
    [
        *((case, STYLES[name], "redis") for case in ("camel", "snake") for name in STYLES),
        ("camel", STYLES["platform"], "rabbitmq"),
    ],
    ids=[
        *(f"{case}-{name}-redis" for case in ("camel", "snake") for name in STYLES),
        "camel-platform-rabbitmq",
    ],
    indirect=["broker_url"],
)
async def test_every_message_kind_leaves_the_ledger_equal_to_the_truth(
    stack: Stack, style: dict[str, Any], payload_case: str
) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        assert (await sb.set_upstream(payload_case=payload_case))["payload_case"] == payload_case
        await sb.configure_delivery(**style)
        for platform in ("taobao", "1688"):
            await live_an_order_through_every_kind_of_message(sb, platform)
        drained = await sb.drain(within_s=30)
        assert drained["drained"], drained
        truths = await sb.orders()
        callbacks = await sb.callbacks()
        assert callbacks["states"] == {"delivered": len(callbacks["records"])}
        assert len(truths) == 10
        await wait_for_ledger(stack.database_url, DEV_USER_ID, truths)
        outcomes = await sb.outcomes()
    if payload_case == "snake":
        # 1688 orders not shipped yet were answered error 500_2: no parcels, not a failure.
        assert outcomes["alibaba_logistics"].get("not_shipped", 0) > 0, outcomes
    assert await fetch(stack.database_url, "SELECT * FROM sync_failures") == []

    kinds = {r["kind"] for r in await fetch(stack.database_url, "SELECT kind FROM webhook_inbox")}
    assert kinds == {"price", "status", "refund"}
    unprocessed = await fetch(
        stack.database_url, "SELECT id, state FROM webhook_inbox WHERE state <> 'processed'"
    )
    assert unprocessed == []
    prices = await fetch(
        stack.database_url,
        "SELECT o.platform, c.old_total_amount, c.new_total_amount FROM order_price_changes c "
        "JOIN orders o ON o.id = c.order_pk",
    )
    # A price change is only history when the ledger saw the order before it; every row
    # that exists must be a real change.
    assert all(p["old_total_amount"] != p["new_total_amount"] for p in prices)


async def settle_queue(stack: Stack) -> None:
    """Wait out the relay's grace, then until no reconcile is waiting in the broker."""
    await asyncio.sleep(3)
    broker = make_broker(load_settings(broker_url=stack.redis_url))
    try:
        for _ in range(100):
            if await asyncio.to_thread(queue_depth, broker) == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # the message a worker may hold
    finally:
        broker.close()


async def test_duplicated_and_reversed_delivery_gives_the_truth_and_no_extra_history(
    stack: Stack,
) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        # Let the sandbox write the scenario's messages without sending them: we deliver
        # them ourselves, newest first, every one twice.
        await sb.configure_delivery(drop=1.0)
        await sb.scenario(orders=8, steps=6, seed=11)
        records = (await sb.callbacks(with_body=True, limit=10_000))["records"]
        truths = await sb.orders()
    messages = [r["message"] for r in records]
    assert len(messages) >= 16
    async with httpx.AsyncClient(timeout=5) as http:
        for message in reversed(messages):
            for _ in range(2):
                await deliver_signed(http, stack.webhook_url, message)
    await wait_for_ledger(stack.database_url, DEV_USER_ID, truths)

    # Every reconcile happened after the last change: one status row per order, no price rows.
    history = await fetch(
        stack.database_url, "SELECT order_pk, count(*) AS n FROM order_status_history GROUP BY 1"
    )
    assert sorted(h["n"] for h in history) == [1] * len(truths)
    assert await fetch(stack.database_url, "SELECT * FROM order_price_changes") == []
    distinct = {json.dumps(m, sort_keys=True) for m in messages}
    stored = await fetch(stack.database_url, "SELECT count(*) AS n FROM webhook_inbox")
    assert stored[0]["n"] == len(distinct)

    # Delivering everything yet again changes nothing.
    async with httpx.AsyncClient(timeout=5) as http:
        for message in messages:
            await deliver_signed(http, stack.webhook_url, message)
    await asyncio.sleep(2)
    assert await ledger_mismatches(stack.database_url, DEV_USER_ID, truths) == []
    again = await fetch(stack.database_url, "SELECT count(*) AS n FROM order_status_history")
    assert again[0]["n"] == len(truths)


async def test_a_burst_for_one_order_costs_at_most_two_detail_fetches(stack: Stack) -> None:
    fetches = await burst_detail_fetches(stack, LINES)
    assert 1 <= fetches <= 2, fetches


@pytest.mark.parametrize(
    "stack",
    [{"settings": {"PANDASYNC_REQUEUE_AFTER_S": "3"}}],
    indirect=True,
)
async def test_a_worker_killed_mid_reconcile_still_converges(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        await sb.set_faults({"taobao_order_detail": {"latency_s": 3.0}})
        order = await sb.create_order("taobao", LINES)
        await sb.pay("taobao", order["order_id"])
        await sb.drain()

        async def detail_calls() -> int:
            return (await sb.calls()).get("taobao_order_detail", 0)

        for _ in range(100):  # the worker is now waiting on the slow detail fetch
            if await detail_calls() >= 1:
                break
            await asyncio.sleep(0.1)
        assert await detail_calls() >= 1
        stack.roles["worker0"].kill()
        await sb.clear_faults()
        stack.add("worker1", [PANDASYNC, "worker", "--processes", "1", "--threads", "2"]).start()
        truth = await sb.order("taobao", order["order_id"])
    await wait_for_ledger(stack.database_url, DEV_USER_ID, [truth], within_s=60)
    history = await fetch(stack.database_url, "SELECT * FROM order_status_history")
    assert len(history) == 1


@pytest.mark.parametrize(
    "stack",
    [
        {
            "sandbox": {
                "PANDASYNC_SANDBOX_FAULTS": json.dumps(
                    {
                        "*": {"server_error": 0.3, "rate_limit": 0.1, "retry_after_s": 1},
                        "taobao_logistics": {"timeout": 0.2, "timeout_s": 5},
                    }
                )
            },
            "settings": {"PANDASYNC_HTTP_READ_TIMEOUT_S": "1"},
        }
    ],
    indirect=True,
)
async def test_upstream_faults_delay_convergence_but_never_prevent_it(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        for platform in ("taobao", "1688"):
            await live_an_order_through_every_kind_of_message(sb, platform)
        await sb.drain(within_s=30)
        truths = await sb.orders()
        await wait_for_ledger(stack.database_url, DEV_USER_ID, truths, within_s=120)
        outcomes = await sb.outcomes()
    faults = sum(o.get("server_error", 0) + o.get("rate_limited", 0) for o in outcomes.values())
    assert faults > 0, outcomes  # the faults really happened
    failures = await fetch(
        stack.database_url, "SELECT * FROM sync_failures WHERE resolved_at IS NULL"
    )
    assert failures == []


async def test_a_permanent_error_is_recorded_and_replay_clears_it(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        await sb.configure_delivery(drop=1.0)
        template = await sb.create_order("1688", LINES)
        message = (await sb.callbacks(with_body=True))["records"][-1]["message"]
        ghost_id = "9" + template["order_id"][1:]
        body = message["messageBody"]
        body["baseInfo"]["idOfStr"] = ghost_id
        body["baseInfo"]["id"] = int(ghost_id)
        async with httpx.AsyncClient(timeout=5) as http:
            await deliver_signed(http, stack.webhook_url, message)

        async def open_failures() -> list[asyncpg.Record]:
            return await fetch(
                stack.database_url,
                "SELECT * FROM sync_failures WHERE order_id = $1 AND resolved_at IS NULL",
                ghost_id,
            )

        for _ in range(150):
            if await open_failures():
                break
            await asyncio.sleep(0.1)
        [failure] = await open_failures()
        assert failure["kind"] == "permanent"
        assert failure["upstream_code"] == "404"
        assert failure["endpoint"] == "alibaba_order_detail"
        # Let any second hand-off of the message (relay) run and fail too before the order
        # appears upstream, so only the replay can fix it.
        await settle_queue(stack)

        # The order appears upstream; the operator replays.
        await sb.create_order("1688", LINES, order_id=ghost_id)
        replay = await run_command(stack, "replay")
        assert replay.returncode == 0, replay.stderr
        assert "queued 1 failed order" in replay.stdout
        truth = await sb.order("1688", ghost_id)
    await wait_for_ledger(stack.database_url, DEV_USER_ID, [truth])
    assert await open_failures() == []
    [replayed] = await fetch(
        stack.database_url, "SELECT * FROM sync_failures WHERE order_id = $1", ghost_id
    )
    assert replayed["replay_count"] == 1
    assert replayed["resolved_at"] is not None


# ``resync`` reconciles in its own process, through no broker: one broker is enough.
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
async def test_resync_reconciles_one_order_on_demand(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        await sb.configure_delivery(drop=1.0)
        order = await sb.create_order("taobao", LINES)
        await sb.pay("taobao", order["order_id"])
        truth = await sb.order("taobao", order["order_id"])
    result = await run_command(stack, "resync", "taobao", order["order_id"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"taobao {order['order_id']}: written"
    assert await ledger_mismatches(stack.database_url, DEV_USER_ID, [truth]) == []
    [row] = await fetch(stack.database_url, "SELECT source FROM order_status_history")
    assert row["source"] == "manual"


def test_worker_role_stops_cleanly_on_sigterm(
    fresh_database_url: str, broker_url: str, tmp_path: Path
) -> None:
    stack = Stack(fresh_database_url, broker_url, tmp_path)
    worker = stack.add("worker", [PANDASYNC, "worker", "--processes", "1", "--threads", "1"])
    worker.start()
    assert worker.process is not None
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(3)  # booted, and still running
    assert worker.running, worker.tail()
    worker.process.send_signal(signal.SIGTERM)
    try:
        assert worker.process.wait(30) == 0, worker.tail()
    finally:
        worker.kill()
