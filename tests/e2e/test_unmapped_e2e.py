"""Unmapped values in plain sight, with the real processes: a status PandaPon starts sending
that the mapping does not know shows in ``pandasync status`` and in ``report_sync_health``
within one reconcile, and so does a message type the receiver does not know.

On Redis only: the broker carries the same reconcile messages as in test_reconcile_e2e,
which runs on both brokers; what is checked here happens after the broker.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.db import asyncpg_dsn
from service.pandapon.signer import Credentials, signed_headers
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID
from tests.support.ledger_truth import wait_for_ledger
from tests.support.stack import Stack, run_command

pytestmark = pytest.mark.e2e

PLATFORM = "taobao"
NEW_STATUS = "WAIT_BUYER_SOMETHING_NEW"
NEW_TYPE = "TAOBAO_ORDER_BUYER_VIEW_ORDER_SOMETHING_ODD"


@pytest.fixture
async def stack(fresh_database_url: str, clean_redis: str, tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(fresh_database_url, clean_redis, tmp_path)
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        print(running.logs())  # shown by pytest when the test failed


async def query(stack: Stack, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def status_output(stack: Stack) -> str:
    done = await run_command(stack, "status")
    assert done.returncode == 0, done.stderr
    return done.stdout


async def wait_for_raw_status(stack: Stack, order_id: str, raw: str, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while True:
        rows = await query(stack, "SELECT raw_status FROM orders WHERE order_id = $1", order_id)
        if rows and rows[0]["raw_status"] == raw:
            return
        assert time.monotonic() < deadline, f"order {order_id} never reached {raw}: {rows}"
        await asyncio.sleep(0.2)


def counted(exposition: str, **labels: str) -> float:
    """``pandasync_unmapped_values_total`` with ``labels`` in a /metrics answer."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "pandasync_unmapped_values_total" and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no pandasync_unmapped_values_total{labels}")


def unmapped_line(output: str, value: str) -> list[str]:
    """The cells of the status line that lists ``value``."""
    [line] = [line for line in output.splitlines() if value in line]
    return re.split(r"\s{2,}", line.strip())


async def test_an_unknown_status_shows_in_status_and_sync_health_within_one_reconcile(
    stack: Stack,
) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        order = await sb.create_order(PLATFORM)
        order_id = order["order_id"]
        await sb.pay(PLATFORM, order_id)
        assert (await sb.drain(within_s=30))["drained"]
        await wait_for_ledger(stack.database_url, DEV_USER_ID, [await sb.order(PLATFORM, order_id)])
        assert "unmapped values: none" in await status_output(stack)

        # PandaPon moves the order to a status of its own: one callback, one reconcile.
        await sb.set_raw_status(PLATFORM, order_id, NEW_STATUS)
        assert (await sb.drain(within_s=30))["drained"]
    await wait_for_raw_status(stack, order_id, NEW_STATUS)

    # Written by the transaction that wrote the order: there as soon as the order is.
    [held] = await query(stack, "SELECT status FROM orders WHERE order_id = $1", order_id)
    assert held["status"] == "unknown"
    [value] = await query(stack, "SELECT * FROM report_unmapped_values")
    assert dict(value) | {"first_seen_at": None, "last_seen_at": None} == {
        "account_id": DEV_USER_ID,
        "platform": PLATFORM,
        "field": "order_status",
        "value": NEW_STATUS,
        "first_seen_at": None,
        "last_seen_at": None,
        "seen_count": 1,
        "last_order_id": order_id,
        "orders": 1,
    }
    [health] = await query(
        stack,
        "SELECT unmapped_values, unmapped_last_seen_at FROM report_sync_health "
        "WHERE account_id = $1 AND platform = $2",
        DEV_USER_ID,
        PLATFORM,
    )
    assert health["unmapped_values"] == 1
    assert health["unmapped_last_seen_at"] == value["last_seen_at"]
    output = await status_output(stack)
    assert "unmapped values: 1" in output
    cells = unmapped_line(output, NEW_STATUS)
    assert cells[:5] == [NEW_STATUS, PLATFORM, "order_status", "1", "1"]

    # A message type the receiver does not know, through the real web process.
    envelope = {
        "messageType": NEW_TYPE,
        "messagePlatform": 0,
        "timestamp": str(int(time.time() * 1000)),
        "messageBody": {"salesOrderId": order_id},
    }
    credentials = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)
    headers = {**signed_headers(credentials), "content-type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as http:
        sent = await http.post(stack.webhook_url, content=json.dumps(envelope), headers=headers)
        assert sent.status_code == 200
        metrics = (await http.get(f"{stack.web_url}/metrics")).text
    assert counted(metrics, platform=PLATFORM, field="message_type") == 1
    output = await status_output(stack)
    assert "unmapped values: 2" in output
    assert unmapped_line(output, NEW_TYPE)[:5] == [NEW_TYPE, PLATFORM, "message_type", "-", "1"]
