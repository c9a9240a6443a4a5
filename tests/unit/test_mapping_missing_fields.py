"""``mapping.record_missing``: which fields the mapping looked for and did not find.

Opt-in and free when off: the workers never activate it, so it must not change a result nor
cost more than one ContextVar lookup per absent field (and nothing per present one).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from service.ledger.models import Platform
from service.pandapon import fields, mapping
from service.pandapon.errors import MalformedResponse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688


def load(name: str) -> Any:
    return mapping.parse_json((FIXTURES / name).read_bytes())


def map_any(name: str, data: Any) -> Any:
    """Map a fixture by what its name says it is."""
    platform = TB if name.startswith("taobao/") else AL
    kind = name.split("/")[1].split("__")[0]
    if kind == "order_detail":
        return mapping.map_order(platform, data)
    if kind == "order_page":
        return mapping.map_order_page(platform, data, 1, 50)
    if kind == "refund_page":
        return mapping.map_refund_page(platform, data, 1, 50)
    if kind == "refund_detail":
        return mapping.map_refund(platform, data)
    return mapping.map_shipments(platform, data)


ALL_FIXTURES = sorted(
    f"{p.parent.name}/{p.name}" for p in FIXTURES.glob("*/*.json") if "__" in p.name
)


def test_absent_fields_are_recorded_by_path() -> None:
    data = load("taobao/order_detail__paid.json")
    del data["gmtCreate"]
    del data["subOrders"][0]["quantity"]
    del data["purchaseOrderPriceDTO"]["purchaseTotalFee"]
    with mapping.record_missing() as missing:
        order = mapping.map_order(TB, data)
    assert order.created_at is None
    assert order.total_amount is None
    assert "gmtCreate" in missing
    assert "subOrders[0].quantity" in missing
    assert "purchaseOrderPriceDTO.purchaseTotalFee" in missing


def test_a_null_value_is_present_not_absent() -> None:
    data = load("taobao/order_detail__paid.json")
    data["subOrders"][0]["logistic_number"] = None
    with mapping.record_missing() as missing:
        mapping.map_order(TB, data)
    assert "subOrders[0].logistic_number" not in missing


def test_a_missing_object_records_every_field_read_from_it() -> None:
    data = load("taobao/order_detail__paid.json")
    del data["purchaseOrderPriceDTO"]
    with mapping.record_missing() as missing:
        mapping.map_order(TB, data)
    assert missing[:2] == ["purchaseOrderPriceDTO", "purchaseOrderPriceDTO.purchaseCurrency"]
    assert "purchaseOrderPriceDTO.purchaseTotalFee" in missing


def test_required_fields_are_recorded_before_the_error() -> None:
    data = load("1688/order_detail__waitsellersend.json")
    del data["baseInfo"]["status"]
    with mapping.record_missing() as missing, pytest.raises(MalformedResponse) as raised:
        mapping.map_order(AL, data)
    assert raised.value.field == "baseInfo.status"
    assert "baseInfo.status" in missing


def test_list_records_carry_their_index() -> None:
    data = load("taobao/order_page__first.json")
    del data["records"][1]["gmtModified"]
    with mapping.record_missing() as missing:
        mapping.map_order_page(TB, data, 1, 50)
    assert "records[1].gmtModified" in missing
    assert "records[0].gmtModified" not in missing


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_results_are_the_same_with_and_without_the_recorder(name: str) -> None:
    data = load(name)
    plain = map_any(name, copy.deepcopy(data))
    with mapping.record_missing():
        recorded = map_any(name, copy.deepcopy(data))
    assert recorded == plain


def test_nothing_is_recorded_outside_the_block_and_blocks_nest() -> None:
    data = load("taobao/order_detail__paid.json")
    del data["gmtCreate"]
    with mapping.record_missing() as outer:
        with mapping.record_missing() as inner:
            mapping.map_order(TB, data)
        mapping.map_refund(TB, {"refundId": "1", "salesOrderId": "2", "refundStatus": "CLOSED"})
    seen = (list(outer), list(inner))
    mapping.map_order(TB, data)  # no collector: nothing anywhere
    assert (outer, inner) == seen
    assert inner == ["gmtCreate"]
    assert outer == ["gmtModified", "refundFee", "subPurchaseOrderId", "reason", "gmtCreate"]


async def test_concurrent_tasks_keep_their_own_collectors() -> None:
    async def read(key: str) -> list[str]:
        data = load("taobao/refund_detail__success.json")
        del data[key]
        with mapping.record_missing() as missing:
            await asyncio.sleep(0)  # let the other task run inside its own block
            mapping.map_refund(TB, data)
        return missing

    first, second = await asyncio.gather(read("reason"), read("gmtCreate"))
    assert first == ["reason"]
    assert second == ["gmtCreate"]


class CountingVar:
    """Stands in for the ContextVar: counts lookups, never holds a collector."""

    def __init__(self) -> None:
        self.lookups = 0

    def get(self) -> None:
        self.lookups += 1


def test_off_it_costs_one_lookup_per_absent_field_and_none_per_present_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = CountingVar()
    monkeypatch.setattr(fields, "_missing", counter)
    complete = load("taobao/refund_detail__success.json")  # every field read is there
    mapping.map_refund(TB, complete)
    assert counter.lookups == 0
    del complete["reason"]
    mapping.map_refund(TB, complete)
    assert counter.lookups == 1
