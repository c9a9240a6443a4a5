"""The sandbox's world of orders, in neutral terms.

Orders here speak the ledger's language (normalized status, ``Decimal`` yuan, aware datetimes),
never PandaPon's: ``render.py`` turns them into Taobao and 1688 payloads. So a test comparing
the ledger with ``truth()`` checks the client's mapping against an independent rendering rather
than against itself.

Every operation validates the transition (409 when the order is not in a state that allows it),
stamps ``modified_at`` and tells the listeners (the callback deliverer) what changed. Times are
whole seconds (Taobao writes no finer), and an order's ``modified_at`` strictly increases: two
changes in one second are one second apart.

A change happens when it is made, unless ``at`` says it happened earlier (the scenario gives
orders lives of days that way): ``at`` sets the business time (placed, paid, shipped,
delivered, completed, cancelled, a refund requested) and never the modification time, which
is always the moment the change was made, so the order lists and sweeps see it as new. A
parcel's trace never goes back in time: a step without a time of its own comes no earlier than
the parcel's shipping and its previous step.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from service.domain import OrderStatus, Platform, RefundStatus

CENT = Decimal("0.01")


class WorldError(Exception):
    """A control or query request the world refuses; ``status`` is the HTTP status to answer."""

    status = 400


class NotFound(WorldError):
    status = 404


class Conflict(WorldError):
    status = 409


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    PAID = "paid"
    PRICE_CHANGED = "price_changed"
    SHIPPED = "shipped"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    REFUND_OPENED = "refund_opened"
    REFUND_RESOLVED = "refund_resolved"
    RAW_STATUS = "raw_status"


@dataclass
class WorldLine:
    line_id: str  # Taobao subPurchaseOrderId, 1688 subItemID
    title: str
    quantity: int
    unit_price: Decimal
    product_id: str
    sku_id: str | None = None
    outer_line_id: str | None = None  # Taobao purchase_order_line_outer_id

    @property
    def amount(self) -> Decimal:
        return (self.unit_price * self.quantity).quantize(CENT)


@dataclass
class WorldEvent:
    at: datetime
    description: str
    status: str | None = None  # Taobao trace status: ACCEPT, TRANSPORT, DELIVERING, SIGN
    location: str | None = None


@dataclass
class WorldShipment:
    tracking_number: str
    carrier: str
    carrier_code: str | None
    line_ids: list[str]
    shipped_at: datetime
    events: list[WorldEvent] = field(default_factory=list)
    delivered_at: datetime | None = None


@dataclass
class WorldRefund:
    platform: Platform
    refund_id: str
    order_id: str
    amount: Decimal
    status: RefundStatus
    requested_at: datetime
    modified_at: datetime
    line_id: str | None = None
    reason: str | None = None
    resolved_at: datetime | None = None


@dataclass
class WorldOrder:
    platform: Platform
    order_id: str
    status: OrderStatus
    lines: list[WorldLine]
    product_amount: Decimal
    shipping_fee: Decimal
    created_at: datetime
    modified_at: datetime
    currency: str = "CNY"
    discount_amount: Decimal = Decimal("0.00")  # 1688 only; Taobao folds changes into products
    close_reason: str | None = None
    paid_at: datetime | None = None
    shipped_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    shipments: list[WorldShipment] = field(default_factory=list)
    refunds: list[WorldRefund] = field(default_factory=list)
    # Rendered instead of the status's own raw value, until cleared (a status PandaPon adds).
    raw_status: str | None = None

    @property
    def total_amount(self) -> Decimal:
        return self.product_amount + self.shipping_fee - self.discount_amount

    @property
    def refunded_amount(self) -> Decimal:
        return sum(
            (r.amount for r in self.refunds if r.status is RefundStatus.REFUNDED), Decimal("0.00")
        )

    def line(self, line_id: str) -> WorldLine:
        for line in self.lines:
            if line.line_id == line_id:
                return line
        raise NotFound(f"order {self.order_id} has no line {line_id}")

    def shipment_for_line(self, line_id: str) -> WorldShipment | None:
        """The latest parcel carrying ``line_id``."""
        for shipment in reversed(self.shipments):
            if line_id in shipment.line_ids:
                return shipment
        return None

    def truth(self) -> dict[str, Any]:
        """The neutral, JSON form of this order (amounts as strings, times ISO 8601 UTC)."""
        taobao = self.platform is Platform.TAOBAO
        return {
            "platform": self.platform.value,
            "order_id": self.order_id,
            "status": self.status.value,
            "currency": self.currency,
            "total_amount": _money(self.total_amount),
            "product_amount": _money(self.product_amount),
            "shipping_fee": _money(self.shipping_fee),
            "discount_amount": None if taobao else _money(self.discount_amount),
            "refunded_amount": _money(self.refunded_amount),
            "close_reason": self.close_reason,
            "created_at": _iso(self.created_at),
            "modified_at": _iso(self.modified_at),
            "paid_at": _iso(self.paid_at),
            "shipped_at": _iso(self.shipped_at),
            "completed_at": _iso(self.completed_at),
            "cancelled_at": _iso(self.cancelled_at),
            "lines": [
                {
                    "line_id": line.line_id,
                    "product_id": line.product_id,
                    "sku_id": line.sku_id,
                    "title": line.title,
                    "quantity": line.quantity,
                    "unit_price": _money(line.unit_price),
                    "amount": _money(line.amount),
                }
                for line in self.lines
            ],
            "shipments": [
                {
                    "tracking_number": s.tracking_number,
                    "carrier": s.carrier,
                    "carrier_code": s.carrier_code,
                    "line_ids": list(s.line_ids),
                    "shipped_at": _iso(s.shipped_at),
                    "delivered": s.delivered_at is not None,
                    "delivered_at": _iso(s.delivered_at),
                    "events": [
                        {
                            "at": _iso(e.at),
                            "status": e.status,
                            "description": e.description,
                            "location": e.location,
                        }
                        for e in s.events
                    ],
                }
                for s in self.shipments
            ],
            "refunds": [refund_truth(r) for r in self.refunds],
        }


def refund_truth(refund: WorldRefund) -> dict[str, Any]:
    return {
        "platform": refund.platform.value,
        "refund_id": refund.refund_id,
        "order_id": refund.order_id,
        "line_id": refund.line_id,
        "status": refund.status.value,
        "amount": _money(refund.amount),
        "reason": refund.reason,
        "requested_at": _iso(refund.requested_at),
        "resolved_at": _iso(refund.resolved_at),
        "modified_at": _iso(refund.modified_at),
    }


def _money(value: Decimal) -> str:
    return str(value.quantize(CENT))


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    order: WorldOrder
    refund: WorldRefund | None = None


@dataclass(frozen=True, slots=True)
class NewLine:
    title: str
    quantity: int
    unit_price: Decimal
    product_id: str | None = None
    sku_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    description: str
    status: str | None = None
    location: str | None = None
    at: datetime | None = None


Listener = Callable[[Change], None]
Clock = Callable[[], datetime]

_CARRIERS = (("中通快递", "ZTO"), ("圆通速递", "YTO"), ("韵达快递", "YUNDA"), ("申通快递", "STO"))


def _utc_now() -> datetime:
    return datetime.now(UTC)


class World:
    """All orders of both platforms; every change goes through a method here."""

    def __init__(self, *, seed: int | str = 0, clock: Clock = _utc_now) -> None:
        self._rng = random.Random(f"{seed}:world")
        self._clock = clock
        self._orders: dict[tuple[Platform, str], WorldOrder] = {}
        self._refunds: dict[tuple[Platform, str], WorldRefund] = {}
        self._taobao_lines: dict[str, tuple[WorldOrder, WorldLine]] = {}
        self._ids: set[str] = set()
        self._listeners: list[Listener] = []
        # The order list of the last range asked for, until the next change: a backfill pages
        # one range hundreds of times, and listing means a scan and a sort of every order.
        # Every change that moves an order in a listing (creation, a new modified time) emits.
        self._version = 0
        self._listing: tuple[tuple[Any, ...], list[WorldOrder]] | None = None

    # --- queries ------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def orders(self, platform: Platform | None = None) -> list[WorldOrder]:
        return [o for o in self._orders.values() if platform is None or o.platform is platform]

    def now(self) -> datetime:
        """The world's clock, in whole seconds."""
        return self._now()

    def order(self, platform: Platform, order_id: str) -> WorldOrder:
        try:
            return self._orders[(platform, order_id)]
        except KeyError:
            raise NotFound(f"no {platform.value} order {order_id}") from None

    def refund(self, platform: Platform, refund_id: str) -> WorldRefund:
        try:
            return self._refunds[(platform, refund_id)]
        except KeyError:
            raise NotFound(f"no {platform.value} refund {refund_id}") from None

    def taobao_line(self, sub_order_id: str) -> tuple[WorldOrder, WorldLine]:
        try:
            return self._taobao_lines[sub_order_id]
        except KeyError:
            raise NotFound(f"no Taobao sub-order {sub_order_id}") from None

    def modified_between(
        self, platform: Platform, start: datetime, end: datetime
    ) -> list[WorldOrder]:
        """Orders modified in [start, end], oldest change first (a stable order for paging)."""
        key = (platform, start, end, self._version)
        if self._listing is not None and self._listing[0] == key:
            return self._listing[1]
        found = [o for o in self.orders(platform) if start <= o.modified_at <= end]
        found.sort(key=lambda o: (o.modified_at, o.order_id))
        self._listing = (key, found)
        return found

    def refunds_modified_between(
        self, platform: Platform, start: datetime, end: datetime
    ) -> list[WorldRefund]:
        """Refunds modified in [start, end], oldest change first (the refund lists)."""
        found = [
            r
            for (of, _), r in self._refunds.items()
            if of is platform and start <= r.modified_at <= end
        ]
        found.sort(key=lambda r: (r.modified_at, r.refund_id))
        return found

    # --- changes ------------------------------------------------------------------------------

    def create_order(
        self,
        platform: Platform,
        lines: Iterable[NewLine],
        *,
        shipping_fee: Decimal = Decimal("0.00"),
        order_id: str | None = None,
        currency: str = "CNY",
        at: datetime | None = None,
    ) -> WorldOrder:
        """A new order, pending payment; ``at``: when it was placed (default: now)."""
        new_lines = list(lines)
        if not new_lines:
            raise WorldError("an order needs at least one line")
        for line in new_lines:
            if line.quantity < 1 or line.unit_price < 0:
                raise WorldError("a line needs a quantity of at least 1 and a price of 0 or more")
        if shipping_fee < 0:
            raise WorldError("shipping_fee must not be negative")
        if order_id is not None:
            if not order_id.isdigit():
                raise WorldError("an order id is all digits, as on both platforms")
            if order_id in self._ids:
                raise Conflict(f"order id {order_id} is taken")
            self._ids.add(order_id)
        now = self._now()
        created = self._past(at, now)
        taobao = platform is Platform.TAOBAO
        world_lines = [
            WorldLine(
                line_id=self._new_id(12, "2000") if taobao else self._new_id(19),
                title=line.title,
                quantity=line.quantity,
                unit_price=line.unit_price.quantize(CENT),
                product_id=line.product_id or self._new_id(12, "6"),
                sku_id=line.sku_id or self._new_id(7, "5"),
                outer_line_id=self._new_id(19) if taobao else None,
            )
            for line in new_lines
        ]
        order = WorldOrder(
            platform=platform,
            order_id=order_id or self._new_id(19),
            status=OrderStatus.PENDING_PAYMENT,
            lines=world_lines,
            product_amount=sum((line.amount for line in world_lines), Decimal("0.00")),
            shipping_fee=shipping_fee.quantize(CENT),
            created_at=created,
            modified_at=now,
            currency=currency,
        )
        self._orders[(platform, order.order_id)] = order
        if taobao:
            for world_line in world_lines:
                self._taobao_lines[world_line.line_id] = (order, world_line)
        self._emit(ChangeKind.CREATED, order)
        return order

    def pay(self, order: WorldOrder, *, at: datetime | None = None) -> None:
        self._require(order, OrderStatus.PENDING_PAYMENT, "pay")
        order.paid_at = self._touch(order, at)
        order.status = OrderStatus.PAID
        self._emit(ChangeKind.PAID, order)

    def change_price(
        self,
        order: WorldOrder,
        *,
        total_amount: Decimal | None = None,
        shipping_fee: Decimal | None = None,
    ) -> None:
        """The seller changes the price before payment: a new shipping fee and/or a new total.

        1688 shows the difference as ``discount``; Taobao folds it into the product fee.
        """
        self._require(order, OrderStatus.PENDING_PAYMENT, "change the price of")
        if total_amount is None and shipping_fee is None:
            raise WorldError("give total_amount and/or shipping_fee")
        shipping = (shipping_fee if shipping_fee is not None else order.shipping_fee).quantize(CENT)
        total = (total_amount if total_amount is not None else order.total_amount).quantize(CENT)
        if shipping < 0 or total < shipping:
            raise WorldError("amounts must satisfy 0 <= shipping_fee <= total_amount")
        order.shipping_fee = shipping
        if order.platform is Platform.TAOBAO:
            order.product_amount = total - shipping
        else:
            order.discount_amount = order.product_amount + shipping - total
        self._touch(order)
        self._emit(ChangeKind.PRICE_CHANGED, order)

    def ship(
        self,
        order: WorldOrder,
        *,
        tracking_number: str | None = None,
        carrier: str | None = None,
        carrier_code: str | None = None,
        line_ids: list[str] | None = None,
        events: Iterable[NewEvent] = (),
        at: datetime | None = None,
    ) -> WorldShipment:
        """A parcel leaves: the order becomes shipped (a further parcel may follow)."""
        self._require(order, (OrderStatus.PAID, OrderStatus.SHIPPED), "ship")
        if line_ids is None:
            unshipped = [
                ln.line_id for ln in order.lines if not order.shipment_for_line(ln.line_id)
            ]
            line_ids = unshipped or [ln.line_id for ln in order.lines]
        for line_id in line_ids:
            order.line(line_id)
        if tracking_number is not None and any(
            s.tracking_number == tracking_number for s in order.shipments
        ):
            raise Conflict(f"order {order.order_id} already has parcel {tracking_number}")
        default_carrier, default_code = self._rng.choice(_CARRIERS)
        shipped = self._touch(order, at)
        shipment = WorldShipment(
            tracking_number=tracking_number or self._new_id(14, "7"),
            carrier=carrier or default_carrier,
            carrier_code=carrier_code or (default_code if carrier is None else None),
            line_ids=list(line_ids),
            shipped_at=shipped,
        )
        given = list(events) or [
            NewEvent("【杭州市】 快件已揽收", "ACCEPT", "浙江省 杭州市", shipped)
        ]
        for new_event in given:
            shipment.events.append(self._event(new_event, shipment))
        order.shipments.append(shipment)
        if order.status is OrderStatus.PAID:
            order.status = OrderStatus.SHIPPED
            order.shipped_at = shipped
        self._emit(ChangeKind.SHIPPED, order)
        return shipment

    def add_event(self, order: WorldOrder, tracking_number: str, event: NewEvent) -> WorldEvent:
        """A trace step: no callback (logistics move without messages), no modified time."""
        shipment = self._shipment(order, tracking_number)
        added = self._event(event, shipment)
        for existing in shipment.events:  # the same time, status and text: the same step
            if (existing.at, existing.status, existing.description) == (
                added.at,
                added.status,
                added.description,
            ):
                return existing
        shipment.events.append(added)
        return added

    def deliver(
        self, order: WorldOrder, tracking_number: str | None = None, *, at: datetime | None = None
    ) -> WorldShipment:
        """The parcel is signed for (a SIGN trace step); the buyer has yet to confirm."""
        self._require(order, OrderStatus.SHIPPED, "deliver")
        if tracking_number is None:
            pending = [s for s in order.shipments if s.delivered_at is None]
            if not pending:
                raise Conflict(f"order {order.order_id} has no undelivered parcel")
            shipment = pending[0]
        else:
            shipment = self._shipment(order, tracking_number)
            if shipment.delivered_at is not None:
                raise Conflict(f"parcel {tracking_number} is already delivered")
        signed = NewEvent("【杭州市】 已签收，签收人：本人", "SIGN", "浙江省 杭州市", at)
        event = self._event(signed, shipment)
        shipment.events.append(event)
        shipment.delivered_at = event.at
        return shipment

    def confirm(self, order: WorldOrder, *, at: datetime | None = None) -> None:
        self._require(order, OrderStatus.SHIPPED, "confirm")
        order.completed_at = self._touch(order, at)
        order.status = OrderStatus.COMPLETED
        self._emit(ChangeKind.CONFIRMED, order)

    def cancel(
        self, order: WorldOrder, reason: str | None = None, *, at: datetime | None = None
    ) -> None:
        self._require(order, (OrderStatus.PENDING_PAYMENT, OrderStatus.PAID), "cancel")
        self._close(order, reason or "buyerCancel", at)

    def open_refund(
        self,
        order: WorldOrder,
        amount: Decimal,
        *,
        line_id: str | None = None,
        reason: str | None = None,
        at: datetime | None = None,
    ) -> WorldRefund:
        self._require(
            order,
            (OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.COMPLETED),
            "refund",
        )
        amount = amount.quantize(CENT)
        if line_id is None:
            # After-sales are per line on both platforms; the order detail names the latest
            # refund of each line, which is how a reconcile finds refunds a message did not name.
            line_id = order.lines[0].line_id
        if line_id is not None:
            order.line(line_id)
        open_or_done = sum(
            (
                r.amount
                for r in order.refunds
                if r.status in (RefundStatus.REQUESTED, RefundStatus.REFUNDED)
            ),
            Decimal("0.00"),
        )
        if amount <= 0 or amount + open_or_done > order.total_amount:
            raise WorldError(
                f"refund amount must be > 0 and at most {order.total_amount - open_or_done}"
            )
        requested = self._touch(order, at)
        refund = WorldRefund(
            platform=order.platform,
            refund_id=(
                self._new_id(15, "1") if order.platform is Platform.TAOBAO else self._new_id(16)
            ),
            order_id=order.order_id,
            amount=amount,
            status=RefundStatus.REQUESTED,
            requested_at=requested,
            modified_at=order.modified_at,
            line_id=line_id,
            reason=reason or "不想要了",
        )
        if order.platform is Platform.ALIBABA_1688:
            refund.refund_id = "TQ" + refund.refund_id
        order.refunds.append(refund)
        self._refunds[(order.platform, refund.refund_id)] = refund
        self._emit(ChangeKind.REFUND_OPENED, order, refund)
        return refund

    def resolve_refund(self, refund: WorldRefund, outcome: RefundStatus) -> None:
        """Refund, reject or close a requested refund; a full refund closes an open order.

        Resolved when it is made: Taobao's refund shows no resolution time but its
        modification time, so the two are one, and a refund's modification time is now."""
        if outcome not in (RefundStatus.REFUNDED, RefundStatus.REJECTED, RefundStatus.CANCELLED):
            raise WorldError("outcome must be refunded, rejected or cancelled")
        if refund.status is not RefundStatus.REQUESTED:
            raise Conflict(f"refund {refund.refund_id} is {refund.status.value}, not requested")
        order = self.order(refund.platform, refund.order_id)
        now = self._touch(order)
        refund.status = outcome
        refund.modified_at = now
        refund.resolved_at = now
        self._emit(ChangeKind.REFUND_RESOLVED, order, refund)
        fully_refunded = order.refunded_amount >= order.total_amount
        if fully_refunded and order.status in (OrderStatus.PAID, OrderStatus.SHIPPED):
            self._close(order, "refunded")

    def set_raw_status(self, order: WorldOrder, raw_status: str | None) -> None:
        """Render the order's raw status as ``raw_status`` (None: as its status again), as if
        PandaPon had moved it to a status of its own; a change like any other."""
        order.raw_status = raw_status
        self._touch(order)
        self._emit(ChangeKind.RAW_STATUS, order)

    # --- helpers ------------------------------------------------------------------------------

    def _close(self, order: WorldOrder, reason: str, at: datetime | None = None) -> None:
        order.cancelled_at = self._touch(order, at)
        order.status = OrderStatus.CANCELLED
        order.close_reason = reason
        self._emit(ChangeKind.CANCELLED, order)

    def _require(
        self, order: WorldOrder, allowed: OrderStatus | tuple[OrderStatus, ...], action: str
    ) -> None:
        states = allowed if isinstance(allowed, tuple) else (allowed,)
        if order.status not in states:
            raise Conflict(f"cannot {action} order {order.order_id}: it is {order.status.value}")

    def _shipment(self, order: WorldOrder, tracking_number: str) -> WorldShipment:
        for shipment in order.shipments:
            if shipment.tracking_number == tracking_number:
                return shipment
        raise NotFound(f"order {order.order_id} has no parcel {tracking_number}")

    def _event(self, event: NewEvent, shipment: WorldShipment) -> WorldEvent:
        """``event`` as a step of ``shipment``'s trace; without a time of its own: now, but
        never before the parcel left or before its previous step."""
        if event.at is not None:
            at = event.at.astimezone(UTC).replace(microsecond=0)
        else:
            at = max(self._now(), shipment.shipped_at, *(e.at for e in shipment.events))
        return WorldEvent(
            at=at, description=event.description, status=event.status, location=event.location
        )

    def _now(self) -> datetime:
        return self._clock().astimezone(UTC).replace(microsecond=0)

    def _touch(self, order: WorldOrder, at: datetime | None = None) -> datetime:
        """Stamp a change: now, or one second after the last change if that is not later.
        Returns when the change happened: ``at`` when given (not after the stamp), else the
        stamp."""
        now = max(self._now(), order.modified_at + timedelta(seconds=1))
        happened = self._past(at, now)
        order.modified_at = now
        return happened

    @staticmethod
    def _past(at: datetime | None, now: datetime) -> datetime:
        """``at`` in whole seconds (``now`` when None); a time after ``now`` is refused."""
        if at is None:
            return now
        if at.tzinfo is None:
            raise WorldError("a time needs its time zone")
        when = at.astimezone(UTC).replace(microsecond=0)
        if when > now:
            raise WorldError(f"{when.isoformat()} is in the future of this world")
        return when

    def _new_id(self, digits: int, prefix: str = "") -> str:
        while True:
            tail = digits - len(prefix)
            value = prefix + str(self._rng.randrange(10 ** (tail - 1), 10**tail))
            if value not in self._ids:
                self._ids.add(value)
                return value

    def _emit(self, kind: ChangeKind, order: WorldOrder, refund: WorldRefund | None = None) -> None:
        change = Change(kind, order, refund)
        self._version += 1
        for listener in self._listeners:
            listener(change)
