"""Time every page of the operator console over real HTTP on the reporting benchmark's ledger.

    python -m bench.console --orders 1000000 --database-url postgresql+asyncpg://u@host/any

Builds or reuses the database ``pandasync_bench_reporting_<N>`` exactly as bench.reporting does
(migrated, filled by bench.gen_ledger, vacuumed and analyzed, the settings of `pandasync
migrate`), serves the web role on it under uvicorn on a local socket (broker: an in-memory
stub; nothing is sent), logs in to ``/console`` and requests each page a few times, printing
the median and the slowest time of each. A page must answer in under 300 ms.

The replay is timed on a failure the bench opens for it and closes again afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import asyncpg
import httpx
import uvicorn
from dramatiq.brokers.stub import StubBroker

from bench.reporting import _ensure_database, _prepare_ledger, add_ledger_arguments
from service.db import asyncpg_dsn, with_database

BUDGET_MS = 300.0


@dataclass(frozen=True)
class Page:
    name: str
    path: str


@contextmanager
def serving(app: object) -> Iterator[str]:
    """``app`` under uvicorn in a thread, on a socket bound first; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the web role did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


async def _samples(url: str) -> dict[str, str]:
    """Values to put in the pages' URLs: an order of the middle of the ledger, a message, a
    type; and an open failure for the replay (opened here, closed by ``_close_failure``)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        order = await conn.fetchrow(
            "SELECT account_id, platform, order_id FROM orders "
            "WHERE id = (SELECT (max(id) + min(id)) / 2 FROM orders)"
        )
        inbox_id = await conn.fetchval("SELECT max(id) - 1000 FROM webhook_inbox")
        failure_id = await conn.fetchval(
            "INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error) "
            "VALUES ($1, $2, $3, 'permanent', 'webhook', 'bench: console replay') "
            "ON CONFLICT DO NOTHING RETURNING id",
            order["account_id"], order["platform"], order["order_id"],
        )  # fmt: skip
    finally:
        await conn.close()
    return {
        "account": order["account_id"],
        "platform": order["platform"],
        "order_id": order["order_id"],
        "inbox_id": str(inbox_id),
        "failure_id": str(failure_id or ""),
    }


async def _close_failure(url: str, failure_id: str) -> None:
    if not failure_id:
        return
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("DELETE FROM sync_failures WHERE id = $1", int(failure_id))
    finally:
        await conn.close()


def _pages(s: dict[str, str]) -> list[Page]:
    order = f"/console/orders/{s['platform']}/{s['order_id']}?account={s['account']}"
    return [
        Page("overview, last 3 h", "/console/"),
        Page("overview, last 24 h", "/console/?hours=24"),
        Page("orders, newest", "/console/orders"),
        Page("orders, status=paid", "/console/orders?status=paid"),
        Page("orders, status=unknown (no match)", "/console/orders?status=unknown"),
        Page(
            "orders, account+platform+status",
            f"/console/orders?account={s['account']}&platform={s['platform']}&status=completed",
        ),
        Page("orders, an older page", "/console/orders?before=500000"),
        Page("orders, search by id", f"/console/orders?q={s['order_id']}"),
        Page("order page with timeline", order),
        Page("messages, newest", "/console/messages"),
        Page("messages, state=processed", "/console/messages?state=processed"),
        Page("messages, signature=valid (no match)", "/console/messages?signature=valid"),
        Page("messages, an older page", "/console/messages?before=300000"),
        Page("message with raw body", f"/console/messages/{s['inbox_id']}"),
        Page("failures", "/console/failures"),
    ]


def _login(client: httpx.Client, token: str) -> str:
    form = client.get("/console/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf, "no CSRF token in the login form"
    done = client.post(
        "/console/login", data={"csrf": csrf.group(1), "token": token, "next": "/console/"}
    )
    assert done.status_code == 303, f"login failed: {done.status_code}"
    page = client.get("/console/failures")
    session_csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert session_csrf
    return session_csrf.group(1)


def _time(client: httpx.Client, path: str, repeats: int) -> tuple[float, float, int]:
    client.get(path)  # warm the cache and the statements
    times = []
    status = 0
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        status = response.status_code
    return statistics.median(times), max(times), status


def run(url: str, orders: int, repeats: int) -> bool:
    from service.app import create_app
    from service.config import load_settings

    asyncio.run(_prepare_ledger(url, orders, False))
    from service.ledger.reporting import apply_reporting_settings

    asyncio.run(apply_reporting_settings(url, "Asia/Shanghai"))
    samples = asyncio.run(_samples(url))
    token = secrets.token_hex(24)
    settings = load_settings(
        database_url=url,
        admin_token=token,
        broker_url=None,
        webhook_auth="token",  # no PandaPon credentials here; no callback is sent anyway
        webhook_token=secrets.token_hex(24),
        # The web role's relay would hand the ledger's small backlog to the stub: keep it still.
        relay_grace_s=10**9,
        requeue_after_s=10**9,
    )
    broker = StubBroker()
    ok = True
    try:
        with (
            serving(create_app(settings, broker=broker)) as base,
            httpx.Client(base_url=base, timeout=30) as client,
        ):
            csrf = _login(client, token)
            header = f"{'page':44} {'median ms':>10} {'max ms':>8} {'status':>7}"
            print(f"\n{header}\n{'-' * len(header)}")
            for page in _pages(samples):
                median, worst, status = _time(client, page.path, repeats)
                ok = ok and status in (200, 303) and median < BUDGET_MS
                print(f"{page.name:44} {median:10.1f} {worst:8.1f} {status:7}", flush=True)
            if samples["failure_id"]:
                path = f"/console/failures/{samples['failure_id']}/replay"
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    response = client.post(path, data={"csrf": csrf})
                    times.append((time.perf_counter() - started) * 1000)
                median = statistics.median(times)
                ok = ok and response.status_code == 303 and median < BUDGET_MS
                name = "replay one failure (POST)"
                print(f"{name:44} {median:10.1f} {max(times):8.1f} {response.status_code:7}")
    finally:
        asyncio.run(_close_failure(url, samples["failure_id"]))
    print(f"\nevery page under {BUDGET_MS:.0f} ms (median): {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__)
    add_ledger_arguments(parser)
    parser.add_argument("--repeats", type=int, default=9, help="timed requests per page (9)")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or PANDASYNC_TEST_DATABASE_URL) is required")
    name = f"pandasync_bench_reporting_{args.orders}"
    url = with_database(args.database_url, name)
    asyncio.run(_ensure_database(args.database_url, name))
    from service.ledger.migrations import run_migrations

    run_migrations(url)
    return 0 if run(url, args.orders, args.repeats) else 1


if __name__ == "__main__":
    sys.exit(main())
