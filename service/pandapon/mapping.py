"""Payload mapping: what PandaPon's query APIs return → the snapshots of ``models.py``.

This is the one module that knows upstream field names, units, time formats and status names
(docs/upstream.md#payloads, and the public evidence); what is [assumed] lives here and is
pinned by the fixture tests in ``tests/fixtures/{taobao,1688}/``. docs/upstream.md describes the
contract as this module reads it.

Taobao payloads come in two spellings: the contract's camelCase (``salesOrderId``,
``subOrders``, ``purchaseOrderPriceDTO`` …) and Taobao Global's snake_case that PandaPon passes
through (``purchase_id``, ``sub_purchase_orders``, ``purchase_amount`` …, [TG]). Each field is read
under its first name and, only when that is absent, under the others (``fields.spelling``); an
after-sales record may also come nested (``refund_order_aggregate``). Statuses may be text or
integers.

The code is split by job: ``statuses.py`` (status tables, each entry with its source),
``fields.py`` (the reader kit: JSON, times, money, readers naming the field they could not
read), ``taobao.py`` and ``alibaba.py`` (one mapper per platform); this module dispatches by
platform, reads the list pages, and is what callers import.

The mapping is lenient where it can be and strict where it must be:
- a missing or null optional field becomes ``None``; fields we do not read stay in ``raw``;
- an unknown status maps to ``UNKNOWN`` (the raw value is always kept beside it);
- a body it cannot understand (no order id, a status that is not a string, an amount that is
  not a number …) raises ``MalformedResponse`` whose ``field`` names the culprit, e.g.
  ``records[3].baseInfo.status``.

Money: Taobao purchase amounts and every refund amount are integers in fen; 1688 ``baseInfo`` and
``productItems`` amounts are decimals in yuan. Both become ``Decimal`` yuan. JSON is parsed with
``parse_json`` so decimals never pass through ``float``.
Times: ``yyyy-MM-dd HH:mm:ss`` without an offset is China Standard Time (UTC+8); 1688 writes
``20180801104333000+0800``; integers are epoch milliseconds (13 digits) or seconds (10 digits),
and an epoch ``0`` is no time. All become aware datetimes.

``record_missing()`` lists the fields the mapping looked for and did not find (``pandasync
doctor`` uses it to see which of our assumed names the real payloads lack): a field with several
spellings is listed once, under its first name, and only when none of them is there. Off by
default; when off it costs one ContextVar lookup per absent field and nothing per present one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from service.domain import Platform
from service.pandapon.alibaba import (
    alibaba_order,
    alibaba_order_id,
    alibaba_refund,
    alibaba_shipments,
)
from service.pandapon.errors import MalformedResponse
from service.pandapon.fields import (
    as_object,
    at_index,
    event_key,
    fen_to_yuan,
    format_request_time,
    jsonable,
    malformed,
    opt_int,
    opt_str,
    parse_json,
    parse_time,
    record_missing,
    req_object,
    sort_events,
    spelling,
)
from service.pandapon.models import (
    OrderListPage,
    OrderSnapshot,
    RefundListPage,
    RefundSnapshot,
    ShipmentSnapshot,
    UnreadableRecord,
    UnreadableRefund,
)
from service.pandapon.statuses import (
    ALIBABA_DELIVERED_STATUSES,
    ALIBABA_ORDER_STATUSES,
    ALIBABA_REFUND_STATUSES,
    FINAL_REFUND_STATUSES,
    PARCEL_STATUSES,
    TAOBAO_DELIVERED_STATUSES,
    TAOBAO_ORDER_STATUSES,
    TAOBAO_REFUND_STATUSES,
    order_status,
    parcel_status_known,
    refund_status,
)
from service.pandapon.taobao import (
    TB_ORDER_ID,
    TB_TRACES,
    taobao_order,
    taobao_refund,
    taobao_shipments,
)

# What callers read through the mapping, wherever it lives.
__all__ = [
    "ALIBABA_DELIVERED_STATUSES",
    "ALIBABA_ORDER_STATUSES",
    "ALIBABA_REFUND_STATUSES",
    "FINAL_REFUND_STATUSES",
    "PARCEL_STATUSES",
    "TAOBAO_DELIVERED_STATUSES",
    "TAOBAO_ORDER_STATUSES",
    "TAOBAO_REFUND_STATUSES",
    "event_key",
    "fen_to_yuan",
    "format_request_time",
    "jsonable",
    "map_order",
    "map_order_page",
    "map_refund",
    "map_refund_page",
    "map_shipments",
    "map_stored_shipment",
    "order_status",
    "parcel_status_known",
    "parse_json",
    "parse_time",
    "record_missing",
    "refund_status",
    "sort_events",
    "taobao_order",
]


# --- by platform ----------------------------------------------------------------------------------

_ORDER_MAPPERS: Mapping[Platform, Callable[[Any, str], OrderSnapshot]] = {
    Platform.TAOBAO: taobao_order,
    Platform.ALIBABA_1688: alibaba_order,
}


def map_order(platform: Platform, data: Any) -> OrderSnapshot:
    return _ORDER_MAPPERS[platform](data, "")


def map_refund(platform: Platform, data: Any) -> RefundSnapshot:
    if platform is Platform.TAOBAO:
        return taobao_refund(data)
    return alibaba_refund(data)


def map_shipments(
    platform: Platform, data: Any, line_id: str | None = None
) -> list[ShipmentSnapshot]:
    if platform is Platform.TAOBAO:
        return taobao_shipments(data, line_id)
    return alibaba_shipments(data)


# Where a parcel's trace sits in a logistics answer; the stored parcel (``ShipmentSnapshot.raw``)
# is the parcel without it, and each event keeps its own step (``ShipmentEventSnapshot.raw``).
_TRACE_KEYS: Mapping[Platform, tuple[str, str]] = {
    Platform.TAOBAO: ("pnmLogisticsDetails", TB_TRACES[0]),
    Platform.ALIBABA_1688: ("logisticsTrace", "logisticsSteps"),
}


def map_stored_shipment(
    platform: Platform,
    parcel_raw: Mapping[str, Any],
    event_raws: Iterable[Mapping[str, Any]],
    line_id: str | None = None,
) -> list[ShipmentSnapshot]:
    """A parcel the ledger stores, mapped again: its raw parcel and its events' raw steps put
    back into the logistics answer they came from (``pandasync remap``)."""
    parcels_key, trace_key = _TRACE_KEYS[platform]
    data = {parcels_key: [{**parcel_raw, trace_key: list(event_raws)}]}
    return map_shipments(platform, data, line_id)


def map_order_page(platform: Platform, data: Any, page_no: int, page_size: int) -> OrderListPage:
    """An order-list page; ``page_no``/``page_size`` stand in when the body omits them."""
    obj = as_object(data, "")
    total = opt_int(obj, "total", "")
    if total is None:
        raise malformed("", "total", "missing")
    records = obj.get("records")
    if not isinstance(records, list):
        raise malformed("", "records", "missing" if records is None else "not a list")
    mapper = _ORDER_MAPPERS[platform]
    orders: list[OrderSnapshot] = []
    unreadable: list[UnreadableRecord] = []
    for i, record in enumerate(records):
        try:
            orders.append(mapper(record, at_index("records", i)))
        except MalformedResponse as error:
            unreadable.append(UnreadableRecord(_listed_order_id(platform, record), str(error)))
    return OrderListPage(
        total=total,
        page_no=opt_int(obj, "pageNo", "") or page_no,
        page_size=opt_int(obj, "pageSize", "") or page_size,
        orders=tuple(orders),
        unreadable=tuple(unreadable),
    )


def _listed_order_id(platform: Platform, record: Any) -> str | None:
    """The order id of a record that could not be read whole, if that much can be."""
    try:
        obj = as_object(record, "")
        if platform is Platform.TAOBAO:
            return opt_str(obj, spelling(obj, TB_ORDER_ID), "")
        return alibaba_order_id(req_object(obj, "baseInfo", ""), "")
    except MalformedResponse:
        return None


# --- refund lists ([VN]; the wrapper and the record shape [assumed]) ----------------------------


def map_refund_page(platform: Platform, data: Any, page_no: int, page_size: int) -> RefundListPage:
    """A refund-list page: the order list's wrapper around after-sales records shaped
    as the refund detail returns them, read by the same per-record mappers. A record
    that cannot be read is set aside with whatever ids could be read, as on an order list;
    ``page_no``/``page_size`` stand in when the body omits them."""
    obj = as_object(data, "")
    total = opt_int(obj, "total", "")
    if total is None:
        raise malformed("", "total", "missing")
    records = obj.get("records")
    if not isinstance(records, list):
        raise malformed("", "records", "missing" if records is None else "not a list")
    mapper = taobao_refund if platform is Platform.TAOBAO else alibaba_refund
    refunds: list[RefundSnapshot] = []
    unreadable: list[UnreadableRefund] = []
    for i, record in enumerate(records):
        try:
            refunds.append(mapper(record, at_index("records", i)))
        except MalformedResponse as error:
            order_id, refund_id = _listed_refund_ids(platform, record)
            unreadable.append(UnreadableRefund(order_id, refund_id, str(error)))
    return RefundListPage(
        total=total,
        page_no=opt_int(obj, "pageNo", "") or page_no,
        page_size=opt_int(obj, "pageSize", "") or page_size,
        refunds=tuple(refunds),
        unreadable=tuple(unreadable),
    )


# Where an after-sales record may keep its ids, in either spelling ([assumed], [TG]: flat or
# nested under ``refund_order_aggregate``).
_REFUND_ID_KEYS = ("refundId", "refund_id")
_REFUND_ORDER_KEYS = ("salesOrderId", "sales_order_id", "orderId", "order_id")
_REFUND_NESTS = (
    ("refund_order_aggregate", "refund_order"),
    ("refund_order_aggregate", "purchase_order_line"),
)


def _listed_refund_ids(platform: Platform, record: Any) -> tuple[str | None, str | None]:
    """(order id, refund id) of a record that could not be read whole, each if it can be.

    Read leniently and without noting absent fields: the record already failed its mapping.
    """
    if not isinstance(record, dict):
        return None, None
    places: list[Mapping[str, Any]] = [record]
    for outer, inner in _REFUND_NESTS:
        nested = record.get(outer)
        nested = nested.get(inner) if isinstance(nested, dict) else None
        if isinstance(nested, dict):
            places.append(nested)
    refund_keys = (*_REFUND_ID_KEYS, "id") if platform is Platform.ALIBABA_1688 else _REFUND_ID_KEYS
    return _first_id(places, _REFUND_ORDER_KEYS), _first_id(places, refund_keys)


def _first_id(places: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> str | None:
    for place in places:
        for key in keys:
            value = place.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
    return None
