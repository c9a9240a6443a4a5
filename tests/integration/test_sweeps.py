"""Sweep, refresh and backfill: what they enqueue and the bookkeeping they keep."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import create_async_engine

from service.db import make_sessionmaker, session_scope
from service.ledger.models import BackfillRun, Order, OrderStatus, Platform, SweepCursor, SyncSource
from service.ledger.write import OrderTruth, write_order
from service.pandapon.models import OrderListPage, OrderSnapshot, UnreadableRecord
from workers.backfill import backfill, backfill_done_count, unfinished_backfill_until
from workers.sweeps import refresh, sweep

ACCOUNT = "acct"
NOW = datetime.now(UTC)


def snap(
    order_id: str, modified: datetime, status: OrderStatus = OrderStatus.PAID
) -> OrderSnapshot:
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=order_id,
        status=status,
        raw_status=status.value,
        modified_at=modified,
    )


class ListedOrders:
    """The order-list endpoint at the PandaPon boundary: pages over a fixed list."""

    def __init__(self, orders: list[OrderSnapshot], fail_on_page: int | None = None) -> None:
        self.orders = orders
        self.fail_on_page = fail_on_page
        self.pages: list[int] = []

    async def order_page(
        self,
        platform: Platform,
        page_no: int,
        page_size: int,
        modified_start: datetime,
        modified_end: datetime,
    ) -> OrderListPage:
        if page_no == self.fail_on_page:
            self.fail_on_page = None
            raise ConnectionError("upstream went away")
        self.pages.append(page_no)
        matching = [
            o
            for o in self.orders
            if o.modified_at and modified_start <= o.modified_at < modified_end
        ]
        chunk = matching[(page_no - 1) * page_size : page_no * page_size]
        return OrderListPage(
            total=len(matching), page_no=page_no, page_size=page_size, orders=tuple(chunk)
        )


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Platform, str, SyncSource]] = []

    def __call__(
        self, account_id: str, platform: Platform, order_id: str, source: SyncSource
    ) -> None:
        self.sent.append((account_id, platform, order_id, source))


async def test_sweep_enqueues_missing_and_outdated_orders_and_moves_the_cursor(
    fresh_database_url: str,
) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    t = NOW - timedelta(hours=2)
    async with session_scope(sessions) as session:
        for order_id, modified in (("same", t), ("older", t - timedelta(minutes=5))):
            await write_order(
                session,
                ACCOUNT,
                OrderTruth(snap(order_id, modified), fetched_at=t),
                source=SyncSource.WEBHOOK,
            )
    upstream = ListedOrders(
        [snap("same", t), snap("older", t), snap("missing", t)]
        + [snap(f"bulk{i}", t) for i in range(7)]
    )
    sent = Recorder()
    report = await sweep(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, lookback=timedelta(days=1), page_size=4
    )
    assert report.examined == 10
    assert report.pages == 3
    assert sorted(o for _, _, o, _ in sent.sent) == sorted(
        ["older", "missing", *[f"bulk{i}" for i in range(7)]]
    )
    assert {s for *_, s in sent.sent} == {SyncSource.SWEEP}
    async with sessions() as session:
        cursor = await session.get(SweepCursor, (ACCOUNT, Platform.TAOBAO))
        assert cursor is not None
        assert (cursor.last_examined, cursor.last_drift) == (10, 9)
        assert cursor.cursor_at is not None
        assert cursor.cursor_at >= NOW - timedelta(seconds=5)
    await engine.dispose()


async def test_sweep_leaves_orders_whose_message_is_on_its_way(fresh_database_url: str) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    t = NOW - timedelta(hours=2)
    async with session_scope(sessions) as session:
        for order_id, state in (
            ("waiting", "queued"),
            ("stored", "received"),
            ("done", "processed"),
        ):
            await session.execute(
                text(
                    "INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, "
                    "platform, order_id, raw_body, headers, state) VALUES (:account, :key, "
                    "'ORDER_STATUS', 'status', 'taobao', :order_id, '', '{}', :state)"
                ),
                {"account": ACCOUNT, "key": order_id, "order_id": order_id, "state": state},
            )
    upstream = ListedOrders([snap(o, t) for o in ("waiting", "stored", "done", "lost")])
    sent = Recorder()
    report = await sweep(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, lookback=timedelta(days=1)
    )
    # A reconcile is already coming for the first two; only the others' messages were lost.
    assert sorted(o for _, _, o, _ in sent.sent) == ["done", "lost"]
    assert (report.examined, report.drift) == (4, 2)
    await engine.dispose()


async def test_sweep_retries_an_order_whose_waiting_message_failed(
    fresh_database_url: str,
) -> None:
    """A message left queued behind an open failure waits for `replay`, not for a reconcile:
    the sweep must not count on it (a failure recorded as permanent by mistake would
    otherwise keep the order out of the ledger for good)."""
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    t = NOW - timedelta(hours=2)
    async with session_scope(sessions) as session:
        for order_id in ("failed", "waiting"):
            await session.execute(
                text(
                    "INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, "
                    "platform, order_id, raw_body, headers, state) VALUES (:account, :key, "
                    "'ORDER_STATUS', 'status', 'taobao', :order_id, '', '{}', 'queued')"
                ),
                {"account": ACCOUNT, "key": order_id, "order_id": order_id},
            )
        await session.execute(
            text(
                "INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error)"
                " VALUES (:account, 'taobao', 'failed', 'permanent', 'webhook', 'DBAPIError')"
            ),
            {"account": ACCOUNT},
        )
    upstream = ListedOrders([snap(o, t) for o in ("failed", "waiting")])
    sent = Recorder()
    await sweep(sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, lookback=timedelta(days=1))
    assert [o for _, _, o, _ in sent.sent] == ["failed"]
    await engine.dispose()


class PageWithUnreadable(ListedOrders):
    """One page: a readable order, and two records the mapping set aside."""

    async def order_page(self, *args: Any, **kwargs: Any) -> OrderListPage:
        page = await super().order_page(*args, **kwargs)
        unreadable = (UnreadableRecord("odd", "bad status"), UnreadableRecord(None, "no id"))
        return replace(page, total=page.total + 2, unreadable=unreadable)


async def test_unreadable_records_do_not_stop_a_sweep_or_a_backfill(
    fresh_database_url: str,
) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    upstream = PageWithUnreadable([snap("fine", NOW - timedelta(hours=1))])
    sent = Recorder()
    report = await sweep(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, lookback=timedelta(days=1)
    )
    # The one with an id is reconciled (its detail may read; if not, its failure is recorded).
    assert sorted(o for _, _, o, _ in sent.sent) == ["fine", "odd"]
    assert (report.examined, report.drift, report.unreadable) == (3, 2, 2)
    async with sessions() as session:
        cursor = await session.get(SweepCursor, (ACCOUNT, Platform.TAOBAO))
        assert cursor is not None
        assert cursor.last_finished_at is not None

    sent = Recorder()
    progress = await backfill(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, NOW - timedelta(days=1), NOW
    )
    assert sorted(o for _, _, o, _ in sent.sent) == ["fine", "odd"]
    assert (progress.finished, progress.orders_seen, progress.orders_queued) == (True, 3, 2)
    await engine.dispose()


async def test_a_failed_sweep_leaves_the_cursor_where_it_was(fresh_database_url: str) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    upstream = ListedOrders(
        [snap(f"o{i}", NOW - timedelta(hours=1)) for i in range(6)], fail_on_page=2
    )
    with pytest.raises(ConnectionError, match="upstream went away"):
        await sweep(
            sessions,
            upstream,
            Recorder(),
            ACCOUNT,
            Platform.TAOBAO,
            lookback=timedelta(days=1),
            page_size=4,
        )
    async with sessions() as session:
        cursor = await session.get(SweepCursor, (ACCOUNT, Platform.TAOBAO))
        assert cursor is not None
        assert cursor.cursor_at is None
        assert cursor.last_finished_at is None
    await engine.dispose()


async def test_refresh_picks_non_final_orders_not_synced_lately(fresh_database_url: str) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    async with session_scope(sessions) as session:
        for order_id, status in (
            ("paid", OrderStatus.PAID),
            ("shipped", OrderStatus.SHIPPED),
            ("done", OrderStatus.COMPLETED),
            ("fresh", OrderStatus.PAID),
        ):
            await write_order(
                session,
                ACCOUNT,
                OrderTruth(snap(order_id, NOW, status), fetched_at=NOW),
                source=SyncSource.WEBHOOK,
            )
        await session.execute(
            update(Order)
            .where(Order.order_id != "fresh")
            .values(last_synced_at=func.now() - timedelta(hours=10))
        )
    sent = Recorder()
    assert await refresh(sessions, sent, stale_after=timedelta(hours=6)) == 2
    assert sorted(o for _, _, o, _ in sent.sent) == ["paid", "shipped"]
    await engine.dispose()


async def test_backfill_resumes_after_an_interruption_without_redoing_pages(
    fresh_database_url: str,
) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    since, until = NOW - timedelta(days=30), NOW
    orders = [snap(f"b{i:02d}", NOW - timedelta(days=1, minutes=i)) for i in range(10)]
    upstream = ListedOrders(orders, fail_on_page=2)
    sent = Recorder()
    with pytest.raises(ConnectionError, match="upstream went away"):
        await backfill(
            sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, since, until, page_size=4
        )
    assert upstream.pages == [1]
    progress = await backfill(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, since, until, page_size=4
    )
    assert upstream.pages == [1, 2, 3]
    assert progress.finished
    assert progress.orders_seen == 10
    assert sorted(o for _, _, o, _ in sent.sent) == sorted(o.order_id for o in orders)
    async with sessions() as session:
        runs = (await session.execute(select(BackfillRun))).scalars().all()
        assert len(runs) == 1
        assert runs[0].finished_at is not None
        assert runs[0].next_page == 4
    assert await backfill_done_count(sessions, progress.run_id) == (0, 0)
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM orders"))).scalar_one() == 0
    await engine.dispose()


async def test_a_finished_range_is_not_paged_again_unless_asked(fresh_database_url: str) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    since, until = NOW - timedelta(days=30), NOW
    orders = [snap(f"f{i:02d}", NOW - timedelta(days=1, minutes=i)) for i in range(6)]
    upstream, sent = ListedOrders(orders), Recorder()
    first = await backfill(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, since, until, page_size=4
    )
    assert upstream.pages == [1, 2]
    assert len(sent.sent) == 6

    # The same command again (say, killed while the other platform paged): nothing is listed.
    rerun = await backfill(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, since, until, page_size=4
    )
    assert upstream.pages == [1, 2]
    assert len(sent.sent) == 6
    assert rerun.already_finished
    assert rerun.run_id == first.run_id
    assert (rerun.orders_seen, rerun.pages_done) == (6, 2)

    again = await backfill(
        sessions, upstream, sent, ACCOUNT, Platform.TAOBAO, since, until, page_size=4, again=True
    )
    assert upstream.pages == [1, 2, 1, 2]
    assert len(sent.sent) == 12
    assert not again.already_finished
    assert again.run_id != first.run_id
    await engine.dispose()


async def test_a_range_started_until_now_resumes_on_every_platform(
    fresh_database_url: str,
) -> None:
    """One command pages every platform over one range: the end of the interrupted one."""
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    since, until = NOW - timedelta(days=3), NOW - timedelta(minutes=5)
    async with session_scope(sessions) as session:
        session.add_all(
            [
                BackfillRun(
                    account_id=ACCOUNT,
                    platform=Platform.TAOBAO,
                    since=since,
                    until=until,
                    finished_at=NOW,
                ),
                BackfillRun(
                    account_id=ACCOUNT, platform=Platform.ALIBABA_1688, since=since, until=until
                ),
            ]
        )
    both = [Platform.TAOBAO, Platform.ALIBABA_1688]
    assert await unfinished_backfill_until(sessions, ACCOUNT, both, since) == until
    assert await unfinished_backfill_until(sessions, ACCOUNT, [Platform.TAOBAO], since) is None
    assert await unfinished_backfill_until(sessions, ACCOUNT, both, since - timedelta(1)) is None
    await engine.dispose()
