"""The reconcile write: one order's fetched truth into the ledger, in the caller's transaction.

``write_order`` never commits (the job scope does) and is safe to run any number of times:

- current state (``orders``, ``order_lines``, ``shipments``, ``refunds``) is upserted, guarded so
  that a snapshot fetched earlier, or one whose upstream modification time is older, never
  overwrites a newer one;
- history (``order_status_history``, ``order_price_changes``) is appended only when the stored
  state really changes, so a replay writes none;
- shipment events are inserted only when new (their natural key is ``event_key``);
- a ``ledger_changes`` row (``service.ledger.changes``) is added for each real change: a status
  or price history row, a new parcel, a parcel newly delivered, a new refund state;
- the order's inbox rows received before the fetch started are marked processed: the fetch
  covers them (a refund message only when the fetch asked for its refund: ``asked_refunds``).
  Rows received later stay open and cause one more reconcile.

An upstream modification time too far in the future (``sanity.untrusted_time``) is not a
version: the truth is written without it (``upstream_modified_at`` NULL, the reason in
``orders.upstream_anomaly``), and a stored one is ignored by the guard, so one poisoned answer
cannot freeze an order. ``force=True`` (``pandasync resync``) skips the guard altogether: the
operator asked for what PandaPon says now. Lines the truth no longer lists are removed (when it
lists any): phantom lines of a poisoned answer must not outlive it.

A truth *re-derived* from the payloads the ledger already holds (``pandasync remap``, after a
mapping change) goes through the same write with ``rederived=True``: it is versioned as the
stored snapshot it came from (so a newer sync in between wins), keeps every ``last_synced_at``
(nothing was synced) and leaves the inbox alone (nothing was fetched).

Every statement is built once, at import, with bind parameters, and runs as Core on the
session's connection: building and caching SQLAlchemy constructs per call was half of a
worker's CPU per reconcile (``bench/freshness.py`` prints it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    DateTime,
    String,
    all_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, Insert, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.ledger import changes
from service.ledger.inbox import mark_processed
from service.ledger.models import (
    ChangeKind,
    Order,
    OrderLine,
    OrderPriceChange,
    OrderStatus,
    OrderStatusHistory,
    Platform,
    Refund,
    RefundState,
    RefundStatus,
    Shipment,
    ShipmentEvent,
    SyncSource,
)
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentSnapshot,
)
from service.pandapon.sanity import untrusted_time


@dataclass(frozen=True, slots=True)
class OrderTruth:
    """Everything fetched for one order, and when the fetch started (database clock)."""

    order: OrderSnapshot
    shipments: Sequence[ShipmentSnapshot] = ()
    refunds: Sequence[RefundSnapshot] = ()
    fetched_at: datetime = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class WriteResult:
    order_pk: int
    created: bool
    stale: bool  # the stored snapshot was newer: current state left as it was
    status_changed: bool
    price_changed: bool
    new_events: int
    inbox_processed: int
    anomaly: str | None = None  # why a part of the truth was not trusted (and not written)
    failures_resolved: int = 0  # the order's open sync failures closed (``resolve_failures``)


_AMOUNT_FIELDS = ("total_amount", "product_amount", "shipping_fee")


def _is_newer(
    stored_snapshot_at: datetime,
    stored_modified_at: datetime | None,
    truth: OrderTruth,
) -> bool:
    """True when ``truth`` may replace what is stored."""
    if truth.fetched_at < stored_snapshot_at:
        return False
    if untrusted_time(stored_modified_at, truth.fetched_at):
        return True  # stored before such times were caught: not a version
    modified = truth.order.modified_at
    return stored_modified_at is None or modified is None or modified >= stored_modified_at


def trusted(truth: OrderTruth) -> tuple[OrderTruth, str | None]:
    """``truth`` without the modification times too far ahead of its fetch to be versions,
    and what was left out (None when nothing)."""
    now = truth.fetched_at
    dropped: list[str] = []
    order = truth.order
    if untrusted_time(order.modified_at, now):
        dropped.append(f"order modified at {order.modified_at}")
        order = replace(order, modified_at=None)
    refunds = []
    for refund in truth.refunds:
        if untrusted_time(refund.modified_at, now):
            dropped.append(f"refund {refund.refund_id} modified at {refund.modified_at}")
            refund = replace(refund, modified_at=None)
        refunds.append(refund)
    if not dropped:
        return truth, None
    anomaly = "upstream time in the future, not used as a version: " + "; ".join(dropped)
    return replace(truth, order=order, refunds=tuple(refunds)), anomaly


# --- the statements -------------------------------------------------------------------------

_ORDER_KEY = (
    Order.account_id == bindparam("account_id"),
    Order.platform == bindparam("platform"),
    Order.order_id == bindparam("order_id"),
)
_LOCK_ORDER = (
    select(
        Order.id,
        Order.snapshot_at,
        Order.upstream_modified_at,
        Order.status,
        Order.raw_status,
        Order.currency,
        Order.refund_state,
        *(getattr(Order, name) for name in _AMOUNT_FIELDS),
    )
    .where(*_ORDER_KEY)
    .with_for_update()
)
_INSERT_ORDER = (
    insert(Order)
    .values(last_synced_at=func.now())
    .on_conflict_do_nothing(constraint="uq_orders_account_id_platform_order_id")
    .returning(Order.id)
)
# ``keep_synced``: a re-derived truth keeps the row's own last_synced_at.
_KEEP_SYNCED = bindparam("keep_synced", type_=Boolean)


def _synced_at(column: Any) -> Any:
    return case((_KEEP_SYNCED, column), else_=func.now())


_UPDATE_ORDER = (
    update(Order)
    .where(Order.id == bindparam("order_pk"))
    .values(last_synced_at=_synced_at(Order.last_synced_at))
)
_INSERT_STATUS_CHANGE = insert(OrderStatusHistory)
_INSERT_PRICE_CHANGE = insert(OrderPriceChange)


def _upsert(stmt: Insert, constraint: str, updated: Sequence[str], where: Any = None) -> Insert:
    """``stmt`` ON CONFLICT (``constraint``) DO UPDATE the ``updated`` columns from the row
    that was proposed."""
    return stmt.on_conflict_do_update(
        constraint=constraint,
        set_={name: stmt.excluded[name] for name in updated},
        where=where,
    )


_UPSERT_LINES = _upsert(
    insert(OrderLine),
    "uq_order_lines_order_pk_line_id",
    ("product_id", "sku_id", "title", "quantity", "unit_price", "amount", "raw_status", "raw"),
)
# ``<> ALL(array)``, not ``NOT IN (expanding)``: one SQL text whatever the number of lines, so
# one prepared statement per connection and no per-call expansion of the parameter.
_DELETE_GONE_LINES = delete(OrderLine).where(
    OrderLine.order_pk == bindparam("order_pk"),
    OrderLine.line_id != all_(bindparam("line_ids", type_=ARRAY(String))),
)
_UPSERT_SHIPMENT = (
    insert(Shipment)
    .values(last_synced_at=func.now())
    .on_conflict_do_update(
        constraint="uq_shipments_order_pk_tracking_number",
        set_={
            **{
                name: insert(Shipment).excluded[name]
                for name in (
                    "line_id",
                    "carrier",
                    "carrier_code",
                    "raw_status",
                    "first_event_at",
                    "last_event_at",
                    "delivered_at",
                    "raw",
                )
            },
            "last_synced_at": _synced_at(Shipment.last_synced_at),
        },
    )
    .returning(Shipment.id)
)
_INSERT_EVENTS = (
    insert(ShipmentEvent)
    .on_conflict_do_nothing(constraint="uq_shipment_events_shipment_id_event_key")
    .returning(ShipmentEvent.id)
)
_proposed_refund = insert(Refund).excluded
_UPSERT_REFUND = (
    insert(Refund)
    .values(last_synced_at=func.now())
    .on_conflict_do_update(
        constraint="uq_refunds_account_id_platform_refund_id",
        set_={
            **{
                name: _proposed_refund[name]
                for name in (
                    "order_pk",
                    "line_id",
                    "status",
                    "raw_status",
                    "currency",
                    "amount",
                    "reason",
                    "requested_at",
                    "resolved_at",
                    "upstream_modified_at",
                    "raw",
                )
            },
            "last_synced_at": _synced_at(Refund.last_synced_at),
        },
        # An after-sales record read earlier must not overwrite a later one.
        where=or_(
            Refund.upstream_modified_at.is_(None),
            _proposed_refund.upstream_modified_at.is_(None),
            Refund.upstream_modified_at <= _proposed_refund.upstream_modified_at,
        ),
    )
)

# Which refund status decides the order's refund state, strongest first: an open request wins,
# then a refund, then a rejection; otherwise (none, or only cancelled ones) NONE.
_REFUND_STATE_PRECEDENCE = (
    (RefundStatus.REQUESTED, RefundState.REQUESTED),
    (RefundStatus.REFUNDED, RefundState.REFUNDED),
    (RefundStatus.REJECTED, RefundState.REJECTED),
)
_of_order = Refund.order_pk == bindparam("order_pk")
_parcels = Shipment.order_pk == bindparam("order_pk")
# The order's refund state, refunded amount and shipping times, derived from its stored
# refunds and shipments in one statement.
_SUMMARIZE_ORDER = (
    update(Order)
    .where(Order.id == bindparam("order_pk"))
    .values(
        refund_state=case(
            *[
                (exists().where(_of_order, Refund.status == status), state.value)
                for status, state in _REFUND_STATE_PRECEDENCE
            ],
            else_=RefundState.NONE.value,
        ),
        refunded_amount=select(func.coalesce(func.sum(Refund.amount), Decimal(0)))
        .where(_of_order, Refund.status == RefundStatus.REFUNDED)
        .scalar_subquery(),
        shipped_at=func.coalesce(
            bindparam("shipped_at", type_=DateTime(timezone=True)),
            select(func.min(Shipment.first_event_at)).where(_parcels).scalar_subquery(),
        ),
        delivered_at=case(
            (
                bindparam("all_delivered", type_=Boolean),
                select(func.max(Shipment.delivered_at)).where(_parcels).scalar_subquery(),
            ),
            else_=None,
        ),
    )
    .returning(Order.refund_state, Order.refunded_amount)
)
_PARCELS_OF_ORDER = select(Shipment.tracking_number, Shipment.delivered_at).where(_parcels)


def rows_of_order(model: Any) -> tuple[ColumnElement[bool], ...]:
    """The WHERE of an UPDATE of one order's rows in a table keyed by account, platform and
    order id; its parameters come from ``order_params``. (The bind names of an UPDATE's WHERE
    must differ from its table's column names.)"""
    return (
        model.account_id == bindparam("of_account"),
        model.platform == bindparam("of_platform"),
        model.order_id == bindparam("of_order"),
    )


def order_params(account_id: str, platform: Platform, order_id: str) -> dict[str, Any]:
    return {"of_account": account_id, "of_platform": platform, "of_order": order_id}


# --- the write --------------------------------------------------------------------------------


async def write_order(
    session: AsyncSession,
    account_id: str,
    truth: OrderTruth,
    *,
    source: SyncSource,
    inbox_id: int | None = None,
    rederived: bool = False,
    force: bool = False,
    asked_refunds: Sequence[str] | None = None,
    resolve_failures: bool = False,
) -> WriteResult:
    """Write ``truth`` (see the module docstring); ``rederived`` for ``pandasync remap``,
    ``force`` to write it whatever the stored version says. ``asked_refunds``: the refunds the
    fetch asked for; a refund message of another refund is not covered by it and stays waiting.
    ``resolve_failures``: close the order's open sync failures (a reconcile that succeeded), in
    the statement that marks the inbox rows."""
    conn = await session.connection()
    mark = partial(
        _mark_inbox_processed,
        conn,
        account_id,
        asked_refunds=asked_refunds,
        resolve_failures=resolve_failures,
    )
    truth, anomaly = trusted(truth)
    snap = truth.order
    key = {"account_id": account_id, "platform": snap.platform, "order_id": snap.order_id}
    existing = (await conn.execute(_LOCK_ORDER, key)).one_or_none()

    if (
        existing is not None
        and not force
        and not _is_newer(existing.snapshot_at, existing.upstream_modified_at, truth)
    ):
        processed, resolved = (0, 0) if rederived else await mark(truth)
        return WriteResult(
            existing.id, False, True, False, False, 0, processed, failures_resolved=resolved
        )

    values = order_values(account_id, truth)
    values["upstream_anomaly"] = anomaly
    before: dict[str, Any] = (
        dict(existing._mapping)
        if existing is not None
        else dict.fromkeys(("status", "raw_status", "currency", *_AMOUNT_FIELDS))
    )
    before_refund_state = RefundState.NONE if existing is None else existing.refund_state
    status_changed = existing is None or (
        before["status"] != snap.status or before["raw_status"] != snap.raw_status
    )
    price_changed = existing is not None and any(
        before[name] != values[name] for name in (*_AMOUNT_FIELDS, "currency")
    )

    if existing is None:
        order_pk = (await conn.execute(_INSERT_ORDER, values)).scalar_one_or_none()
        if order_pk is None:
            # Another writer created it between our SELECT and INSERT: lock it and start over.
            return await write_order(
                session,
                account_id,
                truth,
                source=source,
                inbox_id=inbox_id,
                rederived=rederived,
                force=force,
                asked_refunds=asked_refunds,
                resolve_failures=resolve_failures,
            )
    else:
        order_pk = existing.id
        await conn.execute(
            _UPDATE_ORDER, {**values, "order_pk": order_pk, "keep_synced": rederived}
        )

    feed: list[dict[str, Any]] = []

    def feed_row(kind: ChangeKind, **details: Any) -> None:
        feed.append(
            changes.change(
                kind,
                account_id=account_id,
                platform=snap.platform,
                order_id=snap.order_id,
                order_pk=order_pk,
                occurred_at=snap.modified_at,
                **details,
            )
        )

    change = {
        "account_id": account_id,
        "order_pk": order_pk,
        "upstream_modified_at": snap.modified_at,
        "source": source,
        "inbox_id": inbox_id,
    }
    if status_changed:
        await conn.execute(
            _INSERT_STATUS_CHANGE,
            {
                **change,
                "from_status": before["status"],
                "to_status": snap.status,
                "from_raw_status": before["raw_status"],
                "to_raw_status": snap.raw_status,
            },
        )
        feed_row(
            ChangeKind.STATUS_CHANGED,
            from_status=before["status"],
            to_status=snap.status,
            from_raw_status=before["raw_status"],
            to_raw_status=snap.raw_status,
        )
    if price_changed:
        await conn.execute(
            _INSERT_PRICE_CHANGE,
            {
                **change,
                "currency": snap.currency,
                "old_total_amount": before["total_amount"],
                "new_total_amount": snap.total_amount,
                "old_product_amount": before["product_amount"],
                "new_product_amount": snap.product_amount,
                "old_shipping_fee": before["shipping_fee"],
                "new_shipping_fee": snap.shipping_fee,
            },
        )
        feed_row(
            ChangeKind.PRICE_CHANGED,
            currency=snap.currency,
            old_total_amount=before["total_amount"],
            new_total_amount=snap.total_amount,
            old_product_amount=before["product_amount"],
            new_product_amount=snap.product_amount,
            old_shipping_fee=before["shipping_fee"],
            new_shipping_fee=snap.shipping_fee,
        )

    await _upsert_lines(conn, account_id, order_pk, snap, new_order=existing is None)
    parcels_before: dict[str, datetime | None] = {}
    if existing is not None and truth.shipments:
        parcels_before = {
            row.tracking_number: row.delivered_at
            for row in await conn.execute(_PARCELS_OF_ORDER, {"order_pk": order_pk})
        }
    new_events = await _upsert_shipments(conn, account_id, order_pk, truth, rederived)
    for parcel in truth.shipments:
        stored = shipment_values(parcel)
        parcel_details = {
            "tracking_number": parcel.tracking_number,
            "carrier": parcel.carrier,
            "carrier_code": parcel.carrier_code,
            "line_id": parcel.line_id,
        }
        if parcel.tracking_number not in parcels_before:
            feed_row(ChangeKind.SHIPPED, **parcel_details)
        if (
            stored["delivered_at"] is not None
            and parcels_before.get(parcel.tracking_number) is None
        ):
            feed_row(ChangeKind.DELIVERED, **parcel_details, delivered_at=stored["delivered_at"])
        parcels_before[parcel.tracking_number] = stored["delivered_at"]  # a parcel listed twice
    await _upsert_refunds(conn, account_id, order_pk, truth, rederived)
    # An order created just now with no parcel, no refund and no shipping time: the summary is
    # the row's defaults (no refund, nothing shipped), so there is nothing to derive.
    bare = existing is None and not truth.shipments and not truth.refunds and not snap.shipped_at
    summary = (
        None
        if bare
        else (
            await conn.execute(
                _SUMMARIZE_ORDER,
                {
                    "order_pk": order_pk,
                    "shipped_at": snap.shipped_at,
                    "all_delivered": bool(truth.shipments)
                    and all(s.delivered for s in truth.shipments),
                },
            )
        ).one()
    )
    if summary is not None and summary.refund_state != before_refund_state:
        feed_row(
            ChangeKind.REFUND_CHANGED,
            from_refund_state=before_refund_state,
            to_refund_state=summary.refund_state,
            refunded_amount=summary.refunded_amount,
            currency=snap.currency,
        )
    await changes.record(conn, feed)
    processed, resolved = (0, 0) if rederived else await mark(truth)
    return WriteResult(
        order_pk,
        existing is None,
        False,
        status_changed,
        price_changed,
        new_events,
        processed,
        anomaly,
        resolved,
    )


def order_values(account_id: str, truth: OrderTruth) -> dict[str, Any]:
    snap = truth.order
    return {
        "account_id": account_id,
        "platform": snap.platform,
        "order_id": snap.order_id,
        "status": snap.status,
        "raw_status": snap.raw_status,
        "currency": snap.currency,
        "total_amount": snap.total_amount,
        "product_amount": snap.product_amount,
        "shipping_fee": snap.shipping_fee,
        "discount_amount": snap.discount_amount,
        "close_reason": snap.close_reason,
        "upstream_created_at": snap.created_at,
        "upstream_modified_at": snap.modified_at,
        "paid_at": snap.paid_at,
        "completed_at": snap.completed_at if snap.status == OrderStatus.COMPLETED else None,
        "cancelled_at": (snap.completed_at or snap.modified_at)
        if snap.status == OrderStatus.CANCELLED
        else None,
        "raw": snap.raw,
        "snapshot_at": truth.fetched_at,
    }


async def _upsert_lines(
    conn: AsyncConnection, account_id: str, order_pk: int, snap: OrderSnapshot, *, new_order: bool
) -> None:
    """``new_order``: the order row was inserted by this transaction, so it has no other lines."""
    if not snap.lines:
        return  # the answer lists no lines: it says nothing about them
    rows = [
        {"account_id": account_id, "order_pk": order_pk, **line_values(line)} for line in snap.lines
    ]
    await conn.execute(_UPSERT_LINES, rows)
    if new_order:
        return
    gone = {"order_pk": order_pk, "line_ids": [line.line_id for line in snap.lines]}
    await conn.execute(_DELETE_GONE_LINES, gone)


# --- what a write stores of each part of the truth (``pandasync remap`` compares these) -------


def line_values(line: LineSnapshot) -> dict[str, Any]:
    return {
        "line_id": line.line_id,
        "product_id": line.product_id,
        "sku_id": line.sku_id,
        "title": line.title,
        "quantity": line.quantity,
        "unit_price": line.unit_price,
        "amount": line.amount,
        "raw_status": line.raw_status,
        "raw": line.raw,
    }


def shipment_values(parcel: ShipmentSnapshot) -> dict[str, Any]:
    times = [e.event_at for e in parcel.events if e.event_at is not None]
    return {
        "tracking_number": parcel.tracking_number,
        "line_id": parcel.line_id,
        "carrier": parcel.carrier,
        "carrier_code": parcel.carrier_code,
        "raw_status": parcel.raw_status,
        "first_event_at": min(times, default=None),
        "last_event_at": max(times, default=None),
        "delivered_at": max(times, default=None) if parcel.delivered else None,
        "raw": parcel.raw,
    }


def refund_values(refund: RefundSnapshot) -> dict[str, Any]:
    return {
        "platform": refund.platform,
        "refund_id": refund.refund_id,
        "line_id": refund.line_id,
        "status": refund.status,
        "raw_status": refund.raw_status,
        "currency": refund.currency,
        "amount": refund.amount,
        "reason": refund.reason,
        "requested_at": refund.requested_at,
        "resolved_at": refund.resolved_at,
        "upstream_modified_at": refund.modified_at,
        "raw": refund.raw,
    }


def summary_of(
    truth: OrderTruth,
    refunds: Sequence[tuple[RefundStatus, Decimal | None]],
    parcels: Sequence[tuple[datetime | None, datetime | None]],
) -> dict[str, Any]:
    """What ``_SUMMARIZE_ORDER`` sets on the order once ``truth`` is written, given ALL the
    order's refunds (status, amount) and parcels (first event, delivered) as stored then."""
    firsts = [first for first, _ in parcels if first is not None]
    delivered = [at for _, at in parcels if at is not None]
    all_delivered = bool(truth.shipments) and all(s.delivered for s in truth.shipments)
    return {
        "refund_state": refund_state_of([status for status, _ in refunds]),
        "refunded_amount": sum(
            (amount or Decimal(0) for status, amount in refunds if status == RefundStatus.REFUNDED),
            Decimal(0),
        ),
        "shipped_at": truth.order.shipped_at or min(firsts, default=None),
        "delivered_at": max(delivered, default=None) if all_delivered else None,
    }


async def _upsert_shipments(
    conn: AsyncConnection, account_id: str, order_pk: int, truth: OrderTruth, keep_synced: bool
) -> int:
    new_events = 0
    for parcel in truth.shipments:
        shipment_id = (
            await conn.execute(
                _UPSERT_SHIPMENT,
                {
                    "account_id": account_id,
                    "order_pk": order_pk,
                    **shipment_values(parcel),
                    "keep_synced": keep_synced,
                },
            )
        ).scalar_one()
        if not parcel.events:
            continue
        inserted = await conn.execute(
            _INSERT_EVENTS,
            [
                {
                    "account_id": account_id,
                    "shipment_id": shipment_id,
                    "event_key": event.event_key,
                    "event_at": event.event_at,
                    "status": event.status,
                    "description": event.description,
                    "location": event.location,
                    "raw": event.raw,
                }
                for event in _unique_events(parcel)
            ],
        )
        new_events += len(inserted.all())
    return new_events


def _unique_events(parcel: ShipmentSnapshot) -> list[Any]:
    """One event per key: a trace that repeats a line must not fail the batch insert."""
    seen: dict[str, Any] = {}
    for event in parcel.events:
        seen.setdefault(event.event_key, event)
    return list(seen.values())


async def _upsert_refunds(
    conn: AsyncConnection, account_id: str, order_pk: int, truth: OrderTruth, keep_synced: bool
) -> None:
    for refund in truth.refunds:
        await conn.execute(
            _UPSERT_REFUND,
            {
                "account_id": account_id,
                "order_pk": order_pk,
                **refund_values(refund),
                "keep_synced": keep_synced,
            },
        )


def refund_state_of(statuses: Sequence[RefundStatus]) -> RefundState:
    """The order's refund summary from its refunds' statuses (what ``_SUMMARIZE_ORDER``
    computes in SQL)."""
    for status, state in _REFUND_STATE_PRECEDENCE:
        if status in statuses:
            return state
    return RefundState.NONE


async def _mark_inbox_processed(
    conn: AsyncConnection,
    account_id: str,
    truth: OrderTruth,
    *,
    asked_refunds: Sequence[str] | None,
    resolve_failures: bool,
) -> tuple[int, int]:
    order = truth.order
    return await mark_processed(
        conn,
        account_id,
        order.platform,
        order.order_id,
        truth.fetched_at,
        refund_ids=asked_refunds,
        resolve_failures=resolve_failures,
    )
