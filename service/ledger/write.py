"""The reconcile write: one order's fetched truth into the ledger, in the caller's transaction.

``write_order`` never commits (the job scope does) and is safe to run any number of times:

- current state (``orders``, ``order_lines``, ``shipments``, ``refunds``) is upserted, guarded so
  that a snapshot fetched earlier, or one whose upstream modification time is older, never
  overwrites a newer one;
- history (``order_status_history``, ``order_price_changes``) is appended only when the stored
  state really changes, so a replay writes none;
- shipment events are inserted only when new (their natural key is ``event_key``);
- the order's inbox rows received before the fetch started are marked processed: the fetch
  covers them. Rows received later stay open and cause one more reconcile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import rowcount
from service.ledger.models import (
    InboxState,
    Order,
    OrderLine,
    OrderPriceChange,
    OrderStatus,
    OrderStatusHistory,
    Refund,
    RefundState,
    RefundStatus,
    Shipment,
    ShipmentEvent,
    SyncSource,
    WebhookInbox,
)
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot


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


_AMOUNT_FIELDS = ("total_amount", "product_amount", "shipping_fee")


def _is_newer(
    stored_snapshot_at: datetime,
    stored_modified_at: datetime | None,
    truth: OrderTruth,
) -> bool:
    """True when ``truth`` may replace what is stored."""
    if truth.fetched_at < stored_snapshot_at:
        return False
    modified = truth.order.modified_at
    return stored_modified_at is None or modified is None or modified >= stored_modified_at


async def write_order(
    session: AsyncSession,
    account_id: str,
    truth: OrderTruth,
    *,
    source: SyncSource,
    inbox_id: int | None = None,
) -> WriteResult:
    snap = truth.order
    existing = (
        await session.execute(
            select(Order)
            .where(
                Order.account_id == account_id,
                Order.platform == snap.platform,
                Order.order_id == snap.order_id,
            )
            .with_for_update()
        )
    ).scalar_one_or_none()

    if existing is not None and not _is_newer(
        existing.snapshot_at, existing.upstream_modified_at, truth
    ):
        processed = await _mark_inbox_processed(session, account_id, truth)
        return WriteResult(existing.id, False, True, False, False, 0, processed)

    values = _order_values(account_id, truth)
    # Plain copies: the ORM UPDATE below refreshes ``existing`` in place.
    before = {
        name: getattr(existing, name) if existing else None
        for name in ("status", "raw_status", "currency", *_AMOUNT_FIELDS)
    }
    status_changed = existing is None or (
        before["status"] != snap.status or before["raw_status"] != snap.raw_status
    )
    price_changed = existing is not None and any(
        before[name] != values[name] for name in (*_AMOUNT_FIELDS, "currency")
    )

    if existing is None:
        order_pk = (
            await session.execute(
                insert(Order)
                .values(**values)
                .on_conflict_do_nothing(constraint="uq_orders_account_id_platform_order_id")
                .returning(Order.id)
            )
        ).scalar_one_or_none()
        if order_pk is None:
            # Another writer created it between our SELECT and INSERT: lock it and start over.
            return await write_order(session, account_id, truth, source=source, inbox_id=inbox_id)
    else:
        order_pk = existing.id
        await session.execute(
            update(Order)
            .where(Order.id == order_pk)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    if status_changed:
        session.add(
            OrderStatusHistory(
                account_id=account_id,
                order_pk=order_pk,
                from_status=before["status"],
                to_status=snap.status,
                from_raw_status=before["raw_status"],
                to_raw_status=snap.raw_status,
                upstream_modified_at=snap.modified_at,
                source=source,
                inbox_id=inbox_id,
            )
        )
    if price_changed:
        session.add(
            OrderPriceChange(
                account_id=account_id,
                order_pk=order_pk,
                currency=snap.currency,
                old_total_amount=before["total_amount"],
                new_total_amount=snap.total_amount,
                old_product_amount=before["product_amount"],
                new_product_amount=snap.product_amount,
                old_shipping_fee=before["shipping_fee"],
                new_shipping_fee=snap.shipping_fee,
                upstream_modified_at=snap.modified_at,
                source=source,
                inbox_id=inbox_id,
            )
        )

    await _upsert_lines(session, account_id, order_pk, snap)
    new_events = await _upsert_shipments(session, account_id, order_pk, truth)
    await _upsert_refunds(session, account_id, order_pk, truth)
    await _summarize_order(session, order_pk, truth)
    processed = await _mark_inbox_processed(session, account_id, truth)
    await session.flush()
    return WriteResult(
        order_pk,
        existing is None,
        False,
        status_changed,
        price_changed,
        new_events,
        processed,
    )


def _order_values(account_id: str, truth: OrderTruth) -> dict[str, Any]:
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
        "last_synced_at": func.now(),
    }


async def _upsert_lines(
    session: AsyncSession, account_id: str, order_pk: int, snap: OrderSnapshot
) -> None:
    if not snap.lines:
        return
    rows = [
        {
            "account_id": account_id,
            "order_pk": order_pk,
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
        for line in snap.lines
    ]
    stmt = insert(OrderLine).values(rows)
    await session.execute(
        stmt.on_conflict_do_update(
            constraint="uq_order_lines_order_pk_line_id",
            set_={
                name: stmt.excluded[name]
                for name in (
                    "product_id",
                    "sku_id",
                    "title",
                    "quantity",
                    "unit_price",
                    "amount",
                    "raw_status",
                    "raw",
                )
            },
        )
    )


async def _upsert_shipments(
    session: AsyncSession, account_id: str, order_pk: int, truth: OrderTruth
) -> int:
    new_events = 0
    for parcel in truth.shipments:
        times = [e.event_at for e in parcel.events if e.event_at is not None]
        stmt = insert(Shipment).values(
            account_id=account_id,
            order_pk=order_pk,
            tracking_number=parcel.tracking_number,
            line_id=parcel.line_id,
            carrier=parcel.carrier,
            carrier_code=parcel.carrier_code,
            raw_status=parcel.raw_status,
            first_event_at=min(times, default=None),
            last_event_at=max(times, default=None),
            delivered_at=max(times, default=None) if parcel.delivered else None,
            raw=parcel.raw,
            last_synced_at=func.now(),
        )
        shipment_id = (
            await session.execute(
                stmt.on_conflict_do_update(
                    constraint="uq_shipments_order_pk_tracking_number",
                    set_={
                        name: stmt.excluded[name]
                        for name in (
                            "line_id",
                            "carrier",
                            "carrier_code",
                            "raw_status",
                            "first_event_at",
                            "last_event_at",
                            "delivered_at",
                            "raw",
                            "last_synced_at",
                        )
                    },
                ).returning(Shipment.id)
            )
        ).scalar_one()
        if not parcel.events:
            continue
        inserted = await session.execute(
            insert(ShipmentEvent)
            .values(
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
                ]
            )
            .on_conflict_do_nothing(constraint="uq_shipment_events_shipment_id_event_key")
            .returning(ShipmentEvent.id)
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
    session: AsyncSession, account_id: str, order_pk: int, truth: OrderTruth
) -> None:
    for refund in truth.refunds:
        stmt = insert(Refund).values(
            account_id=account_id,
            platform=refund.platform,
            refund_id=refund.refund_id,
            order_pk=order_pk,
            line_id=refund.line_id,
            status=refund.status,
            raw_status=refund.raw_status,
            currency=refund.currency,
            amount=refund.amount,
            reason=refund.reason,
            requested_at=refund.requested_at,
            resolved_at=refund.resolved_at,
            upstream_modified_at=refund.modified_at,
            raw=refund.raw,
            last_synced_at=func.now(),
        )
        excluded = stmt.excluded
        await session.execute(
            stmt.on_conflict_do_update(
                constraint="uq_refunds_account_id_platform_refund_id",
                set_={
                    name: excluded[name]
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
                        "last_synced_at",
                    )
                },
                # An after-sales record read earlier must not overwrite a later one.
                where=or_(
                    Refund.upstream_modified_at.is_(None),
                    excluded.upstream_modified_at.is_(None),
                    Refund.upstream_modified_at <= excluded.upstream_modified_at,
                ),
            )
        )


def refund_state_of(statuses: Sequence[RefundStatus]) -> RefundState:
    """The order's refund summary: an open request wins, then a refund, then a rejection."""
    if RefundStatus.REQUESTED in statuses:
        return RefundState.REQUESTED
    if RefundStatus.REFUNDED in statuses:
        return RefundState.REFUNDED
    if RefundStatus.REJECTED in statuses:
        return RefundState.REJECTED
    return RefundState.NONE


async def _summarize_order(session: AsyncSession, order_pk: int, truth: OrderTruth) -> None:
    """Derive the order's refund state, refunded amount and shipping times from stored rows."""
    await session.flush()
    refunds = (
        await session.execute(
            select(Refund.status, Refund.amount).where(Refund.order_pk == order_pk)
        )
    ).all()
    refunded = sum(
        (amount or Decimal(0) for status, amount in refunds if status == RefundStatus.REFUNDED),
        Decimal(0),
    )
    shipped = (
        await session.execute(
            select(func.min(Shipment.first_event_at), func.max(Shipment.delivered_at)).where(
                Shipment.order_pk == order_pk
            )
        )
    ).one()
    all_delivered = truth.shipments and all(s.delivered for s in truth.shipments)
    await session.execute(
        update(Order)
        .where(Order.id == order_pk)
        .values(
            refund_state=refund_state_of([status for status, _ in refunds]),
            refunded_amount=refunded,
            shipped_at=truth.order.shipped_at or shipped[0],
            delivered_at=shipped[1] if all_delivered else None,
        )
    )


async def _mark_inbox_processed(session: AsyncSession, account_id: str, truth: OrderTruth) -> int:
    result = await session.execute(
        update(WebhookInbox)
        .where(
            and_(
                WebhookInbox.account_id == account_id,
                WebhookInbox.platform == truth.order.platform,
                WebhookInbox.order_id == truth.order.order_id,
                WebhookInbox.state.in_([InboxState.RECEIVED, InboxState.QUEUED]),
                WebhookInbox.received_at <= truth.fetched_at,
            )
        )
        .values(state=InboxState.PROCESSED, processed_at=func.now())
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)
