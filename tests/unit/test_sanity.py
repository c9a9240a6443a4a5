"""The plausibility rules of upstream answers (``service.pandapon.sanity``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon.models import LineSnapshot, OrderSnapshot, RefundSnapshot
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
    ],
)
def test_what_no_order_carries_is_refused_naming_the_field(
    snapshot: OrderSnapshot, refunds: list[RefundSnapshot], field: str
) -> None:
    with pytest.raises(ImplausibleAnswer) as refused:
        check_order(snapshot, refunds)
    assert refused.value.field == field
    assert "O1" in str(refused.value)


def test_a_time_a_day_ahead_is_not_a_version() -> None:
    assert not untrusted_time(None, NOW)
    assert not untrusted_time(NOW + FUTURE_TOLERANCE, NOW)  # clock drift, a misread zone
    assert untrusted_time(NOW + FUTURE_TOLERANCE + timedelta(seconds=1), NOW)
