"""Whether an upstream answer is plausible enough to become ledger truth.

An answer can parse and still be poison: a negative total, ten thousand lines, a modification
time in the year 9999. Written as it is, it would become the ledger's truth (and phantom lines
would outlive the fix). Two kinds of rule:

- ``check_order`` refuses what no real order carries (``ImplausibleAnswer``, a
  ``MalformedResponse``): the reconcile records it in ``sync_failures`` with the reason and
  writes nothing, so the ledger keeps the last plausible truth until PandaPon answers sanely.
- ``untrusted_time`` spots an upstream time too far in the future to serve as a version: the
  write keeps the rest of the truth but not that time (see ``service.ledger.write``), so the
  next truth is not refused as older.

The limits are ours, not PandaPon's: generous beyond any real purchase order.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal

from service.pandapon.errors import MalformedResponse
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot

MAX_LINES = 500  # lines of one purchase order
MAX_QUANTITY = 1_000_000  # pieces of one line
MAX_AMOUNT = Decimal("100000000")  # one hundred million, in the order's currency
# Clocks drift and a time zone can be misread by hours; a day ahead is neither.
FUTURE_TOLERANCE = timedelta(days=1)
# The widest id or status code the ledger stores (its columns: service/ledger/models.py), and
# a currency code's width. Longer is no id PandaPon issues: refused by name, not by a
# database error mid-write.
MAX_CODE_CHARS = 64
CURRENCY_CHARS = 3


class ImplausibleAnswer(MalformedResponse):
    """An answer that parses but cannot be true; ``field`` names the culprit."""

    outcome = "implausible"


def untrusted_time(value: datetime | None, now: datetime) -> bool:
    """True when ``value`` lies further in the future than clocks can explain."""
    return value is not None and value > now + FUTURE_TOLERANCE


def _amounts(
    order: OrderSnapshot, refunds: Iterable[RefundSnapshot]
) -> Iterable[tuple[str, Decimal | None]]:
    yield "total_amount", order.total_amount
    yield "product_amount", order.product_amount
    yield "shipping_fee", order.shipping_fee
    for line in order.lines:
        yield f"line {line.line_id} amount", line.amount
        yield f"line {line.line_id} unit_price", line.unit_price
    for refund in refunds:
        yield f"refund {refund.refund_id} amount", refund.amount


def _codes(
    order: OrderSnapshot, refunds: Iterable[RefundSnapshot], shipments: Iterable[ShipmentSnapshot]
) -> Iterable[tuple[str, str | None, int]]:
    """Every id and status code of the answer, named, with the most characters it may have."""
    yield "raw_status", order.raw_status, MAX_CODE_CHARS
    yield "currency", order.currency, CURRENCY_CHARS
    for n, line in enumerate(order.lines, 1):
        for name in ("line_id", "product_id", "sku_id", "raw_status"):
            yield f"line {n} {name}", getattr(line, name), MAX_CODE_CHARS
    for n, refund in enumerate(refunds, 1):
        for name in ("refund_id", "line_id", "raw_status"):
            yield f"refund {n} {name}", getattr(refund, name), MAX_CODE_CHARS
        yield f"refund {n} currency", refund.currency, CURRENCY_CHARS
    for n, parcel in enumerate(shipments, 1):
        for name in ("tracking_number", "carrier_code", "raw_status", "line_id"):
            yield f"parcel {n} {name}", getattr(parcel, name), MAX_CODE_CHARS
        for event in parcel.events:
            yield f"parcel {n} event status", event.status, MAX_CODE_CHARS


def check_order(
    order: OrderSnapshot,
    refunds: Iterable[RefundSnapshot] = (),
    shipments: Iterable[ShipmentSnapshot] = (),
) -> None:
    """Raise ``ImplausibleAnswer`` when the order (with its refunds and parcels) cannot be
    true."""

    def refuse(field: str, why: str) -> ImplausibleAnswer:
        return ImplausibleAnswer(f"order {order.order_id}: {field} {why}", field=field)

    if len(order.lines) > MAX_LINES:
        raise refuse("lines", f"number {len(order.lines):,}, over the limit of {MAX_LINES}")
    for field, amount in _amounts(order, refunds):
        if amount is None:
            continue
        if amount < 0:
            raise refuse(field, f"is negative ({amount})")
        if amount > MAX_AMOUNT:
            raise refuse(field, f"is {amount}, over the limit of {MAX_AMOUNT}")
    # 1688's discount is a price adjustment either way: negative when the seller raised it.
    if order.discount_amount is not None and abs(order.discount_amount) > MAX_AMOUNT:
        raise refuse("discount_amount", f"is {order.discount_amount}, over the limit")
    for line in order.lines:
        if line.quantity is not None and not 0 <= line.quantity <= MAX_QUANTITY:
            raise refuse(f"line {line.line_id} quantity", f"is {line.quantity}")
    for field, code, most in _codes(order, refunds, shipments):
        if code is not None and len(code) > most:
            raise refuse(field, f"has {len(code)} characters, over the limit of {most}")
