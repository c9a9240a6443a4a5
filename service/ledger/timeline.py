"""An order's story: its current row and every event the ledger holds of it, oldest first.

What ``pandasync order`` shows. The events come from the tables that keep an order's history
or its dated facts:

| kind | from | at |
| --- | --- | --- |
| ``inbox_message`` | ``webhook_inbox`` (naming the order or one of its refunds) | received |
| ``status_change`` | ``order_status_history`` | observed |
| ``price_change`` | ``order_price_changes`` | observed |
| ``shipment_event`` | ``shipment_events`` with their parcel (``shipments``) | the trace's time |
| ``shipment`` | a parcel with no trace event yet | its last sync |
| ``refund`` | ``refunds``: requested | requested (else upstream modified, else synced) |
| ``refund_resolved`` | ``refunds``: resolved | resolved |
| ``payment_attempt`` | ``payment_attempts`` | started |
| ``sync_failure`` | ``sync_failures`` | first failed |
| ``failure_closed`` | ``sync_failures``: dismissed by a person, or resolved by a sync | then |

The ledger keeps one current row per refund, not its history: both refund events show the
refund as it is now. Times of shipment events and refunds are PandaPon's; every other time is
the ledger's own clock.

A handful of queries, each on an index by order (``ix_webhook_inbox_order`` and
``ix_sync_failures_order`` came with migration 0008 for this).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import ARRAY, ColumnElement, String, any_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.ledger.models import (
    FailureKind,
    InboxState,
    MessageKind,
    Order,
    OrderPriceChange,
    OrderStatus,
    OrderStatusHistory,
    PaymentAttempt,
    PaymentState,
    Platform,
    Refund,
    RefundState,
    RefundStatus,
    Shipment,
    ShipmentEvent,
    SignatureState,
    SyncFailure,
    SyncSource,
    WebhookInbox,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")


class EventKind(enum.StrEnum):
    INBOX_MESSAGE = "inbox_message"
    PAYMENT_ATTEMPT = "payment_attempt"
    STATUS_CHANGE = "status_change"
    PRICE_CHANGE = "price_change"
    SHIPMENT = "shipment"
    SHIPMENT_EVENT = "shipment_event"
    REFUND = "refund"
    REFUND_RESOLVED = "refund_resolved"
    SYNC_FAILURE = "sync_failure"
    FAILURE_CLOSED = "failure_closed"


# Events at the same instant: a message before the changes it caused, a failure after them.
_RANK = {kind: rank for rank, kind in enumerate(EventKind)}

# Where an event's fact came from, besides the sync sources (webhook, sweep, …) of history rows.
SOURCE_LOGISTICS = "logistics"  # PandaPon's logistics trace of a parcel
SOURCE_AFTER_SALES = "after-sales"  # PandaPon's after-sales record
SOURCE_PAY = "pay"  # a `pandasync pay` run
SOURCE_OPERATOR = "operator"  # a person closed it (`pandasync dismiss`)
SOURCE_RECONCILE = "reconcile"  # a sync that succeeded closed it


@dataclass(frozen=True, slots=True)
class OrderState:
    """The order's current row."""

    order_pk: int
    account_id: str
    platform: Platform
    order_id: str
    status: OrderStatus
    raw_status: str
    refund_state: RefundState
    refunded_amount: Decimal
    currency: str
    total_amount: Decimal | None
    product_amount: Decimal | None
    shipping_fee: Decimal | None
    discount_amount: Decimal | None
    close_reason: str | None
    upstream_created_at: datetime | None
    upstream_modified_at: datetime | None
    paid_at: datetime | None
    shipped_at: datetime | None
    delivered_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    upstream_anomaly: str | None
    first_seen_at: datetime
    snapshot_at: datetime
    last_synced_at: datetime


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A stored callback, without its body and headers."""

    inbox_id: int
    message_type: str
    message_kind: MessageKind
    state: InboxState
    signature_state: SignatureState | None
    refund_id: str | None
    request_id: str | None
    pushed_at: datetime | None
    received_at: datetime
    queued_at: datetime | None
    processed_at: datetime | None


@dataclass(frozen=True, slots=True)
class StatusChange:
    history_id: int
    from_status: OrderStatus | None
    to_status: OrderStatus
    from_raw_status: str | None
    to_raw_status: str
    upstream_modified_at: datetime | None
    observed_at: datetime
    inbox_id: int | None


@dataclass(frozen=True, slots=True)
class PriceChange:
    change_id: int
    currency: str
    old_total_amount: Decimal | None
    new_total_amount: Decimal | None
    old_product_amount: Decimal | None
    new_product_amount: Decimal | None
    old_shipping_fee: Decimal | None
    new_shipping_fee: Decimal | None
    upstream_modified_at: datetime | None
    observed_at: datetime
    inbox_id: int | None


@dataclass(frozen=True, slots=True)
class ShipmentTrace:
    """A parcel, and one event of its trace (the event fields are None for a parcel whose
    trace has no event yet)."""

    shipment_id: int
    tracking_number: str
    carrier: str | None
    carrier_code: str | None
    parcel_status: str | None
    line_id: str | None
    delivered_at: datetime | None
    event_id: int | None
    event_at: datetime | None
    event_status: str | None
    description: str | None
    location: str | None
    observed_at: datetime | None


@dataclass(frozen=True, slots=True)
class RefundInfo:
    """A refund as the ledger holds it now."""

    refund_id: str
    line_id: str | None
    status: RefundStatus
    raw_status: str
    currency: str
    amount: Decimal | None
    reason: str | None
    requested_at: datetime | None
    resolved_at: datetime | None
    upstream_modified_at: datetime | None
    last_synced_at: datetime


@dataclass(frozen=True, slots=True)
class PaymentAttemptInfo:
    attempt_id: int
    run_id: str
    requested_by: str
    state: PaymentState
    amount: Decimal | None
    currency: str
    pay_url: str | None
    upstream_code: str | None
    upstream_msg: str | None
    upstream_request_id: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class FailureInfo:
    failure_id: int
    failure_kind: FailureKind
    source: SyncSource
    error: str
    endpoint: str | None
    http_status: int | None
    upstream_code: str | None
    upstream_msg: str | None
    upstream_request_id: str | None
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    replay_count: int
    replayed_at: datetime | None
    resolved_at: datetime | None
    dismissed_at: datetime | None
    dismissed_by: str | None
    dismissed_reason: str | None


Detail = (
    InboxMessage
    | StatusChange
    | PriceChange
    | ShipmentTrace
    | RefundInfo
    | PaymentAttemptInfo
    | FailureInfo
)


@dataclass(frozen=True, slots=True)
class Event:
    at: datetime
    kind: EventKind
    source: str
    detail: Detail


@dataclass(frozen=True, slots=True)
class Timeline:
    order: OrderState
    open_failure: FailureInfo | None
    events: tuple[Event, ...]  # oldest first


# --- reading rows into the dataclasses -------------------------------------------------------


def _columns(cls: type[DataclassInstance], model: Any, **renamed: Any) -> list[Any]:
    """The columns of ``model`` that fill ``cls``, each labelled as its field (a field named
    otherwise than its column is given in ``renamed``)."""
    names = [f.name for f in fields(cls)]
    return [(renamed[n] if n in renamed else getattr(model, n)).label(n) for n in names]


def _build(cls: type[_D], row: Any) -> _D:
    """``cls`` from a row of a query made with ``_columns(cls, …)``."""
    values = row._mapping
    return cls(**{f.name: values[f.name] for f in fields(cls)})


# --- finding the order ------------------------------------------------------------------------


async def read_consistently(session: AsyncSession) -> None:
    """Make the session's new transaction one read-only view of the ledger, so the order's
    row and its events agree with each other while workers write. Call it first."""
    await session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))


def _accounts_in_ledger() -> ColumnElement[list[str]]:
    """Every account id in ``orders``, read as a loose index scan of the unique index (one
    probe per account, not a pass over every order): the operator may not know the account."""
    first = select(Order.account_id).order_by(Order.account_id).limit(1).scalar_subquery()
    accounts = select(first.label("account_id")).cte("accounts", recursive=True)
    later = (
        select(Order.account_id)
        .where(Order.account_id > accounts.c.account_id)
        .order_by(Order.account_id)
        .limit(1)
        .scalar_subquery()
    )
    accounts = accounts.union_all(
        select(later.label("account_id")).where(accounts.c.account_id.is_not(None))
    )
    every = select(accounts.c.account_id).where(accounts.c.account_id.is_not(None))
    return func.array(every.scalar_subquery(), type_=ARRAY(String))


async def find_orders(
    session: AsyncSession, platform: Platform, order_id: str, account_id: str | None = None
) -> list[OrderState]:
    """The order's current row in ``account_id``, or in every account holding it when None
    (one, normally; ordered by account)."""
    query = select(*_columns(OrderState, Order, order_pk=Order.id)).where(
        Order.platform == platform, Order.order_id == order_id
    )
    if account_id is not None:
        query = query.where(Order.account_id == account_id)
    else:
        query = query.where(Order.account_id == any_(_accounts_in_ledger()))
    rows = (await session.execute(query.order_by(Order.account_id))).all()
    return [_build(OrderState, row) for row in rows]


# --- the events -------------------------------------------------------------------------------


async def order_timeline(session: AsyncSession, order: OrderState) -> Timeline:
    """Every event the ledger holds of ``order``, oldest first (ties: in the order of
    ``EventKind``, a message before the changes it caused, then as the rows were written)."""
    events: list[Event] = []

    history = await session.execute(
        select(
            *_columns(StatusChange, OrderStatusHistory, history_id=OrderStatusHistory.id),
            OrderStatusHistory.source.label("sync_source"),
        )
        .where(OrderStatusHistory.order_pk == order.order_pk)
        .order_by(OrderStatusHistory.id)
    )
    for row in history.all():
        change = _build(StatusChange, row)
        events.append(
            Event(change.observed_at, EventKind.STATUS_CHANGE, row.sync_source.value, change)
        )

    prices = await session.execute(
        select(
            *_columns(PriceChange, OrderPriceChange, change_id=OrderPriceChange.id),
            OrderPriceChange.source.label("sync_source"),
        )
        .where(OrderPriceChange.order_pk == order.order_pk)
        .order_by(OrderPriceChange.id)
    )
    for row in prices.all():
        price = _build(PriceChange, row)
        events.append(
            Event(price.observed_at, EventKind.PRICE_CHANGE, row.sync_source.value, price)
        )

    # Each parcel with each of its events (a parcel with none yet: once, without one).
    traces = await session.execute(
        select(
            *_columns(
                ShipmentTrace,
                ShipmentEvent,
                shipment_id=Shipment.id,
                tracking_number=Shipment.tracking_number,
                carrier=Shipment.carrier,
                carrier_code=Shipment.carrier_code,
                parcel_status=Shipment.raw_status,
                line_id=Shipment.line_id,
                delivered_at=Shipment.delivered_at,
                event_id=ShipmentEvent.id,
                event_status=ShipmentEvent.status,
            ),
            Shipment.last_synced_at.label("parcel_synced_at"),
        )
        .select_from(Shipment)
        .outerjoin(ShipmentEvent, ShipmentEvent.shipment_id == Shipment.id)
        .where(Shipment.order_pk == order.order_pk)
        .order_by(Shipment.id, ShipmentEvent.id)
    )
    for row in traces.all():
        trace = _build(ShipmentTrace, row)
        if trace.event_id is None:
            at = row.parcel_synced_at
            events.append(Event(at, EventKind.SHIPMENT, SOURCE_LOGISTICS, trace))
        else:
            at = trace.event_at or trace.observed_at or row.parcel_synced_at
            events.append(Event(at, EventKind.SHIPMENT_EVENT, SOURCE_LOGISTICS, trace))

    refunds = [
        _build(RefundInfo, row)
        for row in await session.execute(
            select(*_columns(RefundInfo, Refund))
            .where(Refund.order_pk == order.order_pk)
            .order_by(Refund.id)
        )
    ]
    for refund in refunds:
        at = refund.requested_at or refund.upstream_modified_at or refund.last_synced_at
        events.append(Event(at, EventKind.REFUND, SOURCE_AFTER_SALES, refund))
        if refund.resolved_at is not None:
            kind = EventKind.REFUND_RESOLVED
            events.append(Event(refund.resolved_at, kind, SOURCE_AFTER_SALES, refund))

    # A refund message may name only the refund: it belongs to the order all the same.
    names_order = WebhookInbox.order_id == order.order_id
    refund_ids = [refund.refund_id for refund in refunds]
    inbox = await session.execute(
        select(
            *_columns(
                InboxMessage, WebhookInbox, inbox_id=WebhookInbox.id, message_kind=WebhookInbox.kind
            )
        )
        .where(
            WebhookInbox.account_id == order.account_id,
            WebhookInbox.platform == order.platform,
            or_(names_order, WebhookInbox.refund_id.in_(refund_ids)) if refund_ids else names_order,
        )
        .order_by(WebhookInbox.id)
    )
    for row in inbox.all():
        message = _build(InboxMessage, row)
        events.append(Event(message.received_at, EventKind.INBOX_MESSAGE, "webhook", message))

    attempts = await session.execute(
        select(*_columns(PaymentAttemptInfo, PaymentAttempt, attempt_id=PaymentAttempt.id))
        .where(*_of_order(PaymentAttempt, order))
        .order_by(PaymentAttempt.started_at, PaymentAttempt.id)
    )
    for row in attempts.all():
        attempt = _build(PaymentAttemptInfo, row)
        events.append(Event(attempt.started_at, EventKind.PAYMENT_ATTEMPT, SOURCE_PAY, attempt))

    failures = [
        _build(FailureInfo, row)
        for row in await session.execute(
            select(
                *_columns(
                    FailureInfo,
                    SyncFailure,
                    failure_id=SyncFailure.id,
                    failure_kind=SyncFailure.kind,
                )
            )
            .where(*_of_order(SyncFailure, order))
            .order_by(SyncFailure.id)
        )
    ]
    for failure in failures:
        source = failure.source.value
        events.append(Event(failure.first_failed_at, EventKind.SYNC_FAILURE, source, failure))
        if failure.dismissed_at is not None:
            closed = Event(failure.dismissed_at, EventKind.FAILURE_CLOSED, SOURCE_OPERATOR, failure)
            events.append(closed)
        elif failure.resolved_at is not None:
            closed = Event(failure.resolved_at, EventKind.FAILURE_CLOSED, SOURCE_RECONCILE, failure)
            events.append(closed)

    open_failure = next((f for f in failures if f.resolved_at is None), None)
    return Timeline(order, open_failure, tuple(sort_events(events)))


def _of_order(model: Any, order: OrderState) -> tuple[ColumnElement[bool], ...]:
    """The rows of a table keyed by account, platform and order id that are ``order``'s."""
    return (
        model.account_id == order.account_id,
        model.platform == order.platform,
        model.order_id == order.order_id,
    )


def sort_events(events: Sequence[Event]) -> list[Event]:
    """Oldest first; at the same instant by kind (the order of ``EventKind``), then as given."""
    return sorted(events, key=lambda event: (event.at, _RANK[event.kind]))


# --- in words: what `pandasync order` prints and the console shows ---------------------------


def at(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def money(amount: Decimal | None, currency: str = "") -> str:
    if amount is None:
        return "-"
    return f"{amount} {currency}".rstrip()


def describe(event: Event) -> str:
    """One line saying what happened."""
    d = event.detail
    if isinstance(d, InboxMessage):
        signature = d.signature_state.value if d.signature_state else "not checked"
        text = f"{d.message_kind.value} message {d.message_type}: {d.state.value}"
        text += f", signature {signature}"
        if d.refund_id:
            text += f", refund {d.refund_id}"
        return f"{text} (inbox #{d.inbox_id})"
    if isinstance(d, StatusChange):
        before = d.from_status.value if d.from_status else "(new)"
        raw = f"{d.from_raw_status} → {d.to_raw_status}" if d.from_raw_status else d.to_raw_status
        text = f"status {before} → {d.to_status.value} ({raw})"
        return text + (f", after inbox #{d.inbox_id}" if d.inbox_id else "")
    if isinstance(d, PriceChange):
        parts = [f"total {money(d.old_total_amount)} → {money(d.new_total_amount, d.currency)}"]
        for name, old, new in (
            ("products", d.old_product_amount, d.new_product_amount),
            ("shipping", d.old_shipping_fee, d.new_shipping_fee),
        ):
            if old != new:
                parts.append(f"{name} {money(old)} → {money(new)}")
        text = "price: " + ", ".join(parts)
        return text + (f", after inbox #{d.inbox_id}" if d.inbox_id else "")
    if isinstance(d, ShipmentTrace):
        parcel = f"parcel {d.tracking_number}" + (f" ({d.carrier})" if d.carrier else "")
        if d.event_id is None:
            return f"{parcel}: {d.parcel_status or 'no trace event yet'}"
        what = " ".join(part for part in (d.event_status, d.description) if part) or "-"
        return f"{parcel}: {what}" + (f" @ {d.location}" if d.location else "")
    if isinstance(d, RefundInfo):
        amount = money(d.amount, d.currency)
        now = f"{d.status.value} ({d.raw_status})"
        if event.kind is EventKind.REFUND_RESOLVED:
            return f"refund {d.refund_id} {now}: {amount}"
        reason = f", reason: {d.reason}" if d.reason else ""
        return f"refund {d.refund_id} requested: {amount}{reason}; now {now}"
    if isinstance(d, PaymentAttemptInfo):
        text = f"payment {d.state.value}: {money(d.amount, d.currency)} by {d.requested_by}"
        if d.finished_at is not None:
            text += f", finished {at(d.finished_at)}"
        if d.pay_url:
            text += f", pay by hand at {d.pay_url}"
        if d.upstream_code or d.upstream_msg:
            text += f", upstream {d.upstream_code or '-'} {d.upstream_msg or ''}".rstrip()
        if d.error:
            text += f", error: {d.error}"
        return text
    assert isinstance(d, FailureInfo)
    if event.kind is EventKind.FAILURE_CLOSED:
        if d.dismissed_at is not None:
            reason = f": {d.dismissed_reason}" if d.dismissed_reason else ""
            return f"failure #{d.failure_id} dismissed by {d.dismissed_by or '-'}{reason}"
        return f"failure #{d.failure_id} resolved: the order synced"
    return f"sync failed (failure #{d.failure_id}): {failure_text(d)}"


def failure_text(f: FailureInfo) -> str:
    text = (
        f"{f.failure_kind.value}, {f.attempts} attempt(s), last {at(f.last_failed_at)}: {f.error}"
    )
    if f.replay_count:
        text += f" (replayed {f.replay_count}x, last {at(f.replayed_at)})"
    return text
