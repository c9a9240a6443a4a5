"""Backfill benchmark: ``pandasync backfill`` over a filled sandbox, with peak memory.

    .venv/bin/python -m bench.backfill             # small: 5,000 orders
    .venv/bin/python -m bench.backfill --large     # 100,000 orders

The sandbox, web role and workers (Redis broker) run as subprocesses (``tests.support.stack``)
on a scratch database and a flushed Redis db. The sandbox is filled with ``--orders`` random
orders (``POST /_sandbox/scenario`` in chunks of 5,000; callbacks dropped, so only the backfill
fills the ledger). Then ``pandasync backfill --since yesterday --until tomorrow`` runs as a
subprocess and waits until every order is synced. Two rates come out of one run:

- paging: orders listed per second (the command's own order-list paging and enqueueing, from
  its ``backfill_runs`` row);
- end to end: orders per second until the ledger holds every order (paging + every reconcile).

Baselines, same run, same sandbox: the raw order-list paging speed (a bare
``PandaPonClient.order_page`` loop over the same range and page size, no database, no broker),
and the bound the upstream rate limit (``--rate-limit``, PANDASYNC_UPSTREAM_RATE_LIMIT_RPS, the
limit PandaPon grants) sets on reconciles: limit / upstream calls per order. Peak RSS is sampled
(psutil, every 0.2 s) for the backfill command and each process of the web and worker roles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import psutil

from bench._stack import (
    BenchStack,
    running_stack,
)
from service.db import asyncpg_dsn
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID
from tests.support.stack import PANDASYNC

CHUNK = 5000
CHINA = ZoneInfo("Asia/Shanghai")


class PeakRss:
    """Samples the RSS of process trees; keeps the peak per process and per role."""

    def __init__(self) -> None:
        self.roots: dict[str, int] = {}
        self.peak_process: dict[str, int] = {}
        self.peak_role: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for role, pid in list(self.roots.items()):
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                total = 0
                for proc in procs:
                    try:
                        rss = proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                    total += rss
                    self.peak_process[role] = max(self.peak_process.get(role, 0), rss)
                self.peak_role[role] = max(self.peak_role.get(role, 0), total)


async def fill(sb: SandboxRemote, orders: int, steps: int) -> float:
    started = time.perf_counter()
    for start in range(0, orders, CHUNK):
        await sb.scenario(orders=min(CHUNK, orders - start), steps=steps, seed=None)
    return time.perf_counter() - started


async def raw_paging(sandbox_url: str, since: datetime, until: datetime, page_size: int) -> Any:
    """A bare order-list loop over both platforms: (orders listed, pages, seconds)."""
    from service.config import load_settings
    from service.ledger.models import Platform
    from service.pandapon.client import PandaPonClient, make_http_client

    settings = load_settings(
        api_base_url=sandbox_url,
        access_key=DEV_ACCESS_KEY,
        access_secret=DEV_ACCESS_SECRET,
        user_id=DEV_USER_ID,
        database_url=None,
        broker_url=None,
    )
    listed = pages = 0
    async with make_http_client(settings) as http:
        client = PandaPonClient(settings, http)
        started = time.perf_counter()
        for platform in (Platform.TAOBAO, Platform.ALIBABA_1688):
            page_no = 1
            while True:
                page = await client.order_page(platform, page_no, page_size, since, until)
                pages += 1
                listed += len(page.orders)
                if not page.orders or page_no * page_size >= page.total:
                    break
                page_no += 1
        return listed, pages, time.perf_counter() - started


async def fetch(database_url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


SEEN = "SELECT coalesce(sum(orders_seen), 0) AS seen FROM backfill_runs"


def run(args: argparse.Namespace, stack: BenchStack, workdir: Path) -> int:
    today = datetime.now(CHINA).date()
    since_day, until_day = today - timedelta(days=1), today + timedelta(days=1)
    since = datetime(since_day.year, since_day.month, since_day.day, tzinfo=CHINA)
    until = datetime(until_day.year, until_day.month, until_day.day, tzinfo=CHINA)
    until += timedelta(days=1)

    async def prepare() -> tuple[float, int, int, float]:
        async with (
            httpx.AsyncClient(timeout=600.0, trust_env=False) as http,
            SandboxRemote(stack.sandbox_url, http) as sb,
        ):
            await sb.configure_delivery(drop=1.0)
            fill_s = await fill(sb, args.orders, args.steps)
            listed, pages, raw_s = await raw_paging(stack.sandbox_url, since, until, args.page_size)
            await sb.reset_calls()
            return fill_s, listed, pages, raw_s

    fill_s, listed, pages, raw_s = asyncio.run(prepare())
    print(f"sandbox: {args.orders} orders made in {fill_s:.1f} s; raw paging listed {listed}")

    peaks = PeakRss()
    for name, role in stack.roles.items():
        if name != "sandbox" and role.process is not None:
            peaks.roots[name] = role.process.pid
    peaks.start()
    log = workdir / "backfill.log"
    argv = [PANDASYNC, "backfill", "--since", str(since_day), "--until", str(until_day)]
    argv += ["--page-size", str(args.page_size), "--stall-timeout", "120"]
    started = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen(argv, env=stack.env(), stdout=out, stderr=subprocess.STDOUT)
    peaks.roots["backfill"] = process.pid
    killed_at = None
    if args.kill_half:
        # SIGKILL the command once it has listed half the orders, then run it again: it must
        # resume from its backfill_runs rows (the order-list calls show any page asked twice).
        while process.poll() is None:
            (row,) = asyncio.run(fetch(stack.database_url, SEEN))
            if row["seen"] >= args.orders // 2:
                process.kill()
                process.wait()
                killed_at = int(row["seen"])
                with log.open("ab") as out:
                    process = subprocess.Popen(
                        argv, env=stack.env(), stdout=out, stderr=subprocess.STDOUT
                    )
                peaks.roots["backfill"] = process.pid
                break
            time.sleep(0.2)
    try:
        code = process.wait(args.timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = -1
    total_s = time.perf_counter() - started
    peaks.stop()

    runs = asyncio.run(
        fetch(
            stack.database_url,
            "SELECT sum(orders_seen) AS seen, extract(epoch FROM max(finished_at) - "
            "min(started_at)) AS paging_s FROM backfill_runs",
        )
    )
    ledger = asyncio.run(fetch(stack.database_url, "SELECT count(*) AS n FROM orders"))[0]["n"]

    async def calls() -> dict[str, int]:
        async with SandboxRemote(stack.sandbox_url) as sb:
            return await sb.calls()

    upstream = asyncio.run(calls())
    seen, paging_s = int(runs[0]["seen"] or 0), float(runs[0]["paging_s"] or 0.0)
    list_calls = sum(v for k, v in upstream.items() if k.endswith("order_list"))
    other_calls = sum(v for k, v in upstream.items() if not k.endswith("order_list"))
    per_order = other_calls / max(ledger, 1)
    raw_rate = listed / raw_s
    paging_rate = seen / paging_s if paging_s else 0.0
    e2e_rate = ledger / total_s
    limit_rate = args.rate_limit / per_order if per_order else 0.0
    upstream_rps = (list_calls + other_calls) / total_s
    mb = 1024 * 1024
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "",
        f"backfill: {args.orders} orders ({args.steps} steps each), page size {args.page_size}, "
        f"upstream limit {args.rate_limit:.0f}/s, worker {args.worker_processes} process(es) x "
        f"{args.worker_threads} threads; load average {load}",
        f"exit code {code}; {seen} listed, {ledger} orders in the ledger in {total_s:.1f} s",
        *(
            [
                f"killed (SIGKILL) after {killed_at} orders listed and run again: "
                f"{list_calls} order-list calls for {pages} pages "
                f"({list_calls - pages} asked again)"
            ]
            if killed_at is not None
            else []
        ),
        "",
        f"{'':<52} {'orders/s':>9} {'x baseline':>11}",
        f"{'baseline: raw order-list paging (no db, no broker)':<52} {raw_rate:>9.0f} {1.0:>11.2f}",
        f"{'pandasync backfill paging + enqueue':<52} {paging_rate:>9.0f} "
        f"{paging_rate / raw_rate:>11.2f}",
        "",
        f"{'baseline: rate limit / calls per order':<52} {limit_rate:>9.1f} {1.0:>11.2f}",
        f"{'end to end (paging + every reconcile)':<52} {e2e_rate:>9.1f} "
        f"{e2e_rate / limit_rate if limit_rate else 0:>11.2f}",
        "",
        f"upstream: {list_calls} order-list + {other_calls} other calls "
        f"({per_order:.2f} per order), {upstream_rps:.0f} calls/s overall vs limit "
        f"{args.rate_limit:.0f}/s ({upstream_rps / args.rate_limit:.2f})",
        "peak RSS MB (largest process / whole role): "
        + ", ".join(
            f"{role} {peaks.peak_process.get(role, 0) / mb:.0f} / {peaks.peak_role[role] / mb:.0f}"
            for role in sorted(peaks.peak_role)
        ),
    ]
    print("\n".join(lines))
    if code != 0 or ledger != args.orders:
        print(f"INVALID: see {log}")
        print(log.read_text()[-3000:])
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__)
    parser.add_argument("--large", action="store_true", help="100,000 orders")
    parser.add_argument("--orders", type=int, help="orders (default 5,000; large 100,000)")
    parser.add_argument("--steps", type=int, default=4, help="random changes per order")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--rate-limit", type=float, default=200.0, help="upstream requests/s")
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument(
        "--kill-half", action="store_true", help="SIGKILL the command half way, run it again"
    )
    parser.add_argument("--timeout", type=float, help="max seconds for the backfill command")
    parser.add_argument("--database-url", help="postgresql+asyncpg://… server for a scratch db")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="flushed!")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    args.orders = args.orders or (100_000 if args.large else 5_000)
    args.timeout = args.timeout or 300.0 + args.orders / 5  # bounded even when slow

    limit = {"PANDASYNC_UPSTREAM_RATE_LIMIT_RPS": str(args.rate_limit)}
    with running_stack(args, "backfill", limit) as (stack, workdir):
        return run(args, stack, workdir)


if __name__ == "__main__":
    sys.exit(main())
