"""Platform-neutral snapshots of what PandaPon's query APIs return, and the answers of its
payment actions.

``service.pandapon.mapping`` turns Taobao and 1688 payloads into these; ``service.ledger`` writes
them. Amounts are ``Decimal`` in the order currency (yuan for CNY), times are aware datetimes,
and every snapshot keeps the payload it came from in ``raw`` so no upstream field is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from service.domain import OrderStatus, PaymentState, Platform, RefundStatus


@dataclass(frozen=True, slots=True)
class LineSnapshot:
    line_id: str
    product_id: str | None = None
    sku_id: str | None = None
    title: str | None = None
    quantity: int | None = None
    unit_price: Decimal | None = None
    amount: Decimal | None = None
    raw_status: str | None = None
    # Taobao logistics are fetched per sub-order: the id to ask for, when it differs from line_id.
    logistics_ref: str | None = None
    # What the order detail says about the line's parcel (Taobao sub-orders carry it).
    tracking_number: str | None = None
    carrier: str | None = None
    # False when the detail says there is no logistics number yet (nothing to fetch);
    # None when it does not say.
    has_tracking: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    platform: Platform
    order_id: str
    status: OrderStatus
    raw_status: str
    currency: str = "CNY"
    total_amount: Decimal | None = None
    product_amount: Decimal | None = None
    shipping_fee: Decimal | None = None
    discount_amount: Decimal | None = None
    close_reason: str | None = None
    created_at: datetime | None = None
    modified_at: datetime | None = None
    paid_at: datetime | None = None
    shipped_at: datetime | None = None
    completed_at: datetime | None = None
    lines: tuple[LineSnapshot, ...] = ()
    # Refund ids the order detail itself mentions (1688 items carry them), for refresh.
    refund_ids: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShipmentEventSnapshot:
    event_key: str  # a stable digest of (time, status, description): the natural key
    event_at: datetime | None
    status: str | None = None
    description: str | None = None
    location: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShipmentSnapshot:
    tracking_number: str
    carrier: str | None = None
    carrier_code: str | None = None
    raw_status: str | None = None
    line_id: str | None = None
    delivered: bool = False
    events: tuple[ShipmentEventSnapshot, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RefundSnapshot:
    platform: Platform
    refund_id: str
    order_id: str
    status: RefundStatus
    raw_status: str
    currency: str = "CNY"
    amount: Decimal | None = None
    line_id: str | None = None
    reason: str | None = None
    requested_at: datetime | None = None
    resolved_at: datetime | None = None
    modified_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """An order-list record the mapping could not read: its order id, when that much could
    be read, and why the rest could not."""

    order_id: str | None
    error: str


@dataclass(frozen=True, slots=True)
class OrderListPage:
    """One page of an order list. A record that cannot be read is set aside in
    ``unreadable`` rather than failing the page: one odd order must not stop a sweep."""

    total: int
    page_no: int
    page_size: int
    orders: tuple[OrderSnapshot, ...]
    unreadable: tuple[UnreadableRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class UnreadableRefund:
    """A refund-list record the mapping could not read: its refund and order ids, each when
    that much could be read, and why the rest could not."""

    order_id: str | None
    refund_id: str | None
    error: str


@dataclass(frozen=True, slots=True)
class RefundListPage:
    """One page of a refund (after-sales) list; unreadable records are set aside in
    ``unreadable``, as on an order-list page."""

    total: int
    page_no: int
    page_size: int
    refunds: tuple[RefundSnapshot, ...]
    unreadable: tuple[UnreadableRefund, ...] = ()


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """What a payment call's answer says about one order.

    ``state`` is ``paid``, ``pay_by_hand`` (``pay_url`` is the link for a person),
    ``held_back`` (quota or risk control kept it from being paid), ``failed`` (upstream said it
    did not pay; ``reason`` in its words) or ``unknown`` (the answer does not say).
    """

    order_id: str
    state: PaymentState
    pay_url: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentAnswer:
    """A payment call that upstream answered with code 200: one result per order asked for,
    and what identifies the answer in PandaPon's logs."""

    platform: Platform
    results: tuple[PaymentResult, ...]
    request_id: str | None = None
    msg: str | None = None
    raw: Any = None

    def for_order(self, order_id: str) -> PaymentResult:
        for result in self.results:
            if result.order_id == order_id:
                return result
        return PaymentResult(order_id, PaymentState.UNKNOWN, reason="the answer does not name it")
