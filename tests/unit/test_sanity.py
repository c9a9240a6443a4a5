"""The plausibility rules of upstream answers (``service.pandapon.sanity``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)
from service.pandapon.sanity import (
    FUTURE_TOLERANCE,
    MAX_LINES,
    ImplausibleAnswer,
    check_order,
    untrusted_time,
)

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def order(**fields: Any) -> OrderSnapshot:
    return replace(
        OrderSnapshot(Platform.ALIBABA_1688, "O1", OrderStatus.PAID, "waitsellersend"), **fields
    )


def refund(amount: str) -> RefundSnapshot:
    return RefundSnapshot(
        Platform.ALIBABA_1688, "R1", "O1", RefundStatus.REFUNDED, "success", amount=Decimal(amount)
    )


def test_a_real_order_passes() -> None:
    check_order(
        order(
            total_amount=Decimal("99.50"),
            discount_amount=Decimal("-3.00"),  # 1688: the seller raised the price
            lines=tuple(LineSnapshot(f"L{i}", quantity=2, amount=Decimal(1)) for i in range(3)),
        ),
        [refund("10")],
    )


@pytest.mark.parametrize(
    ("snapshot", "refunds", "field"),
    [
        (order(shipping_fee=Decimal("-1")), [], "shipping_fee"),
        (order(product_amount=Decimal("1e9")), [], "product_amount"),
        (order(discount_amount=Decimal("-1e9")), [], "discount_amount"),
        (order(lines=tuple(LineSnapshot(f"L{i}") for i in range(MAX_LINES + 1))), [], "lines"),
        (order(lines=(LineSnapshot("L1", unit_price=Decimal("-2")),)), [], "line L1 unit_price"),
        (order(), [refund("-10")], "refund R1 amount"),
        (order(raw_status="X" * 65), [], "raw_status"),
        (order(currency="CNYX"), [], "currency"),
        (order(lines=(LineSnapshot("L1"), LineSnapshot("L" * 65))), [], "line 2 line_id"),
        (order(lines=(LineSnapshot("L1", sku_id="s" * 80),)), [], "line 1 sku_id"),
        (order(), [replace(refund("1"), raw_status="r" * 65)], "refund 1 raw_status"),
    ],
)
def test_what_no_order_carries_is_refused_naming_the_field(
    snapshot: OrderSnapshot, refunds: list[RefundSnapshot], field: str
) -> None:
    with pytest.raises(ImplausibleAnswer) as refused:
        check_order(snapshot, refunds)
    assert refused.value.field == field
    assert "O1" in str(refused.value)


def test_a_parcel_with_a_code_longer_than_the_ledger_keeps_is_refused_by_name() -> None:
    events = (ShipmentEventSnapshot("k" * 64, NOW, status="SIGNED"),)  # a digest: 64 is fine
    fine = ShipmentSnapshot("SF1234567890", carrier_code="SF", events=events)
    check_order(order(), [], [fine])
    for parcel, field in (
        (replace(fine, tracking_number="9" * 65), "parcel 1 tracking_number"),
        (replace(fine, events=(replace(events[0], status="S" * 65),)), "parcel 1 event status"),
    ):
        with pytest.raises(ImplausibleAnswer) as refused:
            check_order(order(), [], [parcel])
        assert refused.value.field == field
        assert "65 characters, over the limit of 64" in str(refused.value)


def test_a_time_a_day_ahead_is_not_a_version() -> None:
    assert not untrusted_time(None, NOW)
    assert not untrusted_time(NOW + FUTURE_TOLERANCE, NOW)  # clock drift, a misread zone
    assert untrusted_time(NOW + FUTURE_TOLERANCE + timedelta(seconds=1), NOW)
