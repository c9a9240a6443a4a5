"""Time the documented report queries over a generated ledger.

    python -m bench.reporting --orders 1000000 --database-url postgresql+asyncpg://u@host/any

Builds (or reuses) the database ``pandasync_bench_reporting_<N>`` on that server: migrated to
head, filled by bench.gen_ledger, vacuumed and analyzed, with the settings `pandasync migrate`
applies (service.ledger.reporting). Then runs each query of docs/reporting.md a few times and
prints the median, and its ratio to ``SELECT count(*) FROM orders`` measured in the same run
(one pass over the orders table: a report above 1.0x costs more than reading every order).
``--compare-defaults`` also times each query with Postgres' own jit and random_page_cost.

The ledger's clock is fixed when it is generated (stored as the database's comment), so the
queries use that instant instead of now() and a reused database gives the same windows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from bench.gen_ledger import generate
from service.db import asyncpg_dsn, with_database

TODAY = "(TIMESTAMPTZ '{now}' AT TIME ZONE report_timezone())::date"


@dataclass(frozen=True)
class Query:
    name: str
    sql: str


QUERIES = [
    Query(
        "daily sales, last 30 days",
        f"SELECT * FROM report_daily_sales WHERE day > {TODAY} - 30 "
        "ORDER BY day, account_id, platform",
    ),
    Query(
        "refund rate by platform, last 30 days",
        "SELECT platform, sum(orders_paid) AS paid, sum(refunds) AS refunds, "
        "round(100 * sum(refunded_amount) / nullif(sum(gross_amount), 0), 2) AS refunded_pct "
        f"FROM report_daily_sales WHERE day > {TODAY} - 30 GROUP BY platform",
    ),
    Query(
        "refunds of the last week",
        "SELECT * FROM report_refunds WHERE requested_at >= TIMESTAMPTZ '{now}' - interval "
        "'7 days' ORDER BY requested_at",
    ),
    Query(
        "fulfilment by carrier, last 30 days",
        "SELECT carrier, count(*) AS orders, avg(time_to_ship) AS to_ship, "
        "avg(time_in_transit) AS in_transit FROM report_fulfilment "
        "WHERE paid_at >= TIMESTAMPTZ '{now}' - interval '30 days' "
        "GROUP BY carrier ORDER BY orders DESC",
    ),
    Query(
        "slow shipments (paid > 48 h ago, not shipped)",
        "SELECT order_id, platform, paid_at, TIMESTAMPTZ '{now}' - paid_at AS waiting "
        "FROM report_fulfilment WHERE status = 'paid' AND shipped_at IS NULL "
        "AND paid_at < TIMESTAMPTZ '{now}' - interval '48 hours' ORDER BY paid_at LIMIT 100",
    ),
    Query("sync health", "SELECT * FROM report_sync_health"),
    Query(
        "top 20 products, last 30 days",
        "SELECT product_id, min(title) AS title, sum(quantity) AS quantity, "
        "sum(amount) AS amount FROM report_sales_lines "
        "WHERE paid_at >= TIMESTAMPTZ '{now}' - interval '30 days' "
        "GROUP BY product_id ORDER BY amount DESC LIMIT 20",
    ),
    Query(
        "price changes per day, last 30 days",
        "SELECT observed_day, platform, count(*) AS changes, sum(total_change) AS total "
        "FROM report_price_changes WHERE observed_at >= TIMESTAMPTZ '{now}' - interval "
        "'30 days' GROUP BY observed_day, platform ORDER BY observed_day, platform",
    ),
]
BASELINE = Query("baseline: SELECT count(*) FROM orders", "SELECT count(*) FROM orders")


async def _ensure_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(with_database(server_url, "postgres")))
    try:
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name
        ):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _prepare_ledger(url: str, orders: int, regenerate: bool) -> datetime:
    """Generate the ledger unless the database already holds this one; returns its clock."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        comment = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
            "WHERE datname = current_database()"
        )
        marker = json.loads(comment) if comment and comment.startswith("{") else {}
        if not regenerate and marker.get("orders") == orders:
            print(f"reusing the generated ledger ({orders:,} orders, clock {marker['now']})")
            await conn.execute("ANALYZE")
            return datetime.fromisoformat(marker["now"])
        now = datetime.now(UTC).replace(microsecond=0)
        print(f"generating {orders:,} orders …", flush=True)
        started = time.perf_counter()
        counts = await generate(url, orders, now=now, truncate=True)
        print(f"  {sum(counts.values()):,} rows in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        print(f"  VACUUM ANALYZE in {time.perf_counter() - started:.0f} s")
        marker = json.dumps({"orders": orders, "now": now.isoformat()})
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"COMMENT ON DATABASE \"{database}\" IS '{marker}'")
        return now
    finally:
        await conn.close()


async def _median_ms(conn: asyncpg.Connection, sql: str, repeats: int) -> float:
    await conn.fetch(sql)  # warm the cache and the statement
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await conn.fetch(sql)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def _run(url: str, args: argparse.Namespace) -> None:
    now = await _prepare_ledger(url, args.orders, args.regenerate)
    from service.ledger.reporting import apply_reporting_settings

    applied = await apply_reporting_settings(url, args.timezone)
    conn = await asyncpg.connect(asyncpg_dsn(url))  # a new session sees the settings
    defaults: asyncpg.Connection | None = None
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = await conn.fetch(
            "SELECT name, current_setting(name) AS setting FROM pg_settings WHERE name IN "
            "('jit', 'random_page_cost', 'shared_buffers', 'work_mem', "
            "'max_parallel_workers_per_gather') ORDER BY name"
        )
        rows = await conn.fetchval(
            "SELECT sum(n_live_tup) FROM pg_stat_user_tables WHERE relname = ANY($1)",
            ["orders", "order_lines", "order_status_history", "order_price_changes",
             "shipments", "shipment_events", "refunds", "webhook_inbox"],
        )  # fmt: skip
        print(f"Postgres {version}; {args.orders:,} orders, ~{rows:,} ledger rows; clock {now}")
        print("settings: " + ", ".join(f"{r['name']}={r['setting']}" for r in settings))
        print(f"applied by migrate: {applied}")
        if args.compare_defaults:
            defaults = await asyncpg.connect(asyncpg_dsn(url))
            await defaults.execute("SET jit = on; SET random_page_cost = 4")
        baseline = await _median_ms(conn, BASELINE.sql, args.repeats)
        header = f"{'query':48} {'median ms':>10} {'x count(*)':>11}"
        if defaults:
            header += f" {'PG defaults ms':>15}"
        print(f"\n{header}\n{'-' * len(header)}")
        print(f"{BASELINE.name:48} {baseline:10.1f} {1.0:10.2f}x")
        stamp = now.isoformat(sep=" ")
        for query in QUERIES:
            sql = query.sql.replace("{now}", stamp)
            median = await _median_ms(conn, sql, args.repeats)
            line = f"{query.name:48} {median:10.1f} {median / baseline:10.2f}x"
            if defaults:
                line += f" {await _median_ms(defaults, sql, max(1, args.repeats // 2)):15.1f}"
            print(line, flush=True)
    finally:
        await conn.close()
        if defaults:
            await defaults.close()


def add_ledger_arguments(parser: argparse.ArgumentParser) -> None:
    """``--orders`` and ``--database-url``: which generated ledger, on which server (shared
    with the benches that reuse it, such as bench.console)."""
    parser.add_argument("--orders", type=int, default=20_000, help="ledger size (20000)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("PANDASYNC_TEST_DATABASE_URL")
        or os.environ.get("PANDASYNC_DATABASE_URL"),
        help="a server where the bench may create a database (default: "
        "PANDASYNC_TEST_DATABASE_URL, then PANDASYNC_DATABASE_URL); the database part is ignored",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reporting", description=__doc__)
    add_ledger_arguments(parser)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per query (7)")
    parser.add_argument("--timezone", default="Asia/Shanghai", help="reporting zone")
    parser.add_argument("--regenerate", action="store_true", help="make the ledger anew")
    parser.add_argument(
        "--compare-defaults",
        action="store_true",
        help="also time each query with Postgres' default jit and random_page_cost",
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or PANDASYNC_TEST_DATABASE_URL) is required")
    name = f"pandasync_bench_reporting_{args.orders}"
    url = with_database(args.database_url, name)
    asyncio.run(_ensure_database(args.database_url, name))
    from service.ledger.migrations import run_migrations

    run_migrations(url)
    asyncio.run(_run(url, args))


if __name__ == "__main__":
    sys.exit(main())
