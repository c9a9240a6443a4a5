"""Lost and late callbacks: one sweep of the scheduler brings the ledger back to the truth, on
Redis and on RabbitMQ (the scheduler sends the sweep's reconciles through the broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from service.db import asyncpg_dsn
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_USER_ID
from tests.support.ledger_truth import ledger_mismatches, wait_for_ledger
from tests.support.stack import Stack, run_command

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(fresh_database_url: str, broker_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(
        fresh_database_url,
        broker_url,
        tmp_path,
        # A sweep every few seconds; the relay never re-sends (so only the sweep can repair).
        settings={"PANDASYNC_SWEEP_INTERVAL_S": "4", "PANDASYNC_REQUEUE_AFTER_S": "3600"},
    )
    try:
        await running.start(scheduler=True)
        yield running
    finally:
        running.stop()
        print(running.logs())


async def test_dropped_and_late_callbacks_are_repaired_by_the_sweep(stack: Stack) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        await sb.configure_delivery(
            drop=0.05,
            delay=0.03,
            delay_s=3.0,
            duplicate=0.2,
            reorder=0.2,
            max_retries=2,
            retry_interval_s=0.2,
        )
        await sb.scenario(orders=60, steps=5, seed=5)
        await sb.drain(within_s=30)
        # Orders whose every message is lost: only the sweep can bring them into the ledger.
        await sb.configure_delivery(drop=1.0)
        for platform in ("taobao", "1688"):
            lost = await sb.create_order(platform)
            await sb.pay(platform, lost["order_id"])
        await sb.drain(within_s=30)
        callbacks = await sb.callbacks()
        truths = await sb.orders()
    assert callbacks["states"].get("dropped", 0) > 0, callbacks["states"]

    # Wait for a sweep that started after the last change, then for its reconciles.
    await wait_for_ledger(stack.database_url, DEV_USER_ID, truths, within_s=90)
    assert await ledger_mismatches(stack.database_url, DEV_USER_ID, truths) == []
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        repaired = await conn.fetchval(
            "SELECT count(*) FROM order_status_history WHERE source = 'sweep'"
        )
    finally:
        await conn.close()
    assert repaired >= 2  # at least the orders whose every callback was lost
    status = await run_command(stack, "status")
    assert status.returncode == 0, status.stderr
    assert "last sweep taobao" in status.stdout
    assert "last sweep 1688" in status.stdout
    assert "open failures:        0" in status.stdout
