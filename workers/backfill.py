"""Backfill: page through a time range of the order lists on demand and reconcile everything.

``backfill`` pages one platform's list resumably (the page reached is stored after each page, in
``backfill_runs``) and only *enqueues* reconciles, as the sweeps do; ``run_backfill`` is what
``pandasync backfill`` runs: every platform asked for, then, if asked, waiting until the
workers have synced or failed every order it queued, giving up when nothing moves for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.domain import Platform, SyncSource
from service.ledger.models import BackfillRun, Order, SyncFailure
from workers.sweeps import PAGE_SIZE, Enqueue, OrderLister, set_aside


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    run_id: int
    platform: Platform
    pages_done: int
    orders_seen: int
    orders_queued: int
    finished: bool
    total: int = 0  # orders in the range, as the last page's total said
    already_finished: bool = False  # an earlier command paged this range: nothing was listed


async def backfill(
    sessions: async_sessionmaker[AsyncSession],
    client: OrderLister,
    enqueue: Enqueue,
    account_id: str,
    platform: Platform,
    since: datetime,
    until: datetime,
    *,
    page_size: int = PAGE_SIZE,
    on_page: Callable[[BackfillProgress], None] | None = None,
    again: bool = False,
) -> BackfillProgress:
    """Page through ``[since, until)`` and reconcile every order.

    The latest run of the same range decides: unfinished, it is resumed from its next page;
    finished, nothing is paged again (a command killed while the other platform was paging,
    or while it waited for the workers, must not list this one twice) unless ``again``.
    """
    async with session_scope(sessions) as session:
        run = (
            await session.execute(
                select(BackfillRun)
                .where(
                    BackfillRun.account_id == account_id,
                    BackfillRun.platform == platform,
                    BackfillRun.since == since,
                    BackfillRun.until == until,
                )
                .order_by(BackfillRun.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if run is not None and run.finished_at is not None and not again:
            done = BackfillProgress(
                run.id,
                platform,
                run.next_page - 1,
                run.orders_seen,
                run.orders_queued,
                finished=True,
                total=run.orders_seen,
                already_finished=True,
            )
            if on_page:
                on_page(done)
            return done
        if run is None or run.finished_at is not None:
            run = BackfillRun(account_id=account_id, platform=platform, since=since, until=until)
            session.add(run)
            await session.flush()
        run_id, page_no = run.id, run.next_page or 1
        seen, queued = run.orders_seen or 0, run.orders_queued or 0

    while True:
        page = await client.order_page(platform, page_no, page_size, since, until)
        order_ids = [o.order_id for o in page.orders] + set_aside(platform, page)
        for order_id in order_ids:
            enqueue(account_id, platform, order_id, SyncSource.BACKFILL)
        seen += len(page.orders) + len(page.unreadable)
        queued += len(order_ids)
        finished = not page.orders or page_no * page_size >= page.total
        async with session_scope(sessions) as session:
            await session.execute(
                update(BackfillRun)
                .where(BackfillRun.id == run_id)
                .values(
                    next_page=page_no + 1,
                    orders_seen=seen,
                    orders_queued=queued,
                    finished_at=func.now() if finished else None,
                )
            )
        progress = BackfillProgress(
            run_id, platform, page_no, seen, queued, finished, total=page.total
        )
        if on_page:
            on_page(progress)
        if finished:
            return progress
        page_no += 1


async def backfill_done_count(
    sessions: async_sessionmaker[AsyncSession], run_id: int
) -> tuple[int, int]:
    """(orders of the run's range synced since it started, orders of it in the ledger)."""
    async with sessions() as session:
        run = await session.get(BackfillRun, run_id)
        if run is None:
            return 0, 0
        in_range = and_(
            Order.account_id == run.account_id,
            Order.platform == run.platform,
            Order.upstream_modified_at >= run.since,
            Order.upstream_modified_at < run.until,
        )
        done = (
            await session.execute(
                select(func.count()).where(in_range, Order.last_synced_at >= run.started_at)
            )
        ).scalar_one()
        total = (await session.execute(select(func.count()).where(in_range))).scalar_one()
    return int(done), int(total)


async def unfinished_backfill_until(
    sessions: async_sessionmaker[AsyncSession],
    account_id: str,
    platforms: Sequence[Platform],
    since: datetime,
) -> datetime | None:
    """The end of the latest unfinished run from ``since`` on any of ``platforms``: a command
    started "until now" and interrupted resumes that range on every platform (one range per
    command, so the platforms it had finished are not paged again)."""
    async with sessions() as session:
        until: datetime | None = (
            await session.execute(
                select(BackfillRun.until)
                .where(
                    BackfillRun.account_id == account_id,
                    BackfillRun.platform.in_(platforms),
                    BackfillRun.since == since,
                    BackfillRun.finished_at.is_(None),
                )
                .order_by(BackfillRun.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
    return until


async def backfill_failed_count(sessions: async_sessionmaker[AsyncSession], run_id: int) -> int:
    """Open sync failures of backfill reconciles on the run's platform since it started."""
    async with sessions() as session:
        run = await session.get(BackfillRun, run_id)
        if run is None:
            return 0
        failed = (
            await session.execute(
                select(func.count()).where(
                    SyncFailure.account_id == run.account_id,
                    SyncFailure.platform == run.platform,
                    SyncFailure.source == SyncSource.BACKFILL,
                    SyncFailure.resolved_at.is_(None),
                    SyncFailure.last_failed_at >= run.started_at,
                )
            )
        ).scalar_one()
    return int(failed)


# --- the command's run ------------------------------------------------------------------------


@dataclass
class BackfillTally:
    """One platform's run so far, as ``pandasync backfill`` shows it."""

    run_id: int | None = None
    pages: int = 0
    seen: int = 0
    queued: int = 0
    total: int = 0
    done: int = 0
    failed: int = 0
    paged: bool = False  # every page listed

    def line(self, name: str) -> str:
        return (
            f"backfill {name}: pages {self.pages}, seen {self.seen}"
            f"{f'/{self.total}' if self.total else ''}, queued {self.queued}, "
            f"done {self.done}, failed {self.failed}"
            f"{'' if self.paged else ' (paging)'}"
        )


class BackfillEnd(enum.Enum):
    SYNCED = "synced"  # every order queued was synced or failed
    NOT_WAITED = "not_waited"  # paged; the workers go on without us
    STALLED = "stalled"  # nothing synced for the stall timeout: the rest stays queued


# (tallies by platform, force) -> None: draw the progress; force after the last change.
Show = Callable[[dict[Platform, BackfillTally], bool], None]
TICK_S = 0.5


@dataclass
class BackfillPlan:
    account_id: str
    platforms: Sequence[Platform]
    since: datetime
    until: datetime | None  # None: resume the latest unfinished run from ``since``, else now
    page_size: int = PAGE_SIZE
    again: bool = False  # page a range an earlier run finished
    wait: bool = True
    stall_timeout_s: float = 300.0
    tallies: dict[Platform, BackfillTally] = field(init=False)

    def __post_init__(self) -> None:
        self.tallies = {p: BackfillTally() for p in self.platforms}


async def run_backfill(
    sessions: async_sessionmaker[AsyncSession],
    client: OrderLister,
    enqueue: Enqueue,
    plan: BackfillPlan,
    show: Show,
    already_paged: Callable[[Platform, int], None],
) -> BackfillEnd:
    """Page every platform of ``plan``, then (``plan.wait``) wait for the workers; ``show`` is
    called every ``TICK_S`` and once more, forced, at the end."""
    tallies = plan.tallies

    async def refresh_counts() -> None:
        for tally in tallies.values():
            if tally.run_id is not None:
                tally.done, _ = await backfill_done_count(sessions, tally.run_id)
                tally.failed = await backfill_failed_count(sessions, tally.run_id)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await refresh_counts()
            show(tallies, False)

    def on_page(progress: BackfillProgress) -> None:
        tally = tallies[progress.platform]
        tally.run_id, tally.pages = progress.run_id, progress.pages_done
        tally.seen, tally.queued = progress.orders_seen, progress.orders_queued
        tally.total = max(progress.total, progress.orders_seen)
        tally.paged = progress.finished

    tick = asyncio.create_task(ticker())
    try:
        end = plan.until or await unfinished_backfill_until(
            sessions, plan.account_id, plan.platforms, plan.since
        )
        end = end or datetime.now(UTC).replace(microsecond=0)
        for platform in plan.platforms:
            progress = await backfill(
                sessions,
                client,
                enqueue,
                plan.account_id,
                platform,
                plan.since,
                end,
                page_size=plan.page_size,
                on_page=on_page,
                again=plan.again,
            )
            if progress.already_finished:
                already_paged(platform, progress.orders_seen)
        if not plan.wait:
            return BackfillEnd.NOT_WAITED
        return await _until_synced(tallies, refresh_counts, plan.stall_timeout_s)
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
        await refresh_counts()
        show(tallies, True)


async def _until_synced(
    tallies: dict[Platform, BackfillTally],
    refresh_counts: Callable[[], Awaitable[None]],
    stall_timeout_s: float,
) -> BackfillEnd:
    last_change, last_counts = time.monotonic(), (-1, -1)
    while True:
        await refresh_counts()
        if all(t.done + t.failed >= t.seen for t in tallies.values()):
            return BackfillEnd.SYNCED
        counts = (sum(t.done for t in tallies.values()), sum(t.failed for t in tallies.values()))
        if counts != last_counts:
            last_change, last_counts = time.monotonic(), counts
        elif time.monotonic() - last_change > stall_timeout_s:
            return BackfillEnd.STALLED
        await asyncio.sleep(TICK_S)
