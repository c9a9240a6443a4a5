"""Payload mapping: one test per fixture, every documented status, and clear errors.

Fixtures under tests/fixtures/{taobao,1688}/ hold the ``data`` of a query-API answer, named by
what they show; the contract's examples are among them verbatim (taobao/order_detail__paid.json,
and taobao/logistics__transport.json, the documented example: docs/upstream.md#payloads).
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon import mapping
from service.pandapon.errors import MalformedResponse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CST = timezone(timedelta(hours=8))
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688


def load(name: str) -> Any:
    return mapping.parse_json((FIXTURES / name).read_bytes())


def cst(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=CST)  # type: ignore[misc]


# --- Taobao ---------------------------------------------------------------------------------------


def test_taobao_order_detail__paid_the_documented_example() -> None:
    data = load("taobao/order_detail__paid.json")
    order = mapping.map_order(TB, data)
    assert order.platform is TB
    assert order.order_id == "3682557363260579405"
    assert order.status is OrderStatus.PAID
    assert order.raw_status == "WAIT_SELLER_SEND_GOODS"
    assert order.currency == "CNY"
    # fen → yuan, exact and with two places
    assert str(order.total_amount) == "105.00"
    assert str(order.product_amount) == "100.00"
    assert str(order.shipping_fee) == "5.00"
    assert order.discount_amount is None
    assert order.created_at == cst(2026, 11, 20, 10, 0, 0)
    assert order.created_at == datetime(2026, 11, 20, 2, 0, 0, tzinfo=UTC)
    assert order.modified_at == cst(2026, 11, 21, 9, 30, 0)
    assert order.paid_at == cst(2026, 11, 20, 10, 5, 0)
    assert order.shipped_at is None
    (line,) = order.lines
    assert line.line_id == line.logistics_ref == "200033789041"
    assert (line.product_id, line.sku_id, line.title) == ("672991141190", "5012345", "…")
    assert line.quantity == 2
    assert line.amount == Decimal("100.00")
    assert line.unit_price is None
    assert line.raw_status == "WAIT_SELLER_SEND_GOODS"
    assert line.tracking_number is None
    assert line.has_tracking is False  # the detail says: no logistics number yet
    assert order.raw == json.loads((FIXTURES / "taobao/order_detail__paid.json").read_text())


def test_taobao_order_detail__shipped_keeps_unknown_fields() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__shipped.json"))
    assert order.status is OrderStatus.SHIPPED
    assert order.total_amount == Decimal("259.90")
    shipped, waiting = order.lines
    assert shipped.has_tracking is True
    assert shipped.tracking_number == "78753196186999"
    assert shipped.carrier == "中通快递"
    assert waiting.has_tracking is False
    assert waiting.sku_id is None
    assert waiting.raw_status == "WAIT_SELLER_SEND_GOODS"
    assert waiting.raw["gift_flag"] is True
    assert order.raw["buyerMemo"] == "请尽快发货"


def test_taobao_order_detail__building_has_no_amounts_yet() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__building.json"))
    assert order.status is OrderStatus.PENDING_PAYMENT
    assert order.raw_status == "BULIDING"
    assert order.total_amount is order.product_amount is order.shipping_fee is None
    assert order.paid_at is None
    assert order.lines == ()


def test_taobao_order_detail__closed_in_another_currency() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__closed.json"))
    assert order.status is OrderStatus.CANCELLED
    assert order.currency == "USD"
    assert order.total_amount == Decimal("19.99")
    (line,) = order.lines
    assert line.quantity == 1  # "1" as a string is still understood
    assert line.has_tracking is None  # the detail does not say


def test_taobao_logistics__transport_the_documented_example() -> None:
    (shipment,) = mapping.map_shipments(
        TB, load("taobao/logistics__transport.json"), line_id="200033789041"
    )
    assert shipment.tracking_number == "78753196186473"
    assert shipment.line_id == "200033789041"
    assert shipment.carrier is None
    assert shipment.raw_status is None
    assert shipment.delivered is False
    (event,) = shipment.events
    assert event.event_at == cst(2023, 12, 14, 21, 39, 11)
    assert event.status == "TRANSPORT"
    assert event.description == "【北京市】 快件已发往 广州中心"
    assert event.location == "北京市 朝阳区"
    digest = "2023-12-14T13:39:11+00:00\x1fTRANSPORT\x1f【北京市】 快件已发往 广州中心"
    assert event.event_key == hashlib.sha256(digest.encode()).hexdigest()
    assert event.raw["action"] == "TMS_STATION_OUT"


def test_taobao_logistics__signed_is_delivered_with_events_oldest_first() -> None:
    (shipment,) = mapping.map_shipments(TB, load("taobao/logistics__signed.json"))
    assert shipment.delivered is True
    assert (shipment.carrier, shipment.carrier_code, shipment.raw_status) == (
        "中通快递",
        "ZTO",
        "SIGN",
    )
    assert [e.status for e in shipment.events] == ["ACCEPT", "TRANSPORT", "SIGN"]
    assert [e.location for e in shipment.events] == [
        "浙江省 杭州市",
        "广州中心",  # no province, city or district: the facility stands in
        "广东省 广州市 天河区",
    ]
    assert len({e.event_key for e in shipment.events}) == 3
    assert "logisticsTraces" not in shipment.raw


def test_taobao_logistics__none_yet() -> None:
    assert mapping.map_shipments(TB, load("taobao/logistics__none.json")) == []


def test_taobao_refund_detail__wait_seller_agree() -> None:
    refund = mapping.map_refund(TB, load("taobao/refund_detail__wait_seller_agree.json"))
    assert refund.refund_id == "150012345678901"
    assert refund.order_id == "3701122334455667788"
    assert refund.line_id == "200033789102"
    assert refund.status is RefundStatus.REQUESTED
    assert refund.raw_status == "WAIT_SELLER_AGREE"
    assert str(refund.amount) == "200.00"
    assert refund.reason == "不想要了"
    assert refund.requested_at == cst(2026, 11, 22, 10, 0, 0)
    assert refund.resolved_at is None


def test_taobao_refund_detail__success_was_resolved_when_last_modified() -> None:
    refund = mapping.map_refund(TB, load("taobao/refund_detail__success.json"))
    assert refund.status is RefundStatus.REFUNDED
    assert refund.amount == Decimal("49.90")
    assert refund.resolved_at == refund.modified_at == cst(2026, 11, 23, 18, 45, 10)
    assert refund.raw["refundPhase"] == "onsale"


def test_taobao_order_page__first() -> None:
    page = mapping.map_order_page(TB, load("taobao/order_page__first.json"), 1, 2)
    assert (page.total, page.page_no, page.page_size) == (3, 1, 2)
    assert [o.order_id for o in page.orders] == ["3709988776655443322", "3709988776655443323"]
    assert [o.status for o in page.orders] == [OrderStatus.PENDING_PAYMENT, OrderStatus.COMPLETED]
    assert page.orders[1].lines[0].tracking_number == "YT7000000000001"


# --- 1688 -----------------------------------------------------------------------------------------


def test_1688_order_detail__waitsellersend() -> None:
    order = mapping.map_order(AL, load("1688/order_detail__waitsellersend.json"))
    assert order.platform is AL
    assert order.order_id == "3350228510000112233"
    assert order.status is OrderStatus.PAID
    assert order.raw_status == "waitsellersend"
    # yuan as written, never through float
    assert order.total_amount == Decimal("105.5")
    assert str(order.product_amount) == "100.00"
    assert order.shipping_fee == Decimal("8.0")
    assert order.discount_amount == Decimal("2.5")
    assert order.created_at == cst(2026, 11, 20, 10, 0, 0)
    assert order.modified_at == datetime(2026, 11, 21, 9, 30, 0, 123000, tzinfo=CST)
    assert order.paid_at == cst(2026, 11, 20, 10, 5, 0)
    assert order.shipped_at is order.completed_at is order.close_reason is None
    (line,) = order.lines
    assert line.line_id == "3350228510000112234"
    assert (line.product_id, line.sku_id) == ("624000000001", "4500000001")
    assert line.quantity == 4
    assert (line.unit_price, line.amount) == (Decimal("25.00"), Decimal("100.00"))
    assert line.logistics_ref is None
    assert line.has_tracking is None
    assert line.raw["skuInfos"][0]["value"] == "白色"
    assert order.raw["baseInfo"]["buyerContact"] == {"name": "张三"}
    assert order.raw["tradeTerms"][0]["phasAmount"] == 105.5  # raw stays plain JSON
    assert order.refund_ids == ()


def test_1688_order_detail__waitbuyerreceive_names_its_refund() -> None:
    order = mapping.map_order(AL, load("1688/order_detail__waitbuyerreceive.json"))
    assert order.order_id == "3350228510000445566"  # from baseInfo.id when idOfStr is absent
    assert order.status is OrderStatus.SHIPPED
    assert order.total_amount == Decimal("318.40")  # amounts as strings are understood too
    assert order.shipping_fee == Decimal("12")
    assert order.shipped_at == cst(2026, 11, 19, 16, 20, 5)
    assert order.close_reason is None  # empty is absent
    assert order.refund_ids == ("TQ2026112200000001",)
    assert order.lines[1].sku_id is None


def test_1688_order_detail__cancel() -> None:
    order = mapping.map_order(AL, load("1688/order_detail__cancel.json"))
    assert order.status is OrderStatus.CANCELLED
    assert order.close_reason == "buyerCancel"
    assert order.paid_at is None
    assert order.discount_amount is None


def test_1688_logistics__trace_signed_for() -> None:
    (shipment,) = mapping.map_shipments(AL, load("1688/logistics__trace.json"))
    assert shipment.tracking_number == "YT7000000000777"
    assert shipment.carrier == "圆通速递"
    assert shipment.line_id is None
    assert shipment.delivered is True
    assert [e.event_at for e in shipment.events] == [
        cst(2026, 11, 19, 16, 20, 5),
        cst(2026, 11, 20, 3, 11, 45),
        cst(2026, 11, 21, 14, 2, 0),
    ]
    assert all(e.status is None and e.location is None for e in shipment.events)
    assert shipment.events[0].description == "【杭州市】 快件已揽收"
    assert shipment.raw["logisticsId"] == "LP00566645556667"


def test_1688_logistics__in_transit_two_parcels() -> None:
    first, second = mapping.map_shipments(AL, load("1688/logistics__in_transit_two_parcels.json"))
    assert (first.tracking_number, second.tracking_number) == ("ZT8000000000001", "ZT8000000000002")
    assert not first.delivered
    assert not second.delivered
    assert len(first.events) == 1
    assert second.events == ()


def test_1688_refund_detail__waitselleragree_amount_in_fen() -> None:
    refund = mapping.map_refund(AL, load("1688/refund_detail__waitselleragree.json"))
    assert refund.refund_id == "TQ2026112200000001"
    assert refund.order_id == "3350228510000445566"
    assert refund.status is RefundStatus.REQUESTED
    assert str(refund.amount) == "20.50"  # applyPayment 2050 fen
    assert refund.reason == "少件/漏发"
    assert refund.requested_at == cst(2026, 11, 22, 10, 0, 0)
    assert refund.resolved_at is None
    assert refund.line_id is None
    assert refund.raw["disputeRequest"] == 1


def test_1688_refund_detail__refundsuccess_uses_the_amount_refunded() -> None:
    refund = mapping.map_refund(AL, load("1688/refund_detail__refundsuccess.json"))
    assert refund.order_id == "3350228510000445566"  # a number upstream, a string here
    assert refund.status is RefundStatus.REFUNDED
    assert refund.amount == Decimal("45.00")  # refundPayment, not the 50.00 applied for
    assert refund.resolved_at == cst(2026, 11, 23, 18, 45, 10)
    assert refund.modified_at == refund.resolved_at


def test_1688_order_page__first() -> None:
    page = mapping.map_order_page(AL, load("1688/order_page__first.json"), 1, 50)
    assert (page.total, page.page_no, page.page_size) == (1, 1, 50)
    (order,) = page.orders
    assert order.status is OrderStatus.CANCELLED
    assert order.raw_status == "terminated"


# --- every status value listed in docs/upstream.md#statuses ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("BULIDING", OrderStatus.PENDING_PAYMENT),
        ("WAIT_BUYER_P", OrderStatus.PENDING_PAYMENT),  # [TG] [DJ]
        ("WAIT_BUYER_PAY", OrderStatus.PENDING_PAYMENT),
        ("WAIT_SELLER_SEND_GOODS", OrderStatus.PAID),
        ("WAIT_BUYER_CONFIRM_GOODS", OrderStatus.SHIPPED),
        ("TRADE_FINISHED", OrderStatus.COMPLETED),
        ("TRADE_CLOSED", OrderStatus.CANCELLED),
        ("SELLER_CONSIGNED_PART", OrderStatus.UNKNOWN),
    ],
)
def test_taobao_order_status(raw: str, expected: OrderStatus) -> None:
    data = load("taobao/order_detail__paid.json")
    data["status"] = raw
    order = mapping.map_order(TB, data)
    assert (order.status, order.raw_status) == (expected, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("waitbuyerpay", OrderStatus.PENDING_PAYMENT),
        ("waitsellersend", OrderStatus.PAID),
        ("waitbuyerreceive", OrderStatus.SHIPPED),
        ("confirm_goods", OrderStatus.COMPLETED),
        ("success", OrderStatus.COMPLETED),
        ("cancel", OrderStatus.CANCELLED),
        ("terminated", OrderStatus.CANCELLED),
        ("WAITSELLERSEND", OrderStatus.PAID),  # case does not matter
        ("waitlogisticstakein", OrderStatus.UNKNOWN),
    ],
)
def test_1688_order_status(raw: str, expected: OrderStatus) -> None:
    data = load("1688/order_detail__waitsellersend.json")
    data["baseInfo"]["status"] = raw
    order = mapping.map_order(AL, data)
    assert (order.status, order.raw_status) == (expected, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("WAIT_SELLER_AGREE", RefundStatus.REQUESTED),
        ("WAIT_BUYER_RETURN_GOODS", RefundStatus.REQUESTED),
        ("WAIT_SELLER_CONFIRM_GOODS", RefundStatus.REQUESTED),
        ("SELLER_REFUSE_BUYER", RefundStatus.REJECTED),
        ("CLOSED", RefundStatus.CANCELLED),
        ("SUCCESS", RefundStatus.REFUNDED),
        ("SOMETHING_NEW", RefundStatus.UNKNOWN),
    ],
)
def test_taobao_refund_status(raw: str, expected: RefundStatus) -> None:
    data = load("taobao/refund_detail__wait_seller_agree.json")
    data["refundStatus"] = raw
    refund = mapping.map_refund(TB, data)
    assert (refund.status, refund.raw_status) == (expected, raw)
    assert (refund.resolved_at is not None) == (expected in mapping.FINAL_REFUND_STATUSES)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("waitselleragree", RefundStatus.REQUESTED),
        ("waitbuyersend", RefundStatus.REQUESTED),
        ("waitsellerreceive", RefundStatus.REQUESTED),
        ("waitbuyermodify", RefundStatus.REQUESTED),  # refused, the buyer may amend: open
        ("refundsuccess", RefundStatus.REFUNDED),
        ("refundclose", RefundStatus.CANCELLED),
        ("waitarbitrate", RefundStatus.UNKNOWN),
    ],
)
def test_1688_refund_status(raw: str, expected: RefundStatus) -> None:
    data = load("1688/refund_detail__waitselleragree.json")
    data["status"] = raw
    refund = mapping.map_refund(AL, data)
    assert (refund.status, refund.raw_status) == (expected, raw)


# --- bodies that cannot be understood name the field ----------------------------------------------


def _without(data: dict[str, Any], *path: str | int) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def _with(data: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


TB_DETAIL = load("taobao/order_detail__paid.json")
AL_DETAIL = load("1688/order_detail__waitsellersend.json")


@pytest.mark.parametrize(
    ("platform", "data", "field"),
    [
        (TB, None, "data"),
        (TB, [], "data"),
        (TB, _without(TB_DETAIL, "salesOrderId"), "salesOrderId"),
        (TB, _with(TB_DETAIL, {"x": 1}, "status"), "status"),
        (
            TB,
            _with(TB_DETAIL, "abc", "purchaseOrderPriceDTO", "purchaseTotalFee"),
            "purchaseOrderPriceDTO.purchaseTotalFee",
        ),
        (
            TB,
            _with(TB_DETAIL, Decimal("10.5"), "purchaseOrderPriceDTO", "purchaseTotalFee"),
            "purchaseOrderPriceDTO.purchaseTotalFee",
        ),
        (TB, _with(TB_DETAIL, "yesterday", "gmtModified"), "gmtModified"),
        (TB, _with(TB_DETAIL, {"a": 1}, "subOrders"), "subOrders"),
        (
            TB,
            _without(
                _without(TB_DETAIL, "subOrders", 0, "subPurchaseOrderId"),
                "subOrders",
                0,
                "purchase_order_line_outer_id",
            ),
            "subOrders[0].subPurchaseOrderId",
        ),
        (AL, _without(AL_DETAIL, "baseInfo"), "baseInfo"),
        (AL, _without(AL_DETAIL, "baseInfo", "status"), "baseInfo.status"),
        (
            AL,
            _without(_without(AL_DETAIL, "baseInfo", "idOfStr"), "baseInfo", "id"),
            "baseInfo.idOfStr",
        ),
        (AL, _with(AL_DETAIL, "12,50", "baseInfo", "totalAmount"), "baseInfo.totalAmount"),
        (AL, _with(AL_DETAIL, "2026-13-45", "baseInfo", "createTime"), "baseInfo.createTime"),
        (AL, _with(AL_DETAIL, 2.5, "productItems", 0, "quantity"), "productItems[0].quantity"),
    ],
)
def test_order_detail_that_cannot_be_understood(platform: Platform, data: Any, field: str) -> None:
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_order(platform, data)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_an_unreadable_record_is_set_aside_with_its_id_and_the_field() -> None:
    data = load("1688/order_page__first.json")
    readable = len(data["records"])
    data["records"].append(_without(AL_DETAIL, "baseInfo", "status"))
    data["records"].append({"baseInfo": "not an object"})

    page = mapping.map_order_page(AL, data, 1, 50)

    assert len(page.orders) == readable
    [named, anonymous] = page.unreadable
    assert named.order_id == AL_DETAIL["baseInfo"]["idOfStr"]
    assert f"records[{readable}].baseInfo.status" in named.error
    assert anonymous.order_id is None
    assert f"records[{readable + 1}].baseInfo" in anonymous.error


def test_an_unreadable_taobao_record_keeps_its_id() -> None:
    data = {"total": 2, "records": [TB_DETAIL, _without(TB_DETAIL, "status")]}
    page = mapping.map_order_page(TB, data, 1, 50)
    assert [o.order_id for o in page.orders] == [TB_DETAIL["salesOrderId"]]
    assert [r.order_id for r in page.unreadable] == [TB_DETAIL["salesOrderId"]]


@pytest.mark.parametrize(("body", "field"), [({"records": []}, "total"), ({"total": 1}, "records")])
def test_page_without_its_frame(body: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_order_page(TB, body, 1, 50)
    assert caught.value.field == field


def test_logistics_and_refund_errors_name_the_field() -> None:
    logistics = load("taobao/logistics__transport.json")
    del logistics["pnmLogisticsDetails"][0]["mailNo"]
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_shipments(TB, logistics)
    assert caught.value.field == "pnmLogisticsDetails[0].mailNo"
    refund = load("1688/refund_detail__refundsuccess.json")
    del refund["orderId"]
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_refund(AL, refund)
    assert caught.value.field == "orderId"


# --- times, money, keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-20 10:00:00", datetime(2026, 11, 20, 2, 0, tzinfo=UTC)),
        ("20180801104333000+0800", datetime(2018, 8, 1, 2, 43, 33, tzinfo=UTC)),
        ("20180801104333123+0800", datetime(2018, 8, 1, 2, 43, 33, 123000, tzinfo=UTC)),
        ("20180801104333000-0300", datetime(2018, 8, 1, 13, 43, 33, tzinfo=UTC)),
        ("20180801104333", datetime(2018, 8, 1, 2, 43, 33, tzinfo=UTC)),
        ("2026-11-20T10:00:00+00:00", datetime(2026, 11, 20, 10, 0, tzinfo=UTC)),
        (1715669977082, datetime(2024, 5, 14, 6, 59, 37, 82000, tzinfo=UTC)),
        ("1715669977082", datetime(2024, 5, 14, 6, 59, 37, 82000, tzinfo=UTC)),
    ],
)
def test_parse_time(value: str | int, expected: datetime) -> None:
    parsed = mapping.parse_time(value)
    assert parsed == expected
    assert parsed.tzinfo is not None


def test_request_times_are_china_time() -> None:
    moment = datetime(2026, 11, 20, 16, 30, 5, tzinfo=UTC)
    assert mapping.format_request_time(moment) == "2026-11-21 00:30:05"
    with pytest.raises(ValueError, match="aware"):
        mapping.format_request_time(datetime(2026, 11, 20))


def test_parse_json_keeps_decimals_exact_and_raw_stays_plain_json() -> None:
    data = mapping.parse_json(b'{"a": 0.1, "b": [1.10, 2], "c": "x"}')
    assert data["a"] == Decimal("0.1")
    assert mapping.jsonable(data) == {"a": 0.1, "b": [1.1, 2], "c": "x"}
    json.dumps(mapping.jsonable(data))


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_fen_to_yuan_is_exact(fen: int) -> None:
    yuan = mapping.fen_to_yuan(fen)
    assert yuan * 100 == fen
    assert yuan.as_tuple().exponent == -2


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2099, 12, 31),
        timezones=st.just(UTC),
    )
)
def test_1688_time_format_round_trips(moment: datetime) -> None:
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    local = moment.astimezone(CST)
    text = local.strftime("%Y%m%d%H%M%S") + f"{local.microsecond // 1000:03d}+0800"
    assert mapping.parse_time(text) == moment


def test_event_key_is_stable_across_time_notation() -> None:
    a = mapping.event_key(mapping.parse_time("2026-11-21 14:02:00"), "SIGN", "已签收")
    b = mapping.event_key(mapping.parse_time("20261121140200000+0800"), "SIGN", "已签收")
    c = mapping.event_key(mapping.parse_time("2026-11-21 14:02:00"), "SIGN", "已签收 ")
    assert a == b != c
    assert len(a) == 64
    assert int(a, 16) >= 0
