"""The refund sweep against the sandbox over real sockets, on real Postgres.

What it asks for (one reconcile per refund the ledger lacks or holds out of date, naming the
refund), the bookkeeping it keeps in ``refund_sweep_cursors``, and that the reconcile it asks
for brings back a refund the order detail no longer names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.broker import RECONCILE_QUEUE
from service.db import make_sessionmaker, session_scope
from service.ledger.models import Platform, Refund, RefundSweepCursor, SyncSource
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.errors import UpstreamServerError
from tests.support.servers import SandboxServer
from workers.reconcile import ReconcileRequest, reconcile_order
from workers.scheduler import default_jobs, enqueue_with
from workers.sweeps import SweepReport, refund_sweep

pytest_plugins = ["tests.support.sandbox"]

ACCOUNT = "acct-refunds"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
DAY = timedelta(days=1)
LINES = [
    {"title": "保温杯", "quantity": 1, "unit_price": "80"},
    {"title": "杯套", "quantity": 2, "unit_price": "10"},
]

Sent = tuple[str, Platform, str, SyncSource, "str | None"]


class Recorder:
    """An ``EnqueueNaming``: records the reconciles a sweep asks for."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def __call__(
        self,
        account_id: str,
        platform: Platform,
        order_id: str,
        source: SyncSource,
        refund_id: str | None,
    ) -> None:
        self.sent.append((account_id, platform, order_id, source, refund_id))

    @property
    def refunds(self) -> list[str | None]:
        return sorted(r for *_, r in self.sent if r is not None)


@dataclass
class Ledger:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    client: PandaPonClient

    async def sweep(
        self, platform: Platform = TB, *, lookback: timedelta = DAY, page_size: int = 50
    ) -> tuple[SweepReport, Recorder]:
        sent = Recorder()
        report = await refund_sweep(
            self.sessions,
            self.client,
            sent,
            ACCOUNT,
            platform,
            lookback=lookback,
            page_size=page_size,
        )
        return report, sent

    async def reconcile(
        self, platform: Platform, order_id: str, refund_id: str | None = None
    ) -> None:
        request = ReconcileRequest(
            ACCOUNT, platform, order_id, SyncSource.SWEEP, refund_id=refund_id
        )
        await reconcile_order(self.engine, self.sessions, self.client, request)

    async def refunds(self) -> dict[str, tuple[str, Decimal | None]]:
        async with self.sessions() as session:
            rows = await session.execute(select(Refund.refund_id, Refund.status, Refund.amount))
        return {refund_id: (status.value, amount) for refund_id, status, amount in rows.all()}

    async def cursor(self, platform: Platform = TB) -> RefundSweepCursor:
        async with self.sessions() as session:
            cursor = await session.get(RefundSweepCursor, (ACCOUNT, platform))
        assert cursor is not None
        return cursor


@asynccontextmanager
async def ledger_on(
    database_url: str, server: SandboxServer, **overrides: Any
) -> AsyncIterator[Ledger]:
    engine = create_async_engine(database_url)
    settings = server.service_settings(**overrides)
    try:
        async with make_http_client(settings) as http:
            yield Ledger(engine, make_sessionmaker(engine), PandaPonClient(settings, http))
    finally:
        await engine.dispose()


async def settled(server: SandboxServer) -> None:
    """Wait until every change of the world is in the past: the sandbox stamps two changes of
    one order a second apart, ahead of the clock, and a sweep lists up to now."""
    latest = max(datetime.fromisoformat(o["modified_at"]) for o in await server.remote.orders())
    await asyncio.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds() + 1.0))


async def paid_order(server: SandboxServer, platform: Platform) -> dict[str, Any]:
    order = await server.remote.create_order(platform, LINES, shipping_fee="5")
    return await server.remote.pay(platform, order["order_id"])


async def superseded_refund(server: SandboxServer, platform: Platform) -> tuple[str, str, str]:
    """(order id, R1, R2): R1 refunded on a line, then R2 opened on the same line, so the order
    detail names only R2."""
    order = await paid_order(server, platform)
    order_id, line_id = order["order_id"], order["lines"][0]["line_id"]
    first = await server.remote.open_refund(platform, order_id, "30", line_id=line_id)
    await server.remote.resolve_refund(platform, first["refund_id"], "refunded")
    second = await server.remote.open_refund(platform, order_id, "20", line_id=line_id)
    await settled(server)
    return order_id, first["refund_id"], second["refund_id"]


@pytest.mark.parametrize("platform", [TB, AL])
async def test_a_refund_the_order_no_longer_names_is_found_and_reconciled(
    fresh_database_url: str, sandbox_server: SandboxServer, platform: Platform
) -> None:
    order_id, r1, r2 = await superseded_refund(sandbox_server, platform)
    async with ledger_on(fresh_database_url, sandbox_server) as ledger:
        # What a reconcile of the order finds by itself: only the refund its detail names.
        await ledger.reconcile(platform, order_id)
        assert set(await ledger.refunds()) == {r2}

        report, sent = await ledger.sweep(platform)
        assert sent.sent == [(ACCOUNT, platform, order_id, SyncSource.SWEEP, r1)]
        assert (report.examined, report.drift, report.unreadable, report.pages) == (2, 1, 0, 1)

        await ledger.reconcile(platform, order_id, r1)
        assert await ledger.refunds() == {
            r1: ("refunded", Decimal("30.00")),
            r2: ("requested", Decimal("20.00")),
        }
        cursor = await ledger.cursor(platform)
        assert (cursor.last_examined, cursor.last_drift) == (2, 1)

        # Nothing differs any more: the next sweep asks for nothing.
        report, sent = await ledger.sweep(platform)
        assert (report.examined, report.drift, sent.sent) == (2, 0, [])
        assert (await ledger.cursor(platform)).last_drift == 0


async def test_drift_is_what_is_missing_changed_or_older_unless_a_message_names_it(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    remote = sandbox_server.remote
    refunds: dict[str, tuple[str, str]] = {}  # name -> (order id, refund id)
    for name in ("same", "older", "other_status", "missing", "awaited"):
        order = await paid_order(sandbox_server, TB)
        refund = await remote.open_refund(TB, order["order_id"], "10")
        refunds[name] = (order["order_id"], refund["refund_id"])
    await settled(sandbox_server)
    async with ledger_on(fresh_database_url, sandbox_server) as ledger:
        for name in ("same", "older", "other_status", "awaited"):
            await ledger.reconcile(TB, refunds[name][0])
        rid = {name: refund_id for name, (_, refund_id) in refunds.items()}
        async with session_scope(ledger.sessions) as session:
            await session.execute(
                update(Refund)
                .where(Refund.refund_id == rid["older"])
                .values(upstream_modified_at=Refund.upstream_modified_at - timedelta(minutes=5))
            )
            await session.execute(
                update(Refund).where(Refund.refund_id == rid["other_status"]).values(raw_status="X")
            )
            await session.execute(
                update(Refund).where(Refund.refund_id == rid["awaited"]).values(raw_status="X")
            )
            # A refund message about it waits in the inbox: its reconcile is on its way.
            await session.execute(
                text(
                    "INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, "
                    "platform, order_id, refund_id, raw_body, headers, state) VALUES (:account, "
                    "'k1', 'TAOBAO_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND', 'refund', 'taobao', "
                    ":order_id, :refund_id, '', '{}', 'queued')"
                ),
                {
                    "account": ACCOUNT,
                    "order_id": refunds["awaited"][0],
                    "refund_id": rid["awaited"],
                },
            )
        await remote.reset_calls()

        report, sent = await ledger.sweep(TB, page_size=2)

    assert sent.refunds == sorted([rid["older"], rid["other_status"], rid["missing"]])
    assert {(o, r) for _, _, o, _, r in sent.sent} == {
        refunds[name] for name in ("older", "other_status", "missing")
    }
    assert (report.examined, report.drift, report.pages) == (5, 3, 3)
    assert (await remote.calls())["taobao_refund_list"] == 3


async def test_the_cursor_moves_and_the_next_sweep_starts_a_lookback_before_it(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    await superseded_refund(sandbox_server, TB)
    async with ledger_on(fresh_database_url, sandbox_server) as ledger:
        first, _ = await ledger.sweep(TB)
        cursor = await ledger.cursor(TB)
        assert cursor.cursor_at == first.window_end
        assert cursor.last_finished_at is not None
        assert first.window_end - first.window_start == DAY  # no cursor yet: now − lookback

        # Put the cursor an hour ahead: a short lookback leaves the refunds outside the window.
        ahead = first.window_end + timedelta(hours=1)
        async with session_scope(ledger.sessions) as session:
            await session.execute(update(RefundSweepCursor).values(cursor_at=ahead))
        short, sent = await ledger.sweep(TB, lookback=timedelta(minutes=30))
        assert short.window_start == ahead - timedelta(minutes=30)
        assert (short.examined, sent.sent) == (0, [])
        assert (await ledger.cursor(TB)).cursor_at == short.window_end

        # From the cursor now stored, a lookback of a day reaches them again.
        wide, sent = await ledger.sweep(TB, lookback=DAY)
        assert wide.window_start == short.window_end - DAY
        assert (wide.examined, wide.drift) == (2, 2)


async def test_a_failed_page_leaves_the_cursor_where_it_was(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    for _ in range(3):
        await superseded_refund(sandbox_server, AL)
    async with ledger_on(fresh_database_url, sandbox_server) as ledger:
        done, _ = await ledger.sweep(AL)
        assert done.examined == 6
        await sandbox_server.remote.set_faults({"alibaba_refund_list": {"server_error": 1.0}})
        with pytest.raises(UpstreamServerError):
            await ledger.sweep(AL, page_size=2)
        cursor = await ledger.cursor(AL)
        assert cursor.cursor_at == done.window_end
        assert cursor.last_started_at is not None
        assert cursor.last_started_at > done.window_end
        assert cursor.last_finished_at is not None
        assert cursor.last_finished_at < cursor.last_started_at
        assert (cursor.last_examined, cursor.last_drift) == (6, 6)  # the last finished sweep's


async def test_unreadable_records_are_counted_and_their_orders_reconciled(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    # A Taobao refund list answering records the Taobao mapping cannot read (here: 1688's,
    # by pointing the Taobao list at the 1688 one): each is set aside, and its order is
    # reconciled with the refund it names, so the failure at least lands in sync_failures.
    _, r1, r2 = await superseded_refund(sandbox_server, AL)
    odd = {"taobao_refund_list": {"path": "/alibaba/refund/page"}}
    async with ledger_on(fresh_database_url, sandbox_server, endpoint_overrides=odd) as ledger:
        report, sent = await ledger.sweep(TB)
        assert (report.examined, report.unreadable, report.drift) == (2, 2, 2)
        assert sent.refunds == sorted([r1, r2])
        cursor = await ledger.cursor(TB)
        assert cursor.last_finished_at is not None
        assert (cursor.last_examined, cursor.last_drift) == (2, 2)


# --- what the scheduler makes of it ---------------------------------------------------------------


def test_the_scheduler_sends_the_refund_id_with_the_reconcile() -> None:
    broker = StubBroker()
    broker.declare_queue(RECONCILE_QUEUE)
    enqueue = enqueue_with(broker)
    enqueue(ACCOUNT, TB, "O1", SyncSource.SWEEP, "R1")
    enqueue(ACCOUNT, TB, "O2", SyncSource.SWEEP)
    named, plain = (
        dramatiq.Message.decode(data) for data in list(broker.queues[RECONCILE_QUEUE].queue)
    )
    assert named.args == (ACCOUNT, "taobao", "O1")
    assert named.kwargs["refund_id"] == "R1"
    assert named.kwargs["source"] == "sweep"
    # Other messages keep their shape (and messages already queued have none: the actor's
    # refund_id defaults to None).
    assert "refund_id" not in plain.kwargs


async def test_the_scheduler_has_a_refund_sweep_per_platform(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    settings = sandbox_server.service_settings(
        refund_sweep_interval_s=120, sweep_interval_s=60, user_id="u1"
    )
    engine = create_async_engine(fresh_database_url)
    try:
        async with make_http_client(settings) as http:
            client = PandaPonClient(settings, http)
            jobs = {
                j.name: j
                for j in default_jobs(settings, make_sessionmaker(engine), client, StubBroker())
            }
    finally:
        await engine.dispose()
    assert {"refund_sweep:taobao", "refund_sweep:1688", "sweep:taobao", "sweep:1688"} <= set(jobs)
    assert jobs["refund_sweep:1688"].interval == timedelta(seconds=120)
    assert jobs["sweep:1688"].interval == timedelta(seconds=60)
    assert jobs["refund_sweep:taobao"].backlog is not None  # held back like the order sweep


async def test_a_scheduled_refund_sweep_records_its_run(
    fresh_database_url: str, sandbox_server: SandboxServer
) -> None:
    await superseded_refund(sandbox_server, TB)
    account = sandbox_server.settings.user_id  # the scheduler sweeps the configured account
    settings = sandbox_server.service_settings()
    engine = create_async_engine(fresh_database_url)
    broker = StubBroker()
    broker.declare_queue(RECONCILE_QUEUE)
    try:
        sessions = make_sessionmaker(engine)
        async with make_http_client(settings) as http:
            client = PandaPonClient(settings, http)
            jobs = {j.name: j for j in default_jobs(settings, sessions, client, broker)}
            report = await jobs["refund_sweep:taobao"].run()
        assert isinstance(report, SweepReport)
        assert (report.examined, report.drift) == (2, 2)
        async with sessions() as session:
            examined = await session.scalar(
                select(func.sum(RefundSweepCursor.last_examined)).where(
                    RefundSweepCursor.account_id == account
                )
            )
        assert examined == 2
        assert len(broker.queues[RECONCILE_QUEUE].queue) == 2
    finally:
        await engine.dispose()
