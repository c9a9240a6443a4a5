"""``pandasync backfill`` with the real processes: it fills the ledger, and it resumes.

The sandbox holds a few hundred orders whose callbacks were all dropped, so only the backfill
can bring them into the ledger; ``pandasync backfill`` runs as a subprocess against a Stack
(sandbox, web role, worker) and the ledger is then compared with the truth. The backfill sends
its reconciles through the broker and paces itself on its queue: the full backfill runs on Redis
and on RabbitMQ; the resume is the command's own bookkeeping, in Postgres, and runs on Redis.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_USER_ID
from tests.support.ledger_truth import fetch, wait_for_ledger
from tests.support.stack import PANDASYNC, Stack

pytestmark = pytest.mark.e2e

ORDERS = 300
PAGE_SIZE = 10


@pytest.fixture
async def stack(fresh_database_url: str, broker_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(fresh_database_url, broker_url, tmp_path)
    try:
        await running.start()
        async with SandboxRemote(running.sandbox_url) as sb:
            # No callback reaches the web role: only the backfill can fill the ledger.
            await sb.configure_delivery(drop=1.0)
            await sb.scenario(orders=ORDERS, steps=4, seed=7)
        yield running
    finally:
        running.stop()
        print(running.logs())  # shown by pytest when the test failed


def knowable(truths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The orders a backfill alone can get right.

    A 1688 order detail names one refund per line (the latest, by ``refundId`` on the line's
    product item), so an earlier refund of the same line reaches the ledger only through its
    callback, and this test drops every callback. Such orders are left out of the comparison.
    """
    kept = []
    for truth in truths:
        lines = [r["line_id"] for r in truth["refunds"]]
        if truth["platform"] == "1688" and len(lines) != len(set(lines)):
            continue
        kept.append(truth)
    return kept


def day_range() -> tuple[str, str]:
    """--since yesterday --until tomorrow, in China time (the command's time zone)."""
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    return str(today - timedelta(days=1)), str(today + timedelta(days=1))


def backfill_argv() -> list[str]:
    since, until = day_range()
    return [PANDASYNC, "backfill", "--since", since, "--until", until, "--stall-timeout", "60"]


def start_backfill(stack: Stack, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [*backfill_argv(), *extra],
            env=stack.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_exit(process: subprocess.Popen[bytes], log: Path, within_s: float = 120) -> int:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, process.wait, within_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"backfill did not finish\n{output}") from None


async def test_backfill_brings_every_order_into_the_ledger(stack: Stack, tmp_path: Path) -> None:
    log = tmp_path / "backfill.log"
    process = start_backfill(stack, log, "--page-size", "50")
    code = await wait_exit(process, log)
    output = log.read_text()
    assert code == 0, output
    assert "backfill finished" in output, output
    async with SandboxRemote(stack.sandbox_url) as sb:
        truths = await sb.orders()
    assert len(truths) == ORDERS
    await wait_for_ledger(stack.database_url, DEV_USER_ID, knowable(truths))
    runs = await fetch(
        stack.database_url,
        "SELECT platform, orders_seen, finished_at FROM backfill_runs ORDER BY platform",
    )
    assert {r["platform"] for r in runs} == {"taobao", "1688"}
    assert all(r["finished_at"] is not None for r in runs)
    assert sum(r["orders_seen"] for r in runs) == ORDERS


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
async def test_a_killed_backfill_resumes_without_redoing_finished_pages(
    stack: Stack, tmp_path: Path
) -> None:
    async with SandboxRemote(stack.sandbox_url) as sb:
        taobao = await sb.orders("taobao")
        pages = math.ceil(len(taobao) / PAGE_SIZE)
        assert pages >= 8
        # A slow order list, so the command is still paging when it is killed.
        await sb.set_faults({"taobao_order_list": {"latency_s": 0.4}})
        await sb.reset_calls()

        log = tmp_path / "backfill-1.log"
        first = start_backfill(stack, log, "--platform", "taobao", "--page-size", str(PAGE_SIZE))
        query = "SELECT id, next_page, finished_at FROM backfill_runs"
        for _ in range(600):
            rows = await fetch(stack.database_url, query)
            if rows and rows[0]["next_page"] >= 4:
                break
            assert first.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        (killed_run,) = await fetch(stack.database_url, query)
        assert killed_run["finished_at"] is None
        resume_at = killed_run["next_page"]
        assert 4 <= resume_at <= pages

        await sb.clear_faults()
        await sb.reset_calls()
        log = tmp_path / "backfill-2.log"
        second = start_backfill(stack, log, "--platform", "taobao", "--page-size", str(PAGE_SIZE))
        code = await wait_exit(second, log)
        assert code == 0, log.read_text()
        calls = await sb.calls()
        # Only the pages the killed run had not finished were asked for again.
        assert calls.get("taobao_order_list", 0) == pages - resume_at + 1
        assert calls.get("alibaba_order_list", 0) == 0

        (run,) = await fetch(
            stack.database_url, "SELECT id, next_page, orders_seen, finished_at FROM backfill_runs"
        )
        assert run["id"] == killed_run["id"]
        assert run["finished_at"] is not None
        assert run["next_page"] == pages + 1
        assert run["orders_seen"] == len(taobao)
        await wait_for_ledger(stack.database_url, DEV_USER_ID, knowable(taobao))
