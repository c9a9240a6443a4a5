"""The safety net: sweep, refund sweep, refresh and backfill.

PandaPon gives up after five retries and does not promise delivery, so the ledger cannot rely
on messages alone:

- **sweep** pages through each platform's order list for orders modified since the stored cursor
  minus a lookback, and asks for a reconcile of every order the ledger lacks or holds at an older
  upstream modification time. The cursor moves only after every page was handled.
- **refund sweep** does the same over each platform's refund (after-sales) list, and asks for a
  reconcile of the order of every refund the ledger lacks or holds with another raw status or an
  older modification time, naming the refund: the order detail names only the latest refund of
  each line, so a refund whose message was lost and that is no longer the latest on its line is
  found nowhere else.
- **refresh** asks for a reconcile of orders that are not final and have not been synced for a
  while, because logistics move without any message.

``workers/backfill.py`` pages through a time range on demand, with the same list and enqueue.

All of them only *enqueue* reconciles (``Enqueue``); the workers do the fetching and writing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from service.db import session_scope
from service.domain import (
    WAITING_INBOX_STATES,
    OrderStatus,
    Platform,
    RefundState,
    SyncSource,
)
from service.ledger.inbox import held_for_replay
from service.ledger.models import (
    Order,
    Refund,
    RefundSweepCursor,
    SweepCursor,
    WebhookInbox,
)
from service.pandapon.models import (
    OrderListPage,
    RefundListPage,
    UnreadableRecord,
    UnreadableRefund,
)

log = structlog.get_logger(__name__)

PAGE_SIZE = 50


class OrderLister(Protocol):
    async def order_page(
        self,
        platform: Platform,
        page_no: int,
        page_size: int,
        modified_start: datetime,
        modified_end: datetime,
    ) -> OrderListPage: ...


class RefundLister(Protocol):
    async def refund_page(
        self,
        platform: Platform,
        page_no: int,
        page_size: int,
        modified_start: datetime,
        modified_end: datetime,
    ) -> RefundListPage: ...


# (account_id, platform, order_id, source) -> None; sends one reconcile message.
Enqueue = Callable[[str, Platform, str, SyncSource], None]
# The same, naming an after-sales record the reconcile fetches too (None: only those it finds
# itself). ``workers.scheduler.enqueue_with`` gives a function that is both.
EnqueueNaming = Callable[[str, Platform, str, SyncSource, str | None], None]


@dataclass(frozen=True, slots=True)
class SweepReport:
    platform: Platform
    window_start: datetime
    window_end: datetime
    pages: int
    examined: int
    drift: int
    unreadable: int = 0  # records of the list that could not be read (logged)


async def _db_now(sessions: async_sessionmaker[AsyncSession]) -> datetime:
    async with sessions() as session:
        now: datetime = (await session.execute(select(func.now()))).scalar_one()
    return now


def _log_unreadable(
    listing: str,
    platform: Platform,
    page_no: int,
    records: Sequence[UnreadableRecord | UnreadableRefund],
) -> None:
    """Log each record of a list page that could not be read, with the ids it showed."""
    for record in records:
        log.warning(
            f"{listing} record unreadable",
            platform=platform.value,
            page_no=page_no,
            **asdict(record),
        )


def set_aside(platform: Platform, page: OrderListPage) -> list[str]:
    """Log the page's unreadable records; return the ids of those that have one.

    Such an order is reconciled anyway: its detail may read well, and if it does not, the
    failure is recorded in sync_failures under its id. A record without an id is only logged.
    """
    _log_unreadable("order list", platform, page.page_no, page.unreadable)
    return [r.order_id for r in page.unreadable if r.order_id is not None]


def _later(listed: datetime | None, stored: datetime | None) -> bool:
    """Whether a listed modification time says the stored copy is out of date."""
    return stored is None or (listed is not None and listed > stored)


async def _awaited(
    session: AsyncSession,
    account_id: str,
    platform: Platform,
    column: InstrumentedAttribute[str | None],
    ids: Sequence[str],
) -> set[str]:
    """The ``ids`` (order or refund ids, per ``column``) named by a message still waiting in
    the inbox: a reconcile is on its way for them (the relay sees to that even when the broker
    loses it), which will read them as they are then. Asking again would only add to a
    backlog, on every sweep until it is worked off.

    Not when the row is ``held_for_replay`` (its order's reconcile failed for good): nothing
    is on its way, and the sweep is what retries an order whose failure was only recorded as
    permanent (a fault we did not foresee) while its message waits."""
    if not ids:
        return set()
    found = await session.execute(
        select(column)
        .distinct()
        .where(
            WebhookInbox.account_id == account_id,
            WebhookInbox.platform == platform,
            column.in_(ids),
            WebhookInbox.state.in_(WAITING_INBOX_STATES),
            ~held_for_replay(),
        )
    )
    return {value for value in found.scalars() if value is not None}


async def _out_of_date(
    session: AsyncSession,
    account_id: str,
    platform: Platform,
    page: OrderListPage,
    unreadable: list[str],
) -> list[str]:
    """Order ids of the page that the ledger lacks or holds at an older modification time,
    or whose record could not be read (``unreadable``, from ``set_aside``), and for which
    no message waits in the inbox (``_awaited``)."""
    orders = page.orders
    ids = [o.order_id for o in orders] + unreadable
    if not ids:
        return []
    awaited = await _awaited(session, account_id, platform, WebhookInbox.order_id, ids)
    stored = dict(
        (
            await session.execute(
                select(Order.order_id, Order.upstream_modified_at).where(
                    Order.account_id == account_id,
                    Order.platform == platform,
                    Order.order_id.in_(ids),
                )
            )
        ).all()
    )
    stale = [order_id for order_id in unreadable if order_id not in awaited]
    for order in orders:
        if order.order_id in awaited:
            continue
        if order.order_id not in stored or _later(order.modified_at, stored[order.order_id]):
            stale.append(order.order_id)
    return stale


async def _refunds_out_of_date(
    session: AsyncSession, account_id: str, platform: Platform, page: RefundListPage
) -> list[tuple[str, str | None]]:
    """(order id, refund id) of each refund of the page that the ledger lacks, or holds with
    another raw status or at an older modification time, and of each unreadable record that
    shows its order id; none whose refund a message waiting in the inbox names (``_awaited``:
    a reconcile of a refund message fetches the record it names)."""
    unreadable = [(r.order_id, r.refund_id) for r in page.unreadable if r.order_id is not None]
    ids = [r.refund_id for r in page.refunds] + [r for _, r in unreadable if r is not None]
    awaited = await _awaited(session, account_id, platform, WebhookInbox.refund_id, ids)
    stored: dict[str, tuple[str, datetime | None]] = {}
    if ids:
        rows = await session.execute(
            select(Refund.refund_id, Refund.raw_status, Refund.upstream_modified_at).where(
                Refund.account_id == account_id,
                Refund.platform == platform,
                Refund.refund_id.in_(ids),
            )
        )
        stored = {refund_id: (raw, modified) for refund_id, raw, modified in rows.all()}
    stale = [(order_id, r) for order_id, r in unreadable if r is None or r not in awaited]
    for refund in page.refunds:
        if refund.refund_id in awaited:
            continue
        ours = stored.get(refund.refund_id)
        if ours is None or ours[0] != refund.raw_status or _later(refund.modified_at, ours[1]):
            stale.append((refund.order_id, refund.refund_id))
    return stale


@dataclass(frozen=True, slots=True)
class PageSwept:
    """What a sweep made of one page of its list."""

    total: int  # records in the whole window, as the page says
    records: int  # records on the page, readable or not
    unreadable: int
    drift: int  # reconciles it asked for


# (page_no, window start, window end) -> what one kind of sweep made of that page
SweepPage = Callable[[int, datetime, datetime], Awaitable[PageSwept]]
CursorTable = type[SweepCursor] | type[RefundSweepCursor]


async def _sweep_pages(
    sessions: async_sessionmaker[AsyncSession],
    table: CursorTable,
    account_id: str,
    platform: Platform,
    lookback: timedelta,
    page_size: int,
    sweep_page: SweepPage,
) -> SweepReport:
    """Page through one list from ``table``'s cursor minus ``lookback`` up to now.

    The cursor moves, and the counts are stored, only once every page was handled: a failed
    sweep starts again from the old cursor. Paging stops at an empty page or at the total.
    """
    now = await _db_now(sessions)
    key = {"account_id": account_id, "platform": platform}
    async with session_scope(sessions) as session:
        cursor_at = (
            await session.execute(
                select(table.cursor_at).where(
                    table.account_id == account_id, table.platform == platform
                )
            )
        ).scalar_one_or_none()
        start = (cursor_at or now) - lookback
        await session.execute(
            insert(table)
            .values(**key, last_started_at=now)
            .on_conflict_do_update(index_elements=list(key), set_={"last_started_at": now})
        )

    examined = drift = pages = unreadable = 0
    page_no = 1
    while True:
        page = await sweep_page(page_no, start, now)
        pages += 1
        examined += page.records
        unreadable += page.unreadable
        drift += page.drift
        if not page.records or page_no * page_size >= page.total:
            break
        page_no += 1

    done: dict[str, Any] = {
        "cursor_at": now,
        "last_finished_at": func.now(),
        "last_examined": examined,
        "last_drift": drift,
    }
    async with session_scope(sessions) as session:
        await session.execute(
            insert(table)
            .values(**key, last_started_at=now, **done)
            .on_conflict_do_update(index_elements=list(key), set_=done)
        )
    return SweepReport(platform, start, now, pages, examined, drift, unreadable)


async def sweep(
    sessions: async_sessionmaker[AsyncSession],
    client: OrderLister,
    enqueue: Enqueue,
    account_id: str,
    platform: Platform,
    *,
    lookback: timedelta,
    page_size: int = PAGE_SIZE,
) -> SweepReport:
    """Sweep the order list (see the module docstring); cursor in ``sweep_cursors``."""

    async def sweep_page(page_no: int, start: datetime, end: datetime) -> PageSwept:
        page = await client.order_page(platform, page_no, page_size, start, end)
        async with sessions() as session:
            stale = await _out_of_date(
                session, account_id, platform, page, set_aside(platform, page)
            )
        for order_id in stale:
            enqueue(account_id, platform, order_id, SyncSource.SWEEP)
        listed = len(page.orders) + len(page.unreadable)
        return PageSwept(page.total, listed, len(page.unreadable), len(stale))

    return await _sweep_pages(
        sessions, SweepCursor, account_id, platform, lookback, page_size, sweep_page
    )


async def refund_sweep(
    sessions: async_sessionmaker[AsyncSession],
    client: RefundLister,
    enqueue: EnqueueNaming,
    account_id: str,
    platform: Platform,
    *,
    lookback: timedelta,
    page_size: int = PAGE_SIZE,
) -> SweepReport:
    """Sweep the refund list (see the module docstring); cursor in ``refund_sweep_cursors``.

    One reconcile per refund out of date, each naming its refund (a record too unreadable to
    show its refund id still has its order reconciled). Drift counts refunds, not orders.
    """

    async def sweep_page(page_no: int, start: datetime, end: datetime) -> PageSwept:
        page = await client.refund_page(platform, page_no, page_size, start, end)
        _log_unreadable("refund list", platform, page.page_no, page.unreadable)
        async with sessions() as session:
            stale = await _refunds_out_of_date(session, account_id, platform, page)
        for order_id, refund_id in stale:
            enqueue(account_id, platform, order_id, SyncSource.SWEEP, refund_id)
        listed = len(page.refunds) + len(page.unreadable)
        return PageSwept(page.total, listed, len(page.unreadable), len(stale))

    return await _sweep_pages(
        sessions, RefundSweepCursor, account_id, platform, lookback, page_size, sweep_page
    )


NOT_FINAL = (OrderStatus.PENDING_PAYMENT, OrderStatus.PAID, OrderStatus.SHIPPED)


async def refresh(
    sessions: async_sessionmaker[AsyncSession],
    enqueue: Enqueue,
    *,
    stale_after: timedelta,
    limit: int = 5000,
) -> int:
    """Reconcile non-final orders (or orders with an open refund) not synced for a while."""
    async with sessions() as session:
        rows = (
            await session.execute(
                select(Order.account_id, Order.platform, Order.order_id)
                .where(
                    or_(Order.status.in_(NOT_FINAL), Order.refund_state == RefundState.REQUESTED),
                    Order.last_synced_at < func.now() - stale_after,
                )
                .order_by(Order.last_synced_at)
                .limit(limit)
            )
        ).all()
    for account_id, platform, order_id in rows:
        enqueue(account_id, platform, order_id, SyncSource.REFRESH)
    return len(rows)
