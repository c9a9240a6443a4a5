"""The sandbox's snake_case Taobao rendering (docs/upstream.md#evidence) against its world."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.ledger.models import Platform, RefundStatus
from service.sandbox import render
from service.sandbox.world import NewLine, World, WorldOrder


def new_order(world: World, platform: Platform = Platform.TAOBAO) -> WorldOrder:
    lines = [
        NewLine("保温杯", 2, Decimal("10.05"), None, None),
        NewLine("T恤", 1, Decimal("30"), None, None),
    ]
    return world.create_order(
        platform, lines, shipping_fee=Decimal("6"), order_id=None, currency="CNY"
    )


def test_statuses_and_amounts_through_an_order_life() -> None:
    world = World(seed=7)
    order = new_order(world)
    pending = render.order_data(order, "snake")
    assert pending["status"] == "WAIT_BUYER_P"
    assert (pending["purchase_amount"], pending["product_amount"]) == (5610, 5010)
    assert (pending["domestic_post_fee"], pending["pay_amount"], pending["pay_time"]) == (
        600,
        None,
        None,
    )
    assert pending["modify_time"] == int(order.modified_at.timestamp() * 1000)

    world.pay(order)
    paid = render.order_data(order, "snake")
    assert (paid["status"], paid["pay_amount"]) == ("WAIT_SELLER_SEND_GOODS", 5610)
    assert [s["pay_amount"] for s in paid["sub_purchase_orders"]] == [2010, 3000]
    world.cancel(order, None)
    assert render.order_data(order, "snake")["status"] == "TRADE_CLOSED"


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (None, 10),
        (RefundStatus.REFUNDED, 100),
        (RefundStatus.REJECTED, -10),
        (RefundStatus.CANCELLED, -20),
    ],
)
def test_refund_statuses_are_integers(outcome: RefundStatus | None, code: int) -> None:
    world = World(seed=7)
    order = new_order(world)
    world.pay(order)
    second = order.lines[1].line_id
    refund = world.open_refund(order, Decimal("12.34"), line_id=second, reason=None)
    if outcome is not None:
        world.resolve_refund(refund, outcome)
    record = render.refund_data(refund, "snake", order)["refund_order_aggregate"]
    assert record["refund_order"]["refund_status"] == code
    assert record["refund_order"]["refund_fee"] == 1234
    assert record["purchase_order_line"]["purchase_order_line_id"] == second
    assert record["purchase_order_line"]["total_price"] == 3000
    lines = render.order_data(order, "snake")["sub_purchase_orders"]
    assert [(x["refund_id"], x["refund_status"]) for x in lines] == [
        (None, 0),
        (refund.refund_id, code),
    ]


def test_camel_stays_the_default_and_1688_has_one_shape() -> None:
    world = World(seed=7)
    taobao = new_order(world)
    alibaba = new_order(world, Platform.ALIBABA_1688)
    assert render.order_data(taobao) == render.taobao_order(taobao)
    assert render.order_data(alibaba, "snake") == render.alibaba_order(alibaba)
    world.pay(taobao)
    refund = world.open_refund(taobao, Decimal("1"), line_id=None, reason=None)
    assert render.refund_data(refund) == render.taobao_refund(refund)
    with pytest.raises(ValueError, match="with its order"):
        render.refund_data(refund, "snake")
