"""Chaos soak: the whole system under load and faults, and nothing lost (issue 9).

Real processes: the sandbox, two ``pandasync serve`` behind a load balancer, two
``pandasync worker`` on a broker and a Postgres of the soak's own, and the scheduler. Orders
live their lives through the sandbox while its callbacks are dropped, duplicated, reordered
and delayed, its query APIs answer 5xx, 429 and time out, bad clients knock at a steady rate,
and a worker, the broker, a web process and Postgres are taken down and brought back. Then the
scheduler is allowed two more sweeps, and the ledger must equal the truth. It runs once per
broker: Redis and RabbitMQ (one Postgres for both, a database cloned from one migrated template
each).

Size: ``PANDASYNC_SOAK_ORDERS`` (CI default below; ``make soak`` runs 20,000). Figures are
printed, and written to ``PANDASYNC_SOAK_REPORT`` with the broker's name added
(``soak.json``: ``soak-redis.json``, ``soak-rabbitmq.json``); docs/reliability.md publishes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import pytest

from service.broker import make_broker, queue_depth
from service.config import load_settings
from service.db import asyncpg_dsn
from service.ledger.migrations import run_migrations
from service.pandapon.signer import Credentials
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID
from tests.soak.balancer import Balancer
from tests.soak.servers import (
    DedicatedPostgres,
    DedicatedRabbitMQ,
    DedicatedRedis,
    rabbitmq_server,
)
from tests.soak.traffic import (
    BAD_MARKER,
    DECIDED_AT_STORE,
    EXPECTED,
    BadRequest,
    Progress,
    bad_clients,
    describe,
    drive,
)
from tests.support.ledger_truth import (
    expected_refund_state,
    knowable_refund_status,
    ledger_mismatches,
)
from tests.support.stack import Stack

ORDERS = int(os.environ.get("PANDASYNC_SOAK_ORDERS", "2000"))  # CI: see docs/reliability.md
SEED = int(os.environ.get("PANDASYNC_SOAK_SEED", "9"))
LANES = 8  # orders living at once
BAD_RATE_PER_S = 12.0
SWEEP_INTERVAL_S = 15
PG_DOWN_S = 5.0
BROKER_DOWN_S = 3.0  # then as long as the broker takes to start again
PROCESS_DOWN_S = 2.0
# A deadline to fail by, never a figure: the ledger either converges or shows what differs.
SETTLE_AFTER_LAST_SWEEP_S = 300.0

CREDENTIALS = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)
# Plus the poisoned upstream (issue 16): parseable answers that cannot be true, error texts
# Postgres cannot store, and now and then a Retry-After of a day.
UPSTREAM_FAULTS = {"*": {"server_error": 0.10, "rate_limit": 0.05, "retry_after_s": 1,
                         "timeout": 0.02, "timeout_s": 5, "unstorable_error": 0.01,
                         "far_future": 0.02, "negative_amount": 0.02,
                         "huge_retry_after": 0.002}}  # fmt: skip
DELIVERY = {"drop": 0.05, "duplicate": 0.20, "reorder": 0.20, "delay": 0.02, "delay_s": 5.0}

pytestmark = [pytest.mark.soak, pytest.mark.e2e]

ON_CI = bool(os.environ.get("CI"))
TEMPLATE_DB = "pandasync_template"


class DedicatedBroker(Protocol):
    name: str

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...  # as a crash

    def close(self) -> None: ...


# How the processes reach the broker: a Redis that hangs must not hold a sender for long.
CLIENT_URL = {"redis": "{}?socket_timeout=5&socket_connect_timeout=2", "rabbitmq": "{}"}


@pytest.fixture(scope="module")
async def soak_postgres() -> AsyncIterator[DedicatedPostgres]:
    """One Postgres for every broker's run: initdb and the migrations once, into a template."""
    pg = DedicatedPostgres()
    try:
        await asyncio.to_thread(pg.init)
        await fetch(pg.url(), f"CREATE DATABASE {TEMPLATE_DB}")
        await asyncio.to_thread(run_migrations, pg.url(TEMPLATE_DB))
        yield pg
    finally:
        await asyncio.to_thread(pg.close)


@pytest.fixture(params=["redis", "rabbitmq"])
def soak_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DedicatedBroker]:
    """A broker of the soak's own, not started yet; shut down cleanly at the end."""
    broker: DedicatedBroker
    if request.param == "redis":
        broker = DedicatedRedis(tmp_path)
    else:
        server = rabbitmq_server()
        if server is None:
            message = "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
            if ON_CI:
                pytest.fail(message)
            pytest.skip(message)
        broker = DedicatedRabbitMQ(tmp_path, server)
    try:
        yield broker
    finally:
        broker.close()


@dataclass
class Timeline:
    """What was done when (time.monotonic()), for the report and the checks."""

    t0: float = field(default_factory=time.monotonic)
    faults: list[tuple[str, float, float]] = field(default_factory=list)  # what, down, up

    def windows(self, what: str) -> list[tuple[float, float]]:
        return [(down, up) for name, down, up in self.faults if name == what]


# A deadline to fail by: a web process boots in seconds, several times that on a busy machine.
async def wait_healthy(port: int, within_s: float = 90.0) -> None:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"web process on {port} not healthy in time")
            await asyncio.sleep(0.1)


async def until(progress: Progress, fraction: float) -> None:
    while progress.fraction < fraction and progress.done < progress.total:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def chaos(
    stack: Stack,
    broker: DedicatedBroker,
    pg: DedicatedPostgres,
    progress: Progress,
    tl: Timeline,
) -> None:
    """The process faults, each at a point of the traffic (not of the clock)."""
    await until(progress, 0.15)
    down = time.monotonic()
    stack.roles["worker0"].kill()  # SIGKILL, the whole process group
    await asyncio.sleep(PROCESS_DOWN_S)
    stack.roles["worker0"].start()
    tl.faults.append(("worker0 SIGKILL", down, time.monotonic()))

    await until(progress, 0.30)
    down = time.monotonic()
    # SIGKILL: Redis loses everything queued, RabbitMQ what it had not yet written.
    await asyncio.to_thread(broker.stop)
    await asyncio.sleep(BROKER_DOWN_S)
    await asyncio.to_thread(broker.start)
    tl.faults.append((f"{broker.name} restart", down, time.monotonic()))

    await until(progress, 0.45)
    down = time.monotonic()
    stack.roles["web1"].kill()
    await asyncio.sleep(PROCESS_DOWN_S)
    stack.roles["web1"].start()
    await wait_healthy(stack.web_ports[1])
    tl.faults.append(("web1 SIGKILL", down, time.monotonic()))

    await until(progress, 0.60)
    down = time.monotonic()
    await asyncio.to_thread(pg.stop)  # pg_ctl stop -m immediate
    await asyncio.sleep(PG_DOWN_S)
    await asyncio.to_thread(pg.start)
    tl.faults.append(("postgres restart", down, time.monotonic()))


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def _amount(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value)).quantize(Decimal("0.01"))


QUICK = """
SELECT o.platform, o.order_id, o.status, o.total_amount, o.refunded_amount, o.refund_state,
       (SELECT count(*) FROM shipment_events e JOIN shipments s ON s.id = e.shipment_id
         WHERE s.order_pk = o.id) AS events,
       (SELECT count(*) FROM refunds r WHERE r.order_pk = o.id) AS refunds,
       (SELECT string_agg(r.status, ',' ORDER BY r.refund_id) FROM refunds r
         WHERE r.order_pk = o.id) AS refund_statuses
FROM orders o WHERE o.account_id = $1
"""


def quick_key(truth: dict[str, Any]) -> tuple[Any, ...]:
    return (
        truth["status"],
        _amount(truth["total_amount"]),
        _amount(truth["refunded_amount"]),
        expected_refund_state(truth["refunds"]),
        sum(len(s["events"]) for s in truth["shipments"]),
        len(truth["refunds"]),
        ",".join(
            knowable_refund_status(r)
            for r in sorted(truth["refunds"], key=lambda r: r["refund_id"])
        )
        or None,
    )


async def quick_drift(url: str, truths: list[dict[str, Any]]) -> int:
    """Orders whose headline figures differ from the truth (a cheap test before the full one)."""
    rows = {
        (r["platform"], r["order_id"]): (
            r["status"],
            _amount(r["total_amount"]),
            _amount(r["refunded_amount"]),
            r["refund_state"],
            r["events"],
            r["refunds"],
            r["refund_statuses"],
        )
        for r in await fetch(url, QUICK, DEV_USER_ID)
    }
    return sum(rows.get((t["platform"], t["order_id"])) != quick_key(t) for t in truths)


async def converge(
    stack: Stack,
    truths: list[dict[str, Any]],
    last_fault: tuple[float, datetime],
    report: dict[str, Any],
) -> float | None:
    """Poll until the ledger equals the truth. Two sweeps after the last fault, the scheduler
    is stopped: whatever is not right by then, plus the work they queued, never will be."""
    url = stack.database_url
    seen: dict[str, set[datetime]] = {}
    started, last_fault_db = last_fault
    settle_deadline: float | None = None
    while True:
        drift = await quick_drift(url, truths)
        if drift == 0 and not await ledger_mismatches(url, DEV_USER_ID, truths):
            report["sweeps_after_last_fault"] = min((len(v) for v in seen.values()), default=0)
            return time.monotonic() - started
        report["last_quick_drift"] = drift
        if settle_deadline is None:
            for r in await fetch(url, "SELECT * FROM job_runs WHERE job LIKE 'sweep:%'"):
                finished, began = r["last_finished_at"], r["last_started_at"]
                if finished is not None and began > last_fault_db and finished >= began:
                    seen.setdefault(r["job"], set()).add(began)
            if len(seen) == 2 and all(len(v) >= 2 for v in seen.values()):
                stack.roles["scheduler"].stop()
                report["sweeps_after_last_fault"] = 2
                settle_deadline = time.monotonic() + SETTLE_AFTER_LAST_SWEEP_S
        elif time.monotonic() > settle_deadline:
            return None
        await asyncio.sleep(1.0)


@dataclass
class QueueDepth:
    """Reconciles waiting in the broker, sampled every second: (time.monotonic(), depth)."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    async def watch(self, broker_url: str, stop: asyncio.Event) -> None:
        """As ``pandasync status`` reads it (delayed retries included); no sample while the
        broker cannot be read."""
        broker = make_broker(load_settings(broker_url=broker_url))
        try:
            while not stop.is_set():
                waiting = await asyncio.to_thread(queue_depth, broker)
                if waiting is not None:
                    self.samples.append((time.monotonic(), waiting))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            broker.close()

    def each_minute(self, t0: float) -> dict[int, int]:
        first: dict[int, int] = {}
        for t, n in self.samples:
            first.setdefault(int((t - t0) // 60), n)
        return first

    def figures(self, t0: float, traffic_end: float) -> dict[str, Any]:
        after = [(t, n) for t, n in self.samples if t >= traffic_end]
        emptied = next((t for t, n in after if n == 0), None)
        return {
            "max": max((n for _, n in self.samples), default=0),
            "at_traffic_end": after[0][1] if after else None,
            "empty_after_traffic_s": None if emptied is None else round(emptied - traffic_end, 1),
            "at_end": self.samples[-1][1] if self.samples else None,
            "each_minute": list(self.each_minute(t0).values()),
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.mark.timeout(int(os.environ.get("PANDASYNC_SOAK_TIMEOUT_S", "1200")))
async def test_chaos_soak_loses_nothing(
    soak_postgres: DedicatedPostgres,
    soak_broker: DedicatedBroker,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    pg, broker = soak_postgres, soak_broker
    report: dict[str, Any] = {"broker": broker.name, "orders": ORDERS, "seed": SEED}
    balancer = Balancer([])
    stack: Stack | None = None
    tl = Timeline()
    depth = QueueDepth()
    stop_watching = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    try:
        # The broker boots (RabbitMQ: seconds) while its database is cloned.
        began = time.monotonic()
        starting = asyncio.create_task(asyncio.to_thread(broker.start))
        database = f"pandasync_{broker.name}"
        await fetch(pg.url(), f"CREATE DATABASE {database} TEMPLATE {TEMPLATE_DB}")
        database_url = pg.url(database)
        balancer.start()
        await starting
        report["broker_start_s"] = round(time.monotonic() - began, 1)
        stack = Stack(
            database_url,
            CLIENT_URL[broker.name].format(broker.url),
            tmp_path,
            settings={
                "PANDASYNC_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S),
                "PANDASYNC_SWEEP_LOOKBACK_S": "120",
                "PANDASYNC_REQUEUE_AFTER_S": "10",
            },
            sandbox_settings={
                "PANDASYNC_SANDBOX_SEED": str(SEED),
                "PANDASYNC_SANDBOX_DELIVERY__WEBHOOK_URL": balancer.url,
            },
        )
        await stack.start(scheduler=True, workers=2, webs=2)
        balancer.backends = list(stack.web_ports)
        tl.t0 = time.monotonic()
        watcher = asyncio.create_task(depth.watch(broker.url, stop_watching))

        async with SandboxRemote(stack.sandbox_url) as sb:
            await sb.set_faults(UPSTREAM_FAULTS)
            await sb.configure_delivery(**DELIVERY)
            progress = Progress(ORDERS)
            stop_bad = asyncio.Event()
            bad: list[BadRequest] = []
            bad_task = asyncio.create_task(
                bad_clients(
                    stack.web_ports,
                    CREDENTIALS,
                    balancer.captured,
                    stop_bad,
                    bad,
                    rate_per_s=BAD_RATE_PER_S,
                )
            )
            chaos_task = asyncio.create_task(chaos(stack, broker, pg, progress, tl))
            await drive(stack.sandbox_url, ORDERS, seed=SEED, concurrency=LANES, progress=progress)
            traffic_s = time.monotonic() - tl.t0
            await chaos_task
            await sb.clear_faults()
            last_fault = time.monotonic()
            [[last_fault_db]] = await fetch(database_url, "SELECT now()")
            drained = await sb.drain(within_s=120)
            stop_bad.set()
            await bad_task
            truths = await sb.orders()
            callbacks = await sb.callbacks(limit=1)
            outcomes = await sb.outcomes()

        convergence_s = await converge(stack, truths, (last_fault, last_fault_db), report)
        problems = await ledger_mismatches(database_url, DEV_USER_ID, truths)
        stop_watching.set()

        # --- figures ------------------------------------------------------------------------
        exchanges = list(balancer.exchanges)
        acked = [e for e in exchanges if e.status == 200]
        latencies = [e.latency_s for e in acked]
        upstream = Counter[str]()
        for counts in outcomes.values():
            upstream.update({k: v for k, v in counts.items() if k != "ok"})
        report.update(
            {
                "traffic_s": round(traffic_s, 1),
                "order_changes": dict(progress.changes),
                "callbacks": callbacks["states"],
                "callback_deliveries": dict(Counter(str(e.status) for e in exchanges)),
                "ack_latency_s": {
                    "p50": round(percentile(latencies, 0.5), 4),
                    "p99": round(percentile(latencies, 0.99), 4),
                    "max": round(max(latencies, default=0.0), 4),
                    "mean": round(statistics.fmean(latencies), 4) if latencies else 0.0,
                    "over_1s": sum(latency > 1.0 for latency in latencies),
                    # When the slowest came, to set beside the process faults.
                    "slowest": [
                        {
                            "at_s": round(e.started - tl.t0, 1),
                            "s": round(e.latency_s, 3),
                            "web": e.backend,
                        }
                        for e in sorted(acked, key=lambda e: e.latency_s)[-5:]
                    ],
                },
                "upstream_faults": dict(upstream),
                "process_faults": [
                    {"what": what, "at_s": round(d - tl.t0, 1), "down_s": round(u - d, 1)}
                    for what, d, u in tl.faults
                ],
                "bad_requests": dict(Counter(describe(b) for b in bad)),
                "convergence_after_last_fault_s": (
                    None if convergence_s is None else round(convergence_s, 1)
                ),
                "drained": drained["drained"],
                "broker_queue": depth.figures(tl.t0, tl.t0 + traffic_s),
                "drift": len({p.split(":")[0] for p in problems}),
            }
        )

        # --- checks -------------------------------------------------------------------------
        inbox = {
            r["sha"]
            for r in await fetch(
                database_url, "SELECT encode(sha256(raw_body), 'hex') AS sha FROM webhook_inbox"
            )
        }
        lost = [e for e in acked if e.body_sha256 not in inbox]
        report["acked_not_in_inbox"] = len(lost)
        history_dupes = await fetch(
            database_url,
            "SELECT order_pk, from_raw_status, to_raw_status FROM order_status_history "
            "GROUP BY 1, 2, 3 HAVING count(*) > 1",
        )
        price_noops = await fetch(
            database_url,
            "SELECT id FROM order_price_changes WHERE old_total_amount = new_total_amount",
        )
        event_dupes = await fetch(
            database_url,
            "SELECT shipment_id FROM shipment_events "
            "GROUP BY shipment_id, event_at, description HAVING count(*) > 1",
        )
        [[bad_stored]] = await fetch(
            database_url,
            "SELECT count(*) FROM webhook_inbox "
            "WHERE position(convert_to($1, 'UTF8') IN raw_body) > 0",
            BAD_MARKER,
        )
        [[ledger_orders]] = await fetch(database_url, "SELECT count(*) FROM orders")
        [[unprocessed]] = await fetch(
            database_url,
            "SELECT count(*) FROM webhook_inbox WHERE state IN ('received', 'queued')",
        )
        report["inbox_unprocessed_at_end"] = unprocessed
        report["bad_stored"] = bad_stored

        pg_down = tl.windows("postgres restart")
        web1_down = tl.windows("web1 SIGKILL")

        # A 503 counts as "while Postgres was down" when the request began before Postgres
        # was back, or before the first request to that process after it was back succeeded.
        recovered: dict[int, float] = {}
        for b in sorted(bad, key=lambda b: b.finished):
            if pg_down and b.started > pg_down[0][1] and b.status == EXPECTED[b.kind]:
                recovered.setdefault(b.target, b.finished)
        wrong_bad = [
            b
            for b in bad
            if b.status != EXPECTED[b.kind]
            # In flight while Postgres was down, or before that process stored again after.
            and not (
                b.status == 503
                and pg_down
                and b.finished >= pg_down[0][0]
                and b.started < recovered.get(b.target, float("inf"))
            )
            # A replayed nonce is known only at the inbox write: a store too busy to answer within
            # INBOX_WRITE_TIMEOUT_MS gives it the 503 every message gets then, and stores nothing.
            and not (b.kind in DECIDED_AT_STORE and b.status == 503 and b.error == "store_timeout")
            # In flight to, or sent to, the web process while it was down.
            and not (
                b.status is None
                and b.target == 1
                and any(b.finished >= down and b.started <= up for down, up in web1_down)
            )
            and not (b.kind == "oversized" and b.status is None)
        ]
        report["bad_unexpected"] = [
            f"{describe(b)} -> web{b.target} at {b.started - tl.t0:.1f}s" for b in wrong_bad[:20]
        ]
        report["bad_5xx"] = sum(1 for b in bad if b.status is not None and b.status >= 500)
        write_report(report, request)

        assert not progress.errors, progress.errors[:10]
        assert convergence_s is not None, "\n".join(problems[:40])
        assert problems == []
        assert ledger_orders == len(truths)
        assert lost == [], f"{len(lost)} message(s) answered 200 are not in the inbox"
        assert history_dupes == []
        assert price_noops == []
        assert event_dupes == []
        assert bad_stored == 0
        assert wrong_bad == [], report["bad_unexpected"]
    finally:
        stop_watching.set()
        if watcher is not None:
            await watcher
        if stack is not None:
            stack.stop()
            print(stack.logs())
        balancer.close()


def write_report(report: dict[str, Any], request: pytest.FixtureRequest) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
    target = os.environ.get("PANDASYNC_SOAK_REPORT")
    if target:
        path = Path(target)  # one file per broker: soak.json -> soak-redis.json
        path.with_name(f"{path.stem}-{report['broker']}{path.suffix}").write_text(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line("soak report:")
        for line in text.splitlines():
            reporter.write_line(line)
