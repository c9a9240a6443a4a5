"""What the console reads and the two things it writes, as bounded queries.

Every read runs in one read-only REPEATABLE READ transaction under a statement timeout, so a
page is one consistent view and a slow query cannot hold a connection for long.

Lists page by keyset (newest first by id; ``before`` is the last id shown). A filter that no
index serves (a status, a message type) is applied to at most SCAN_WINDOW rows per page: when
the window ends before a page is full, the page says how far it looked and its "older" link
continues from there. A page's cost therefore never grows with the table.

The charts read ``webhook_inbox`` by ``received_at`` over the last hours only, through the BRIN
index of migration 0011 (the inbox is appended in time order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.ledger.timeline import read_consistently

STATEMENT_TIMEOUT_MS = 10_000
PAGE_SIZE = 50
SCAN_WINDOW = 20_000
CHART_HOURS = (1, 3, 6, 24)
CHART_BUCKETS = 180  # at most, per chart


@asynccontextmanager
async def reading(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A read-only, consistent session with a statement timeout."""
    async with sessions() as session:
        await read_consistently(session)
        await session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
        yield session


# --- overview -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairHealth:
    """One account and platform, from ``report_sync_health`` and the orders awaiting payment."""

    account_id: str
    platform: str | None
    inbox_backlog: int
    inbox_unqueued: int
    oldest_unprocessed_age: timedelta | None
    open_failures: int
    last_sweep_finished_at: datetime | None
    last_sweep_age: timedelta | None
    last_sweep_drift: int | None
    last_refund_sweep_finished_at: datetime | None
    last_refund_sweep_age: timedelta | None
    last_refund_sweep_drift: int | None
    unmapped_values: int
    awaiting_payment: int


@dataclass
class Activity:
    """Messages of one account and platform per chart bucket: how many came in, and how long
    they took to reach the ledger (seconds; one still waiting counts its age so far)."""

    account_id: str
    platform: str | None
    received: list[int]
    lag_p50: list[float | None]
    lag_max: list[float | None]

    @property
    def total(self) -> int:
        return sum(self.received)


@dataclass(frozen=True, slots=True)
class Unmapped:
    platform: str | None
    field: str
    value: str
    orders: int | None
    seen: int
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class Overview:
    now: datetime
    start: datetime
    hours: int
    bucket_s: int
    pairs: list[PairHealth]
    activity: dict[tuple[str, str | None], Activity]
    unmapped: list[Unmapped]
    unmapped_total: int

    @property
    def buckets(self) -> int:
        return self.hours * 3600 // self.bucket_s


_HEALTH = text(
    """
SELECT account_id, platform, inbox_backlog, inbox_unqueued, oldest_unprocessed_age,
       open_failures, last_sweep_finished_at, last_sweep_age, last_sweep_drift,
       last_refund_sweep_finished_at, last_refund_sweep_age, last_refund_sweep_drift,
       unmapped_values
FROM report_sync_health
"""
)
# The partial index of the orders not final serves it (pending_payment is one of them).
_AWAITING = text(
    """
SELECT account_id, platform, count(*) AS n FROM orders
WHERE status = 'pending_payment' GROUP BY account_id, platform
"""
)
_ACTIVITY = text(
    """
SELECT account_id, platform,
       floor(extract(epoch FROM received_at - :start) / :bucket)::int AS bucket,
       count(*) AS received,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM coalesce(processed_at, :now) - received_at)
       ) FILTER (WHERE state <> 'ignored') AS lag_p50,
       max(extract(epoch FROM coalesce(processed_at, :now) - received_at))
           FILTER (WHERE state <> 'ignored') AS lag_max
FROM webhook_inbox
WHERE received_at >= :start AND received_at < :now
GROUP BY 1, 2, 3
"""
)
UNMAPPED_SHOWN = 20
_UNMAPPED = text(
    """
SELECT platform, field, value, sum(orders) AS orders, sum(seen_count) AS seen,
       max(last_seen_at) AS last_seen_at, count(*) OVER () AS total
FROM report_unmapped_values
GROUP BY platform, field, value
ORDER BY max(last_seen_at) DESC, platform, field, value
LIMIT :shown
"""
)


def bucket_seconds(hours: int) -> int:
    return max(60, hours * 3600 // CHART_BUCKETS)


async def overview(session: AsyncSession, hours: int) -> Overview:
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    bucket_s = bucket_seconds(hours)
    start = now - timedelta(hours=hours)
    awaiting = {
        (r.account_id, r.platform): int(r.n) for r in (await session.execute(_AWAITING)).all()
    }
    pairs: dict[tuple[str, str | None], PairHealth] = {}
    for r in (await session.execute(_HEALTH)).all():
        pairs[(r.account_id, r.platform)] = PairHealth(
            account_id=r.account_id,
            platform=r.platform,
            inbox_backlog=int(r.inbox_backlog),
            inbox_unqueued=int(r.inbox_unqueued),
            oldest_unprocessed_age=r.oldest_unprocessed_age,
            open_failures=int(r.open_failures),
            last_sweep_finished_at=r.last_sweep_finished_at,
            last_sweep_age=r.last_sweep_age,
            last_sweep_drift=r.last_sweep_drift,
            last_refund_sweep_finished_at=r.last_refund_sweep_finished_at,
            last_refund_sweep_age=r.last_refund_sweep_age,
            last_refund_sweep_drift=r.last_refund_sweep_drift,
            unmapped_values=int(r.unmapped_values),
            awaiting_payment=awaiting.get((r.account_id, r.platform), 0),
        )
    n = hours * 3600 // bucket_s
    activity: dict[tuple[str, str | None], Activity] = {}
    rows = await session.execute(_ACTIVITY, {"start": start, "now": now, "bucket": bucket_s})
    for r in rows.all():
        key = (r.account_id, r.platform)
        if key not in activity:
            activity[key] = Activity(r.account_id, r.platform, [0] * n, [None] * n, [None] * n)
        if 0 <= r.bucket < n:
            one = activity[key]
            one.received[r.bucket] = int(r.received)
            one.lag_p50[r.bucket] = None if r.lag_p50 is None else float(r.lag_p50)
            one.lag_max[r.bucket] = None if r.lag_max is None else float(r.lag_max)
    # An account and platform with orders awaiting payment or messages, but nothing else.
    for key in [*awaiting, *activity]:
        if key not in pairs:
            pairs[key] = PairHealth(
                key[0], key[1], 0, 0, None, 0, None, None, None, None, None, None, 0,
                awaiting.get(key, 0),
            )  # fmt: skip
    unmapped_rows = (await session.execute(_UNMAPPED, {"shown": UNMAPPED_SHOWN})).all()
    unmapped = [
        Unmapped(
            r.platform,
            r.field,
            r.value,
            None if r.orders is None else int(r.orders),
            int(r.seen),
            r.last_seen_at,
        )
        for r in unmapped_rows
    ]
    return Overview(
        now=now,
        start=start,
        hours=hours,
        bucket_s=bucket_s,
        pairs=sorted(pairs.values(), key=lambda p: (p.account_id, p.platform or "")),
        activity=activity,
        unmapped=unmapped,
        unmapped_total=int(unmapped_rows[0].total) if unmapped_rows else 0,
    )


# --- lists, by keyset -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    rows: Sequence[Any]
    # The ``before`` of the next (older) page; None: nothing older.
    older: int | None
    # The page ended because its scan window did: the filters matched nothing further back
    # than this id among the rows looked at (``older`` continues the search).
    window_ended: bool = False
    scanned: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


async def _keyset(
    session: AsyncSession,
    *,
    table: str,
    columns: str,
    filters: Sequence[str],
    params: dict[str, Any],
    before: int | None,
) -> Page:
    """Rows of ``table`` newest first (id descending), below ``before``. With ``filters``,
    only the SCAN_WINDOW rows below ``before`` are looked at (see the module's docstring)."""
    params = {**params, "limit": PAGE_SIZE + 1, "window": SCAN_WINDOW}
    below = "id < :before" if before is not None else "true"
    if before is not None:
        params["before"] = before
    if not filters:
        sql = (
            f"SELECT {columns} FROM {table} WHERE {below} "  # noqa: S608 - names are ours
            "ORDER BY id DESC LIMIT :limit"
        )
        rows = (await session.execute(text(sql), params)).all()
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        return Page(rows, rows[-1].id if more else None)
    sql = f"""
WITH w AS MATERIALIZED (
    SELECT {columns} FROM {table} WHERE {below} ORDER BY id DESC LIMIT :window
)
SELECT *, (SELECT min(id) FROM w) AS scanned_to, (SELECT count(*) FROM w) AS scanned
FROM w WHERE {" AND ".join(filters)} ORDER BY id DESC LIMIT :limit
"""  # noqa: S608 - table, columns and filters are ours; values are bound
    rows = (await session.execute(text(sql), params)).all()
    if len(rows) > PAGE_SIZE:
        return Page(rows[:PAGE_SIZE], rows[PAGE_SIZE - 1].id)
    if rows:
        scanned_to, scanned = rows[0].scanned_to, int(rows[0].scanned)
    else:
        tail = f"SELECT min(id), count(*) FROM (SELECT id FROM {table} WHERE {below} ORDER BY id DESC LIMIT :window) w"  # noqa: E501, S608
        scanned_to, scanned = (await session.execute(text(tail), params)).one()
        scanned = int(scanned)
    ended = scanned >= SCAN_WINDOW
    return Page(rows, scanned_to if ended else None, window_ended=ended, scanned=scanned)


ORDER_COLUMNS = (
    "id, account_id, platform, order_id, status, raw_status, refund_state, currency, "
    "total_amount, upstream_created_at, last_synced_at"
)


async def orders_page(
    session: AsyncSession,
    *,
    status: str | None,
    account: str | None,
    platform: str | None,
    before: int | None,
) -> Page:
    filters, params = [], {}
    for name, value in (("status", status), ("account_id", account), ("platform", platform)):
        if value is not None:
            filters.append(f"{name} = :{name}")
            params[name] = value
    return await _keyset(
        session, table="orders", columns=ORDER_COLUMNS, filters=filters, params=params,
        before=before,
    )  # fmt: skip


INBOX_COLUMNS = (
    "id, account_id, platform, order_id, refund_id, message_type, kind, state, "
    "signature_state, received_at, processed_at, octet_length(raw_body) AS body_bytes"
)
SIGNATURE_UNCHECKED = "unchecked"


async def messages_page(
    session: AsyncSession,
    *,
    message_type: str | None,
    state: str | None,
    signature: str | None,
    before: int | None,
) -> Page:
    filters, params = [], {}
    if message_type is not None:
        filters.append("message_type = :message_type")
        params["message_type"] = message_type
    if state is not None:
        filters.append("state = :state")
        params["state"] = state
    if signature == SIGNATURE_UNCHECKED:
        filters.append("signature_state IS NULL")
    elif signature is not None:
        filters.append("signature_state = :signature")
        params["signature"] = signature
    return await _keyset(
        session, table="webhook_inbox", columns=INBOX_COLUMNS, filters=filters, params=params,
        before=before,
    )  # fmt: skip


_MESSAGE = text(
    """
SELECT id, account_id, platform, order_id, refund_id, message_type, kind, state,
       signature_state, request_id, dedupe_key, pushed_at, received_at, queued_at,
       processed_at, headers, raw_body
FROM webhook_inbox WHERE id = :id
"""
)


async def message(session: AsyncSession, inbox_id: int) -> Any | None:
    return (await session.execute(_MESSAGE, {"id": inbox_id})).one_or_none()
