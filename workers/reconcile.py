"""Reconcile one order: fetch its truth from PandaPon and write it into the ledger.

The job, in order:

1. Take the order's lock (a Postgres session advisory lock, so it holds across every worker
   process and machine and dies with a killed worker's connection). If another worker holds it,
   answer ``BUSY``: the caller re-sends the message a little later.
2. Coalesce: a webhook message whose inbox row is already ``processed`` was covered by a fetch
   that started after it arrived; nothing to do.
3. Note the database clock, then fetch the order detail, its logistics and the after-sales
   records it needs (from refund messages, from the order itself, and open refunds in the ledger).
   An answer that cannot be true (``service.pandapon.sanity``) fails here, before any write.
4. Write everything in ONE transaction (``service.ledger.write``), resolve any open sync
   failure of the order, and mark the inbox rows received before the fetch as processed.

Each upstream call goes through ``workers.policy.call_with_retries``; what still fails propagates
to the message-level retry policy (``workers.policy.decide``).
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol

import structlog
from prometheus_client import Counter
from sqlalchemy import (
    CompoundSelect,
    DateTime,
    Integer,
    Row,
    bindparam,
    func,
    select,
    text,
    union,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from service.db import session_scope
from service.domain import (
    WAITING_INBOX_STATES,
    Platform,
    ReconcileRequest,
    RefundStatus,
    SyncSource,
)
from service.ledger.inbox import COVERED_INBOX_STATES
from service.ledger.models import Order, Refund, SyncFailure, WebhookInbox
from service.ledger.unmapped import count as count_unmapped
from service.ledger.unmapped import record_unmapped
from service.ledger.write import (
    OrderTruth,
    WriteResult,
    write_order,
)
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot
from service.pandapon.sanity import check_order
from workers.policy import call_with_retries

log = structlog.get_logger(__name__)

UPSTREAM_ANOMALIES = Counter(
    "pandasync_upstream_anomalies_total",
    "Truths written without a part PandaPon sent but that cannot be a version "
    "(orders.upstream_anomaly)",
    ["platform"],
)

# The first key of the two-int advisory lock form: keeps our locks apart from anyone else's.
ORDER_LOCK_CLASS = 0x5053  # "PS"
# Postgres' default level, for the write transaction after the lock's autocommit statements.
TRANSACTIONAL = "READ COMMITTED"


class UpstreamClient(Protocol):
    """What a reconcile needs from PandaPon (``service.pandapon.client.PandaPonClient``)."""

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot: ...

    async def logistics(
        self, platform: Platform, order: OrderSnapshot
    ) -> Sequence[ShipmentSnapshot]: ...

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot: ...


class Outcome(enum.StrEnum):
    """What one reconcile did; ``detail`` says it in words for the log line."""

    WRITTEN = "written"
    UNCHANGED = "unchanged"  # fetched and written, nothing in the current state changed
    STALE = "stale"  # a newer snapshot was already stored
    COALESCED = "coalesced"  # covered by a fetch that started after the message
    BUSY = "busy"  # another worker holds the order's lock

    @property
    def detail(self) -> str:
        return OUTCOME_DETAILS[self]


# The one explanation of each outcome: the log line's ``detail`` and the table in
# docs/operations.md ("Reconcile outcomes"; tests/unit/test_outcomes.py keeps them equal).
OUTCOME_DETAILS: dict[Outcome, str] = {
    Outcome.WRITTEN: (
        "PandaPon's answer changed the ledger: a new order, or a new status, amounts, parcel "
        "events or refunds, written with their history"
    ),
    Outcome.UNCHANGED: (
        "PandaPon was asked and the ledger already held what it answered: nothing to write"
    ),
    Outcome.STALE: (
        "PandaPon's answer was older than what the ledger holds: the newer state was kept"
    ),
    Outcome.COALESCED: (
        "a reconcile of this order that started after this message arrived has already read "
        "PandaPon: this message is covered by it, nothing to do"
    ),
    Outcome.BUSY: (
        "another worker was reconciling this order: this message is sent again in a moment"
    ),
}


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    outcome: Outcome
    write: WriteResult | None = None
    failures_resolved: int = 0


def order_lock_key(account_id: str, platform: Platform, order_id: str) -> int:
    """A stable signed 32-bit key for the order (advisory locks take int4 pairs)."""
    digest = zlib.crc32(f"{account_id}\x1f{platform.value}\x1f{order_id}".encode())
    return digest - (1 << 32) if digest >= (1 << 31) else digest


@dataclass(frozen=True, slots=True)
class LockedOrder:
    """The order's lock is held on ``conn`` (autocommit) until the block ends."""

    conn: AsyncConnection
    fetched_at: datetime  # the database clock once the lock was taken
    inbox_state: str | None  # the state of the request's inbox row, if it names one
    open_refund_ids: tuple[str, ...] = ()  # refunds waiting for a fetch, as of the lock


_OPEN_REFUND_IDS: CompoundSelect[str | None] = union(
    # Refund messages not yet covered by a fetch...
    select(WebhookInbox.refund_id).where(
        WebhookInbox.account_id == bindparam("account_id"),
        WebhookInbox.platform == bindparam("platform"),
        WebhookInbox.order_id == bindparam("order_id"),
        WebhookInbox.refund_id.is_not(None),
        WebhookInbox.state.in_(WAITING_INBOX_STATES),
    ),
    # ...and refunds the ledger holds as still open.
    select(Refund.refund_id)
    .join(Order, Order.id == Refund.order_pk)
    .where(
        Order.account_id == bindparam("account_id"),
        Order.platform == bindparam("platform"),
        Order.order_id == bindparam("order_id"),
        Refund.status.in_([RefundStatus.REQUESTED, RefundStatus.UNKNOWN]),
    ),
)
_open_refunds = _OPEN_REFUND_IDS.subquery("open_refunds")

# Lock, clock, the coalescing check and the open refunds in ONE round trip (each costs a turn
# of the worker loop). The reads see the statement's snapshot, taken just before the lock:
# - a row committed as processed a moment ago reads as queued, which costs one redundant
#   (idempotent) reconcile;
# - a refund message whose inbox row commits after the snapshot, though received before the
#   lock, is not among the refunds fetched: the write leaves such a row waiting (``write_order``
#   marks processed only the refund messages of the refunds it wrote), so its own message
#   reconciles the order again and fetches that refund.
_LOCK_AND_LOOK = select(
    func.pg_try_advisory_lock(
        bindparam("lock_class", type_=Integer), bindparam("lock_key", type_=Integer)
    ).label("acquired"),
    func.clock_timestamp(type_=DateTime(timezone=True)).label("now"),
    select(WebhookInbox.state)
    .where(WebhookInbox.id == bindparam("inbox_id"))
    .scalar_subquery()
    .label("inbox_state"),
    select(func.array_agg(_open_refunds.c.refund_id)).scalar_subquery().label("open_refund_ids"),
)
_UNLOCK = text("SELECT pg_advisory_unlock(:lock_class, :lock_key)")


@asynccontextmanager
async def order_lock(
    engine: AsyncEngine, request: ReconcileRequest
) -> AsyncIterator[LockedOrder | None]:
    """Hold the order's advisory lock for the block on one connection, which the block may use
    for its own statements; yields None when another worker has the lock."""
    params = {
        "lock_class": ORDER_LOCK_CLASS,
        "lock_key": order_lock_key(request.account_id, request.platform, request.order_id),
    }
    look = {
        **params,
        "inbox_id": request.inbox_id,
        "account_id": request.account_id,
        "platform": request.platform,
        "order_id": request.order_id,
    }
    conn, row = await _lock_and_look(engine, look)
    try:
        if not row.acquired:
            yield None
            return
        open_refunds = tuple(found for found in row.open_refund_ids or () if found)
        try:
            yield LockedOrder(conn, row.now, row.inbox_state, open_refunds)
        finally:
            try:
                await set_isolation(conn, "AUTOCOMMIT")
                await conn.execute(_UNLOCK, params)
            except BaseException:
                # A connection that may still hold the lock must not go back to the pool.
                await conn.invalidate()
                raise
    finally:
        await conn.close()


async def _lock_and_look(
    engine: AsyncEngine, look: dict[str, Any]
) -> tuple[AsyncConnection, Row[Any]]:
    """A connection from the pool and ``_LOCK_AND_LOOK``'s answer on it. The worker's engine
    does not ping a connection before lending it (a round trip per reconcile): when this first
    statement meets a dead one (Postgres restarted), the pool has just marked every connection
    as old as that one for replacement, and the statement runs once more on a fresh connection.
    A lock taken on a dead connection died with it, so running it again is safe."""
    for attempt in (1, 2):
        conn = await engine.connect()
        try:
            # A connection fresh from the pool has no transaction to end: no rollback first.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return conn, (await conn.execute(_LOCK_AND_LOOK, look)).one()
        except BaseException as error:
            # Dead, or cancelled mid-statement with the lock perhaps held: never back to the
            # pool (closed, it frees its place in the pool).
            await conn.invalidate()
            await conn.close()
            if attempt == 2 or not (isinstance(error, DBAPIError) and error.connection_invalidated):
                raise
            log.info("database connection lost: the order's lock is taken on a fresh one")
    raise AssertionError("unreachable")  # the second attempt returns or raises


async def set_isolation(conn: AsyncConnection, level: str) -> None:
    """Switch ``conn`` between autocommit and transactions. SQLAlchemy keeps a transaction
    object even in autocommit; ending it first costs nothing on the server."""
    await conn.rollback()
    await conn.execution_options(isolation_level=level)


def _refund_ids_to_fetch(
    request: ReconcileRequest, snapshot: OrderSnapshot, locked: LockedOrder
) -> list[str]:
    """Refund messages not yet covered, refunds the order names, and open ones in the ledger."""
    ids: dict[str, None] = {}
    if request.refund_id:
        ids[request.refund_id] = None
    for refund_id in (*snapshot.refund_ids, *locked.open_refund_ids):
        ids[refund_id] = None
    return list(ids)


async def reconcile_order(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    client: UpstreamClient,
    request: ReconcileRequest,
) -> ReconcileResult:
    async with order_lock(engine, request) as locked:
        if locked is None:
            return ReconcileResult(Outcome.BUSY)
        if request.inbox_id is not None and locked.inbox_state in COVERED_INBOX_STATES:
            return ReconcileResult(Outcome.COALESCED)

        platform = request.platform
        snapshot = await call_with_retries(lambda: client.order_detail(platform, request.order_id))
        shipments = await call_with_retries(lambda: client.logistics(platform, snapshot))
        refund_ids = _refund_ids_to_fetch(request, snapshot, locked)
        refunds = [
            await call_with_retries(partial(client.refund_detail, platform, refund_id))
            for refund_id in refund_ids
        ]

        check_order(snapshot, refunds, shipments)
        truth = OrderTruth(snapshot, shipments, refunds, fetched_at=locked.fetched_at)
        # The write is one transaction on the lock's connection (no second connection per job).
        await set_isolation(locked.conn, TRANSACTIONAL)
        async with session_scope(sessions, bind=locked.conn) as session:
            result = await write_order(
                session,
                request.account_id,
                truth,
                source=request.source,
                inbox_id=request.inbox_id,
                # `pandasync resync`: the operator asked for what PandaPon says now.
                force=request.source is SyncSource.MANUAL,
                asked_refunds=refund_ids,
                resolve_failures=True,
            )
            # Seen, even in a stale snapshot: PandaPon sent it.
            unmapped = await record_unmapped(session, request.account_id, truth)
        count_unmapped(platform, unmapped)
        resolved = result.failures_resolved
    if result.anomaly is not None:
        UPSTREAM_ANOMALIES.labels(platform.value).inc()
        log.warning("upstream anomaly", order_id=request.order_id, anomaly=result.anomaly)
    if result.stale:
        return ReconcileResult(Outcome.STALE, result, resolved)
    changed = result.created or result.status_changed or result.price_changed or result.new_events
    return ReconcileResult(Outcome.WRITTEN if changed else Outcome.UNCHANGED, result, resolved)


async def count_open_failures(session: AsyncSession) -> int:
    return int(
        (
            await session.execute(
                select(func.count())
                .select_from(SyncFailure)
                .where(SyncFailure.resolved_at.is_(None))
            )
        ).scalar_one()
    )
