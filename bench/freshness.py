"""Freshness benchmark: time from a callback to the ledger, with the real processes.

    .venv/bin/python -m bench.freshness            # small: 200 msg/s for 5 s
    .venv/bin/python -m bench.freshness --large    # 200 msg/s for 60 s

``pandasync sandbox``, ``pandasync serve`` and ``pandasync worker`` (Redis broker) run as
subprocesses (``tests.support.stack``) on a scratch database and a flushed Redis db. The sandbox
adds ``--latency`` (default 50 ms) to every query endpoint and delivers no callbacks of its own.
The orders exist beforehand (awaiting payment, not in the ledger). Then, at ``--rate`` messages
per second, the bench pays one order in the sandbox and sends the signed status-change callback
for it to the web role, as PandaPon would; ``--duplicates`` of them (20 %) are sent a second
time 0-50 ms later (same envelope, fresh nonce: a PandaPon retry).

Freshness of a message: from the moment its first copy is sent to the moment a poller (every
10 ms, its own connection) sees the order's ledger row committed with status ``paid``, i.e. the
ledger reflects the message. Upstream calls come from the sandbox's call counts.

Baseline, same run: the upstream round trip itself, the median of direct
``PandaPonClient.order_detail`` calls to the same sandbox with the same latency.

Floor, same run (``bare_reconcile``): for the same orders, the CPU of a minimal loop doing only
what a reconcile cannot avoid: the same upstream calls with a plain httpx client (signed, JSON
parsed), the same rows (the order, its lines, a status history row, a change feed row, the inbox
row) written with raw asyncpg in one transaction, and a dramatiq round trip of a no-op actor on
the same Redis broker (enqueued and consumed in the bench process). The workers' CPU per message
is printed against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import asyncpg
import dramatiq
import httpx
from dramatiq.brokers.redis import RedisBroker

from bench._stack import (
    BenchStack,
    CpuMeter,
    cpu_lines,
    running_stack,
)
from service.db import asyncpg_dsn
from service.pandapon.signer import Credentials, signed_headers
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID

CREDENTIALS = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)
POLL_S = 0.01
SENDERS = 32
WARMUP = 50
DETAIL = ("taobao_order_detail", "alibaba_order_detail")


def envelope(platform: str, order_id: str) -> bytes:
    if platform == "taobao":
        message_type = "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"
        body: dict[str, Any] = {"salesOrderId": order_id, "subOrders": []}
    else:
        message_type = "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"
        body = {"baseInfo": {"idOfStr": order_id}}
    return json.dumps(
        {
            "messageType": message_type,
            "messageBody": body,
            "messagePlatform": 0 if platform == "taobao" else 1,
            "timestamp": str(int(time.time() * 1000)),
        }
    ).encode()


async def baseline_round_trip(sandbox_url: str, order: dict[str, Any], calls: int) -> float:
    """Median ms of a direct order-detail call (no limiter, no database)."""
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
    times = []
    async with make_http_client(settings) as http:
        client = PandaPonClient(settings, http)
        for _ in range(calls + 2):
            started = time.perf_counter()
            await client.order_detail(Platform(order["platform"]), order["order_id"])
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[2:])  # the first two open the connection


# The floor's order write: what any reconcile of a new paid order must store, in SQL as plain
# as it gets (the row values the real reconcile wrote, read back before the floor starts).
_FLOOR_ORDER = (
    "UPDATE orders SET status = $2, raw_status = $3, raw = $4::jsonb, snapshot_at = now(), "
    "last_synced_at = now(), upstream_modified_at = $5 WHERE id = $1"
)
_FLOOR_LINE = (
    "INSERT INTO order_lines (account_id, order_pk, line_id, product_id, sku_id, title, "
    "quantity, unit_price, amount, raw_status, raw) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb) "
    "ON CONFLICT ON CONSTRAINT uq_order_lines_order_pk_line_id DO UPDATE SET "
    "title = excluded.title, quantity = excluded.quantity, amount = excluded.amount, "
    "raw = excluded.raw"
)
_FLOOR_HISTORY = (
    "INSERT INTO order_status_history (account_id, order_pk, from_status, to_status, "
    "from_raw_status, to_raw_status, upstream_modified_at, source) "
    "VALUES ($1, $2, NULL, $3, NULL, $4, $5, 'webhook')"
)
_FLOOR_CHANGE = (
    "INSERT INTO ledger_changes (account_id, platform, order_id, order_pk, kind, payload, "
    "occurred_at) VALUES ($1, $2, $3, $4, 'order.status_changed', $5::jsonb, $6)"
)
_FLOOR_INBOX = (
    "UPDATE webhook_inbox SET state = 'processed', processed_at = now() "
    "WHERE account_id = $1 AND platform = $2 AND order_id = $3"
)


async def bare_reconcile(
    stack: BenchStack, orders: list[dict[str, Any]], redis_url: str, concurrency: int
) -> dict[str, float]:
    """CPU seconds of this process for the floor of ``orders``: ``upstream+write`` (the calls
    and the transaction) and ``dramatiq`` (a no-op actor's round trip per order)."""
    from service.domain import Platform
    from service.pandapon.endpoints import EndpointTable, Kind

    endpoints = EndpointTable()
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        stored = {
            row["order_id"]: row
            for row in await conn.fetch(
                "SELECT id, order_id, status::text AS status, raw_status, upstream_modified_at "
                "FROM orders WHERE order_id = ANY($1::text[])",
                [o["order_id"] for o in orders],
            )
        }
        lines: dict[int, list[Any]] = {}
        for row in await conn.fetch(
            "SELECT order_pk, line_id, product_id, sku_id, title, quantity, unit_price, amount, "
            "raw_status, raw::text AS raw FROM order_lines WHERE order_pk = ANY($1::bigint[])",
            [r["id"] for r in stored.values()],
        ):
            lines.setdefault(row["order_pk"], []).append(row)
    finally:
        await conn.close()

    pool = await asyncpg.create_pool(
        asyncpg_dsn(stack.database_url), min_size=concurrency, max_size=concurrency
    )
    http = httpx.AsyncClient(
        timeout=30,
        trust_env=False,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    gate = asyncio.Semaphore(concurrency)

    async def call(platform: Platform, kind: Kind, order_id: str) -> Any:
        endpoint = endpoints.get(platform, kind)
        wire = endpoint.wire_params({"order_id": order_id})
        url = stack.sandbox_url + endpoint.path
        headers = signed_headers(CREDENTIALS)
        if endpoint.method == "GET":
            response = await http.get(url, params=wire, headers=headers)
        else:
            response = await http.post(url, json=wire, headers=headers)
        body = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"floor: {endpoint.name} answered {response.status_code}")
        return body.get("data", body)

    async def one(order: dict[str, Any]) -> None:
        platform = Platform(order["platform"])
        async with gate:
            data = await call(platform, "order_detail", order["order_id"])
            if platform is Platform.ALIBABA_1688:
                await call(platform, "logistics", order["order_id"])
            row = stored[order["order_id"]]
            raw = json.dumps(data)
            async with pool.acquire() as db, db.transaction():
                await db.execute(
                    _FLOOR_ORDER,
                    row["id"],
                    row["status"],
                    row["raw_status"],
                    raw,
                    row["upstream_modified_at"],
                )
                await db.executemany(
                    _FLOOR_LINE,
                    [(DEV_USER_ID, *line) for line in lines.get(row["id"], [])],
                )
                await db.execute(
                    _FLOOR_HISTORY,
                    DEV_USER_ID,
                    row["id"],
                    row["status"],
                    row["raw_status"],
                    row["upstream_modified_at"],
                )
                await db.execute(
                    _FLOOR_CHANGE,
                    DEV_USER_ID,
                    order["platform"],
                    order["order_id"],
                    row["id"],
                    json.dumps({"to_status": row["status"], "to_raw_status": row["raw_status"]}),
                    row["upstream_modified_at"],
                )
                await db.execute(_FLOOR_INBOX, DEV_USER_ID, order["platform"], order["order_id"])

    async with http:
        try:
            await asyncio.gather(*(one(order) for order in orders[:concurrency]))  # warm
            before = time.process_time()
            await asyncio.gather(*(one(order) for order in orders))
            upstream_write = time.process_time() - before
        finally:
            await pool.close()

    # A no-op actor's round trip on the same broker: enqueued here, consumed by a worker of
    # this process with dramatiq's default middleware.
    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    remaining = [len(orders)]

    def arrived() -> None:
        remaining[0] -= 1
        if remaining[0] <= 0:
            done.set()

    @dramatiq.actor(broker=broker, queue_name="bench_floor", actor_name="bench_floor_noop")
    def noop(order_id: str) -> None:
        loop.call_soon_threadsafe(arrived)

    worker = dramatiq.Worker(broker, worker_threads=16)
    worker.start()
    try:
        before = time.process_time()
        for order in orders:
            noop.send(order["order_id"])
        await asyncio.wait_for(done.wait(), 120)
        round_trips = time.process_time() - before
    finally:
        worker.stop()
        broker.close()
    return {"upstream+write": upstream_write, "dramatiq": round_trips}


class Poller:
    """Watches the ledger for orders becoming ``paid``; records when it first sees each."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.waiting: dict[str, str] = {}  # order id -> platform
        self.seen: dict[str, float] = {}
        self.stop = asyncio.Event()
        self.expected = 0
        self.all_seen = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            while not self.stop.is_set():
                if self.waiting:
                    # By the orders' unique key, so each poll costs index probes for the
                    # orders still awaited, not a scan of the ledger.
                    rows = await conn.fetch(
                        "SELECT o.order_id FROM unnest($1::text[], $2::text[]) AS w(platform, id) "
                        "JOIN orders o ON o.account_id = $3 AND o.platform = w.platform "
                        "AND o.order_id = w.id WHERE o.status = 'paid'",
                        list(self.waiting.values()),
                        list(self.waiting),
                        DEV_USER_ID,
                    )
                    now = time.perf_counter()
                    for row in rows:
                        self.seen[row["order_id"]] = now
                        self.waiting.pop(row["order_id"], None)
                    if self.expected and len(self.seen) >= self.expected:
                        self.all_seen.set()
                await asyncio.sleep(POLL_S)
        finally:
            await conn.close()


async def measure(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    count = args.rate * args.duration
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    control = httpx.AsyncClient(timeout=60.0, trust_env=False, limits=limits)
    async with control, SandboxRemote(stack.sandbox_url, control) as sb:
        await sb.configure_delivery(drop=1.0)  # the bench sends the callbacks itself
        made = time.perf_counter()
        for start in range(0, count + 1 + WARMUP, 5000):
            await sb.scenario(orders=min(5000, count + 1 + WARMUP - start), steps=0)
        orders = await sb.orders()
        print(
            f"sandbox: {len(orders)} orders awaiting payment in {time.perf_counter() - made:.1f} s"
        )
        probe, orders = orders[0], orders[1:]
        # Pay every order first (the ledger cannot learn of it: callbacks are dropped and no
        # sweep runs), so the measured window holds only the callbacks and what they cause.
        paying = asyncio.Semaphore(32)

        async def pay(order: dict[str, Any]) -> None:
            async with paying:
                await sb.pay(order["platform"], order["order_id"])

        paid = time.perf_counter()
        await asyncio.gather(*(pay(order) for order in orders[: count + WARMUP]))
        print(f"sandbox: {count + WARMUP} orders paid in {time.perf_counter() - paid:.1f} s")
        await sb.set_faults({"*": {"latency_s": args.latency}})
        base_ms = await baseline_round_trip(stack.sandbox_url, probe, 30)
        await sb.reset_calls()

        poller = Poller(stack.database_url)
        poll_task = asyncio.create_task(poller.run())
        sent_at: dict[str, float] = {}
        rng = random.Random(1)
        duplicates = 0
        post_ms: list[float] = []
        errors: list[str] = []
        # At most SENDERS requests in flight, each with a connection of its own: requests
        # queued inside httpx's pool cost time quadratic in the queue, and a load generator
        # spending its time there would measure itself.
        senders = asyncio.Semaphore(SENDERS)
        web_limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
        async with httpx.AsyncClient(timeout=10, limits=web_limits, trust_env=False) as web:

            async def post(body: bytes) -> None:
                async with senders:
                    headers = {**signed_headers(CREDENTIALS), "content-type": "application/json"}
                    response = await web.post(stack.webhook_url, content=body, headers=headers)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")

            async def one(order: dict[str, Any], duplicate: bool) -> None:
                body = envelope(order["platform"], order["order_id"])
                sent_at[order["order_id"]] = time.perf_counter()
                poller.waiting[order["order_id"]] = order["platform"]
                await post(body)
                post_ms.append((time.perf_counter() - sent_at[order["order_id"]]) * 1000)
                if duplicate:
                    await asyncio.sleep(rng.uniform(0, 0.05))
                    await post(body)

            # Warm-up (not counted): worker processes boot, connections open.
            warm, orders = orders[:WARMUP], orders[WARMUP:]
            poller.expected = len(warm)
            await asyncio.gather(*(one(order, False) for order in warm))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poller.all_seen.wait(), args.settle)
            sent_at.clear()
            poller.seen.clear()
            poller.expected = 0
            poller.all_seen.clear()
            post_ms.clear()
            await sb.reset_calls()
            warm_ids = [o["order_id"] for o in warm]

            meter = CpuMeter(
                {name: role.process.pid for name, role in stack.roles.items() if role.process}
            )
            meter.start()
            print(f"timed window: {count} messages at {args.rate}/s", flush=True)
            tasks = []
            began = time.perf_counter()
            for n, order in enumerate(orders[:count]):
                delay = began + n / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                duplicate = rng.random() < args.duplicates
                duplicates += duplicate
                tasks.append(asyncio.create_task(one(order, duplicate)))
            await asyncio.gather(*tasks)
            send_s = time.perf_counter() - began
            poller.expected = len(sent_at)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poller.all_seen.wait(), args.settle)
            cpu = meter.stop()
        poller.stop.set()
        await poll_task
        calls = await sb.calls()
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        stages = await conn.fetchrow(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
            "queued_at - received_at)) * 1000 AS queue_ms, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
            "processed_at - queued_at)) * 1000 AS process_ms, count(*) AS rows "
            "FROM webhook_inbox WHERE order_id <> ALL($1::text[])",
            warm_ids,
        )
    finally:
        await conn.close()
    assert stages is not None  # an aggregate always answers one row
    # After the inbox figures above: the floor marks the same inbox rows processed again.
    measured = [o for o in orders[:count] if o["order_id"] in poller.seen]
    floor = await bare_reconcile(stack, measured, args.redis_url, args.worker_threads)
    latencies = sorted((poller.seen[o] - sent_at[o]) * 1000 for o in poller.seen)
    return {
        "messages": len(sent_at),
        "duplicates": duplicates,
        "send_s": send_s,
        "latencies": latencies,
        "missing": len(sent_at) - len(poller.seen),
        "errors": errors,
        "calls": calls,
        "base_ms": base_ms,
        "stages": dict(stages),
        "cpu": cpu,
        "floor": floor,
        "floor_messages": len(measured),
        "post_ms": statistics.median(post_ms),
    }


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, round(share * (len(values) - 1)))]


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    lat, base = result["latencies"], result["base_ms"]
    messages, dups = result["messages"], result["duplicates"]
    detail = sum(result["calls"].get(name, 0) for name in DETAIL)
    upstream = sum(result["calls"].values())
    p50, p99 = statistics.median(lat), percentile(lat, 0.99)
    lines = [
        f"freshness: {messages} messages at {args.rate}/s ({messages / result['send_s']:.0f}/s "
        f"achieved) + {dups} duplicates ({dups / messages:.0%}); upstream latency "
        f"{args.latency * 1000:.0f} ms on every endpoint; worker {args.worker_processes} "
        f"process(es) x {args.worker_threads} threads; upstream limit {args.rate_limit:.0f}/s; "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        f"{'':<40} {'ms':>9} {'x baseline':>11}",
        f"{'baseline: one upstream detail call':<40} {base:>9.1f} {1.0:>11.2f}",
        f"{'callback -> ledger p50':<40} {p50:>9.1f} {p50 / base:>11.2f}",
        f"{'callback -> ledger p90':<40} {percentile(lat, 0.9):>9.1f} "
        f"{percentile(lat, 0.9) / base:>11.2f}",
        f"{'callback -> ledger p99':<40} {p99:>9.1f} {p99 / base:>11.2f}",
        f"{'callback -> ledger max':<40} {lat[-1]:>9.1f} {lat[-1] / base:>11.2f}",
        f"(median webhook answer "
        f"{result['post_ms']:.1f} ms; inbox medians: received -> queued "
        f"{result['stages']['queue_ms'] or 0:.1f} ms, queued -> processed "
        f"{result['stages']['process_ms'] or 0:.1f} ms, {result['stages']['rows']} rows)",
        "",
        f"upstream detail calls per message: {detail / messages:.3f} "
        f"({detail} calls / {messages} messages; per request sent incl. duplicates: "
        f"{detail / (messages + dups):.3f})",
        f"all upstream calls per message:    {upstream / messages:.3f} "
        + json.dumps({k: v for k, v in sorted(result["calls"].items()) if v}),
        "",
        "CPU per message (user + system, sending until the ledger held every message):",
        *cpu_lines(result["cpu"], messages),
        "",
        *floor_lines(result, messages),
        "",
        f"targets: p50 <= 250 ms {'ok' if p50 <= 250 else 'MISSED'}, "
        f"p99 <= 2000 ms {'ok' if p99 <= 2000 else 'MISSED'}, "
        f"detail calls/message <= 1.2 {'ok' if detail / messages <= 1.2 else 'MISSED'}",
    ]
    if result["missing"]:
        lines.append(f"INVALID: {result['missing']} message(s) never reached the ledger")
    if result["errors"]:
        lines.append(
            f"INVALID: {len(result['errors'])} non-200 answers, e.g. {result['errors'][0]}"
        )
    return "\n".join(lines)


def floor_lines(result: dict[str, Any], messages: int) -> list[str]:
    """The bare-reconcile floor per message, and the workers' CPU per message against it."""
    floor = result["floor"]
    n = result["floor_messages"] or 1
    floor_ms = sum(floor.values()) * 1000 / n
    worker_ms = result["cpu"].get("worker", 0.0) * 1000 / messages
    return [
        f"bare-reconcile floor (same orders, {n}): "
        + ", ".join(f"{k} {v * 1000 / n:.2f} ms" for k, v in floor.items())
        + f"; {floor_ms:.2f} ms/message",
        f"worker CPU per message {worker_ms:.2f} ms = {worker_ms / floor_ms:.2f}x the floor",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__)
    parser.add_argument("--large", action="store_true", help="60 s instead of 5 s")
    parser.add_argument("--rate", type=int, default=200, help="messages per second")
    parser.add_argument("--duration", type=int, help="seconds of sending (default 5; large 60)")
    parser.add_argument("--duplicates", type=float, default=0.2)
    parser.add_argument("--latency", type=float, default=0.05, help="upstream latency, seconds")
    parser.add_argument("--worker-processes", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=16)
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=5000.0,
        help="PANDASYNC_UPSTREAM_RATE_LIMIT_RPS: far above the calls made, never the bottleneck",
    )
    parser.add_argument("--settle", type=float, default=30.0, help="max wait after sending, s")
    parser.add_argument("--database-url", help="postgresql+asyncpg://… server for a scratch db")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="flushed!")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--outbound-delay",
        type=float,
        default=None,
        help="also run `pandasync deliver` to an outbound endpoint answering after this many s",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (60 if args.large else 5)

    settings = {
        "PANDASYNC_UPSTREAM_RATE_LIMIT_RPS": str(args.rate_limit),
        "PANDASYNC_HTTP_MAX_CONNECTIONS": "100",
    }
    with running_stack(args, "fresh", settings) as (stack, _), contextlib.ExitStack() as extra:
        if args.outbound_delay is not None:
            from bench.outbound import slow_endpoint

            extra.enter_context(slow_endpoint(stack, args.outbound_delay))
        result = asyncio.run(measure(stack, args))
        print()
        print(report(result, args))
        return 0 if not result["missing"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
