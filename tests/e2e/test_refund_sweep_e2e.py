"""A refund whose messages are lost, and that a later refund on its line hides from the order
detail, is brought into the ledger by the scheduler's refund sweep.

On Redis only: the scheduler sends the refund sweep's reconciles the way test_sweep_e2e's, which
runs on both brokers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_USER_ID
from tests.support.ledger_truth import fetch, ledger_mismatches, wait_for_ledger
from tests.support.stack import Stack, run_command

pytestmark = pytest.mark.e2e

LINES = [
    {"title": "保温杯", "quantity": 1, "unit_price": "80"},
    {"title": "杯套", "quantity": 2, "unit_price": "10"},
]


@pytest.fixture
async def stack(fresh_database_url: str, clean_redis: str, tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(
        fresh_database_url,
        clean_redis,
        tmp_path,
        settings={
            # A refund sweep every few seconds. The order sweep runs once at start, before the
            # refunds exist, and the relay never re-sends: only the refund sweep can repair.
            "PANDASYNC_REFUND_SWEEP_INTERVAL_S": "3",
            "PANDASYNC_SWEEP_INTERVAL_S": "3600",
            "PANDASYNC_REQUEUE_AFTER_S": "3600",
        },
    )
    try:
        await running.start(scheduler=True)
        yield running
    finally:
        running.stop()
        print(running.logs())


async def hidden_refund(sb: SandboxRemote, platform: str) -> tuple[str, str, str]:
    """(order id, R1, R2): the order's messages arrive; then R1 is opened on a line and
    refunded, R2 opened on the same line, and none of their messages arrive. The order detail
    now names R2 only."""
    await sb.configure_delivery(drop=0.0)
    order = await sb.create_order(platform, LINES, shipping_fee="5")
    order_id, line_id = order["order_id"], order["lines"][0]["line_id"]
    await sb.pay(platform, order_id)
    await sb.drain(within_s=30)
    await sb.configure_delivery(drop=1.0)
    first = await sb.open_refund(platform, order_id, "30", line_id=line_id)
    await sb.resolve_refund(platform, first["refund_id"], "refunded")
    second = await sb.open_refund(platform, order_id, "20", line_id=line_id)
    await sb.drain(within_s=30)
    return order_id, first["refund_id"], second["refund_id"]


async def test_a_refund_hidden_by_a_later_one_on_its_line_is_recovered(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        hidden = {p: await hidden_refund(sb, p) for p in ("taobao", "1688")}
        truths = await sb.orders()
        callbacks = await sb.callbacks()
    assert callbacks["states"].get("dropped", 0) >= 6, callbacks["states"]
    for platform, (order_id, r1, r2) in hidden.items():
        truth = next(t for t in truths if t["order_id"] == order_id)
        assert truth["refunds"][0]["refund_id"] == r1
        # The line's latest refund is R2: no reconcile of the order alone would find R1.
        assert [r["refund_id"] for r in truth["refunds"]] == [r1, r2], platform

    await wait_for_ledger(stack.database_url, DEV_USER_ID, truths, within_s=90)
    assert await ledger_mismatches(stack.database_url, DEV_USER_ID, truths) == []
    for platform, (order_id, r1, _) in hidden.items():
        (row,) = await fetch(
            stack.database_url,
            "SELECT r.status, r.amount, r.raw_status FROM refunds r "
            "JOIN orders o ON o.id = r.order_pk WHERE r.refund_id = $1 AND o.order_id = $2",
            r1,
            order_id,
        )
        assert (row["status"], str(row["amount"])) == ("refunded", "30.00"), platform
    swept = await fetch(
        stack.database_url,
        "SELECT platform, last_drift, last_finished_at FROM refund_sweep_cursors "
        "WHERE account_id = $1 ORDER BY platform",
        DEV_USER_ID,
    )
    assert {r["platform"] for r in swept} == {"taobao", "1688"}
    assert all(r["last_finished_at"] <= datetime.now(UTC) for r in swept)

    status = await run_command(stack, "status")
    assert status.returncode == 0, status.stderr
    assert "last sweep taobao" in status.stdout
    assert "last refund sweep taobao" in status.stdout
    assert "last refund sweep 1688" in status.stdout
