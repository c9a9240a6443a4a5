"""Payload mapping: what PandaPon's query APIs return → the snapshots of ``models.py``.

This is the one module that knows upstream field names, units, time formats and status names
(``pandapon-api.md`` §4); most of that is [assumed], so it lives here and is pinned by the
fixture tests in ``tests/fixtures/{taobao,1688}/``.

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
``20180801104333000+0800``; integers are epoch milliseconds. All become aware datetimes.

``record_missing()`` lists the fields the mapping looked for and did not find (``pandasync
doctor`` uses it to see which of our assumed names the real payloads lack). Off by default; when
off it costs one ContextVar lookup per absent field and nothing per present one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon.errors import MalformedResponse
from service.pandapon.models import (
    LineSnapshot,
    OrderListPage,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
    UnreadableRecord,
)

CST = timezone(timedelta(hours=8), "CST")
DEFAULT_CURRENCY = "CNY"

# --- statuses (every value listed in pandapon-api.md) ------------------------------------------

TAOBAO_ORDER_STATUS: Mapping[str, OrderStatus] = {
    "BULIDING": OrderStatus.PENDING_PAYMENT,  # sic: the order is being created
    "BUILDING": OrderStatus.PENDING_PAYMENT,  # in case the typo is ever fixed
    "WAIT_BUYER_PAY": OrderStatus.PENDING_PAYMENT,
    "WAIT_SELLER_SEND_GOODS": OrderStatus.PAID,
    "WAIT_BUYER_CONFIRM_GOODS": OrderStatus.SHIPPED,
    "TRADE_FINISHED": OrderStatus.COMPLETED,
    "TRADE_CLOSED": OrderStatus.CANCELLED,
}
ALIBABA_ORDER_STATUS: Mapping[str, OrderStatus] = {
    "waitbuyerpay": OrderStatus.PENDING_PAYMENT,
    "waitsellersend": OrderStatus.PAID,
    "waitbuyerreceive": OrderStatus.SHIPPED,
    "confirm_goods": OrderStatus.COMPLETED,  # the buyer confirmed receipt
    "success": OrderStatus.COMPLETED,
    "cancel": OrderStatus.CANCELLED,
    "terminated": OrderStatus.CANCELLED,
}
TAOBAO_REFUND_STATUS: Mapping[str, RefundStatus] = {
    "WAIT_SELLER_AGREE": RefundStatus.REQUESTED,
    "WAIT_BUYER_RETURN_GOODS": RefundStatus.REQUESTED,
    "WAIT_SELLER_CONFIRM_GOODS": RefundStatus.REQUESTED,
    "SELLER_REFUSE_BUYER": RefundStatus.REJECTED,
    "CLOSED": RefundStatus.CANCELLED,
    "SUCCESS": RefundStatus.REFUNDED,
}
ALIBABA_REFUND_STATUS: Mapping[str, RefundStatus] = {
    "waitselleragree": RefundStatus.REQUESTED,
    "waitbuyersend": RefundStatus.REQUESTED,
    "waitsellerreceive": RefundStatus.REQUESTED,
    "waitbuyermodify": RefundStatus.REJECTED,  # the seller refused; the buyer may amend
    "refundsuccess": RefundStatus.REFUNDED,
    "refundclose": RefundStatus.CANCELLED,
}
FINAL_REFUND_STATUSES = frozenset(
    {RefundStatus.REFUNDED, RefundStatus.REJECTED, RefundStatus.CANCELLED}
)
# [assumed] a Taobao parcel or trace with one of these statuses has been signed for.
TAOBAO_DELIVERED_STATUSES = frozenset({"SIGN", "SIGNED"})
# [assumed] 1688 trace steps carry only text; a step saying 签收 (signed for) means delivered.
ALIBABA_DELIVERED_MARK = "签收"
# Parcel statuses the mapping can place (delivered or not); any other is an unmapped value.
PARCEL_STATUSES: Mapping[Platform, frozenset[str]] = {
    Platform.TAOBAO: TAOBAO_DELIVERED_STATUSES,
    Platform.ALIBABA_1688: frozenset(),
}


def parcel_status_known(platform: Platform, raw: str | None) -> bool:
    """True when a parcel's raw status is one the mapping places (or there is none)."""
    return raw is None or raw.strip().upper() in PARCEL_STATUSES[platform]


def order_status(platform: Platform, raw: str) -> OrderStatus:
    if platform is Platform.TAOBAO:
        return TAOBAO_ORDER_STATUS.get(raw.strip().upper(), OrderStatus.UNKNOWN)
    return ALIBABA_ORDER_STATUS.get(raw.strip().lower(), OrderStatus.UNKNOWN)


def refund_status(platform: Platform, raw: str) -> RefundStatus:
    if platform is Platform.TAOBAO:
        return TAOBAO_REFUND_STATUS.get(raw.strip().upper(), RefundStatus.UNKNOWN)
    return ALIBABA_REFUND_STATUS.get(raw.strip().lower(), RefundStatus.UNKNOWN)


# --- JSON, times, money -------------------------------------------------------------------------


def parse_json(content: bytes | str) -> Any:
    """JSON with decimals as ``Decimal``, so amounts never pass through ``float``."""
    return json.loads(content, parse_float=Decimal)


def jsonable(value: Any) -> Any:
    """``value`` with every ``Decimal`` turned back into a JSON number, for ``raw``."""
    if isinstance(value, Decimal):  # parse_float only ever made these from JSON decimals
        return float(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


_ALIBABA_TIME = re.compile(r"^(\d{14})(\d{3})?([+-]\d{4})?$")


def parse_time(value: str | int) -> datetime:
    """An upstream time as an aware datetime; ValueError when it is none of the known forms."""
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and len(value) == 13):
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    if not isinstance(value, str):
        raise ValueError("not a time")
    text = value.strip()
    match = _ALIBABA_TIME.match(text)
    if match:
        stamp, millis, offset = match.groups()
        parsed = datetime.strptime(stamp, "%Y%m%d%H%M%S")
        parsed = parsed.replace(microsecond=int(millis or 0) * 1000)
        if offset is None:
            return parsed.replace(tzinfo=CST)
        return parsed.replace(tzinfo=datetime.strptime(offset, "%z").tzinfo)
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=CST)


def format_request_time(moment: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss`` in China Standard Time, as the order-list queries take it."""
    if moment.tzinfo is None:
        raise ValueError("an aware datetime is required")
    return moment.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S")


def fen_to_yuan(fen: int) -> Decimal:
    return Decimal(fen).scaleb(-2)


def event_key(event_at: datetime | None, status: str | None, description: str | None) -> str:
    """The natural key of a trace event: a SHA-256 hex digest of its time, status and text.

    The time is taken in UTC so the same moment gives the same key however it was written.
    """
    moment = event_at.astimezone(UTC).isoformat() if event_at else ""
    payload = "\x1f".join((moment, status or "", description or ""))
    return hashlib.sha256(payload.encode()).hexdigest()


# --- field readers: each names the field it could not understand --------------------------------

# The active collector of ``record_missing``, or None (the workers' case).
_missing: ContextVar[list[str] | None] = ContextVar("pandasync_mapping_missing", default=None)


@contextmanager
def record_missing() -> Iterator[list[str]]:
    """Collect, in reading order, the field paths (``records[0].subOrders[1].quantity``) that
    the mappings called inside the block looked for and found absent (a key present with a null
    value is not absent). Mapping results are unchanged."""
    found: list[str] = []
    token = _missing.set(found)
    try:
        yield found
    finally:
        _missing.reset(token)


def _note_absent(obj: Mapping[str, Any], key: str, path: str) -> None:
    """Called by the readers on their None branch only, so a present field costs nothing."""
    collector = _missing.get()
    if collector is not None and key not in obj:
        collector.append(_field(path, key))


def _field(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _bad(path: str, key: str, why: str) -> MalformedResponse:
    name = _field(path, key)
    return MalformedResponse(f"cannot understand {name}: {why}", field=name)


def _as_object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        name = path or "data"
        raise MalformedResponse(f"cannot understand {name}: not an object", field=name)
    return value


def _object(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        _note_absent(obj, key, path)
        raise _bad(path, key, "missing")
    if not isinstance(value, dict):
        raise _bad(path, key, "not an object")
    return value


def _opt_object(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        _note_absent(obj, key, path)
        return {}
    if not isinstance(value, dict):
        raise _bad(path, key, "not an object")
    return value


def _list(obj: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        _note_absent(obj, key, path)
        return []
    if not isinstance(value, list):
        raise _bad(path, key, "not a list")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        _note_absent(obj, key, path)
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _bad(path, key, "not a string")
    text = str(value).strip()
    return text or None


def _str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = _opt_str(obj, key, path)
    if value is None:
        raise _bad(path, key, "missing")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    value = obj.get(key)
    if value is None:
        _note_absent(obj, key, path)
        return None
    if isinstance(value, bool):
        raise _bad(path, key, "not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise _bad(path, key, "not an integer")


def _fen(obj: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    fen = _opt_int(obj, key, path)
    return None if fen is None else fen_to_yuan(fen)


def _yuan(obj: Mapping[str, Any], key: str, path: str) -> Decimal | None:
    value = obj.get(key)
    if value is None or value == "":
        _note_absent(obj, key, path)
        return None
    if isinstance(value, bool):
        raise _bad(path, key, "not an amount")
    try:
        if isinstance(value, float):  # from a caller that parsed JSON without parse_json
            return Decimal(repr(value))
        if isinstance(value, int | Decimal | str):
            amount = Decimal(value)
            if amount.is_finite():
                return amount
    except InvalidOperation:
        pass
    raise _bad(path, key, "not an amount")


def _time(obj: Mapping[str, Any], key: str, path: str) -> datetime | None:
    value = obj.get(key)
    if value is None or value == "":
        _note_absent(obj, key, path)
        return None
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        raise _bad(path, key, "not a time") from None


def _at(path: str, index: int) -> str:
    return f"{path}[{index}]"


# --- Taobao ---------------------------------------------------------------------------------------


def taobao_order(data: Any, path: str = "") -> OrderSnapshot:
    """Taobao order detail (§4.1) → OrderSnapshot."""
    obj = _as_object(data, path)
    price_path = _field(path, "purchaseOrderPriceDTO")
    price = _opt_object(obj, "purchaseOrderPriceDTO", path)
    sub_path = _field(path, "subOrders")
    lines = tuple(
        _taobao_line(_as_object(sub, _at(sub_path, i)), _at(sub_path, i))
        for i, sub in enumerate(_list(obj, "subOrders", path))
    )
    raw_status = _str(obj, "status", path)
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=_str(obj, "salesOrderId", path),
        status=order_status(Platform.TAOBAO, raw_status),
        raw_status=raw_status,
        currency=_opt_str(price, "purchaseCurrency", price_path) or DEFAULT_CURRENCY,
        total_amount=_fen(price, "purchaseTotalFee", price_path),
        product_amount=_fen(price, "purchaseProductFee", price_path),
        shipping_fee=_fen(price, "purchaseShippingFee", price_path),
        created_at=_time(obj, "gmtCreate", path),
        modified_at=_time(obj, "gmtModified", path),
        paid_at=_time(obj, "payTime", path),
        lines=lines,
        # [assumed] a sub-order names its latest after-sales record in ``refund_id``, as Taobao's
        # own order lines do; it lets a reconcile find refunds a message did not name.
        refund_ids=tuple(
            dict.fromkeys(str(line.raw["refund_id"]) for line in lines if line.raw.get("refund_id"))
        ),
        raw=jsonable(obj),
    )


def _taobao_line(sub: Mapping[str, Any], path: str) -> LineSnapshot:
    sub_id = _opt_str(sub, "subPurchaseOrderId", path)
    line_id = sub_id or _opt_str(sub, "purchase_order_line_outer_id", path)
    if line_id is None:
        raise _bad(path, "subPurchaseOrderId", "missing")
    tracking = _opt_str(sub, "logistic_number", path)
    return LineSnapshot(
        line_id=line_id,
        product_id=_opt_str(sub, "item_id", path),
        sku_id=_opt_str(sub, "sku_id", path),
        title=_opt_str(sub, "title", path),
        quantity=_opt_int(sub, "quantity", path),
        amount=_fen(sub, "product_amount", path),
        raw_status=_opt_str(sub, "status", path),
        logistics_ref=sub_id,
        tracking_number=tracking,
        carrier=_opt_str(sub, "logistic_company_name", path),
        has_tracking=(tracking is not None) if "logistic_number" in sub else None,
        raw=jsonable(dict(sub)),
    )


def taobao_shipments(
    data: Any, line_id: str | None = None, path: str = ""
) -> list[ShipmentSnapshot]:
    """Taobao logistics detail (§4.3, one sub-order) → one ShipmentSnapshot per parcel."""
    obj = _as_object(data, path)
    parcels_path = _field(path, "pnmLogisticsDetails")
    shipments = []
    for i, item in enumerate(_list(obj, "pnmLogisticsDetails", path)):
        parcel_path = _at(parcels_path, i)
        parcel = _as_object(item, parcel_path)
        traces_path = _field(parcel_path, "logisticsTraces")
        events = sort_events(
            _taobao_event(_as_object(trace, _at(traces_path, j)), _at(traces_path, j))
            for j, trace in enumerate(_list(parcel, "logisticsTraces", parcel_path))
        )
        raw_status = _opt_str(parcel, "status", parcel_path)
        delivered = (raw_status or "").upper() in TAOBAO_DELIVERED_STATUSES or any(
            (e.status or "").upper() in TAOBAO_DELIVERED_STATUSES for e in events
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=_str(parcel, "mailNo", parcel_path),
                carrier=_opt_str(parcel, "logisticsCompanyName", parcel_path),
                carrier_code=_opt_str(parcel, "logisticsCompanyCode", parcel_path),
                raw_status=raw_status,
                line_id=line_id,
                delivered=delivered,
                events=events,
                raw=jsonable({k: v for k, v in parcel.items() if k != "logisticsTraces"}),
            )
        )
    return shipments


def _taobao_event(trace: Mapping[str, Any], path: str) -> ShipmentEventSnapshot:
    at = _time(trace, "time", path)
    status = _opt_str(trace, "status", path)
    description = _opt_str(trace, "standerdDesc", path) or _opt_str(trace, "statusDesc", path)
    place = [_opt_str(trace, k, path) for k in ("province", "city", "district")]
    location = " ".join(p for p in place if p) or _opt_str(trace, "facilityName", path)
    return ShipmentEventSnapshot(
        event_key=event_key(at, status, description),
        event_at=at,
        status=status,
        description=description,
        location=location,
        raw=jsonable(dict(trace)),
    )


def taobao_refund(data: Any, path: str = "") -> RefundSnapshot:
    """Taobao after-sales record (§4.4) → RefundSnapshot."""
    obj = _as_object(data, path)
    raw_status = _str(obj, "refundStatus", path)
    status = refund_status(Platform.TAOBAO, raw_status)
    modified_at = _time(obj, "gmtModified", path)
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id=_str(obj, "refundId", path),
        order_id=_str(obj, "salesOrderId", path),
        status=status,
        raw_status=raw_status,
        amount=_fen(obj, "refundFee", path),
        line_id=_opt_str(obj, "subPurchaseOrderId", path),
        reason=_opt_str(obj, "reason", path),
        requested_at=_time(obj, "gmtCreate", path),
        # Taobao gives no completion time: a final record was resolved when last modified.
        resolved_at=modified_at if status in FINAL_REFUND_STATUSES else None,
        modified_at=modified_at,
        raw=jsonable(obj),
    )


# --- 1688 -----------------------------------------------------------------------------------------


def _alibaba_order_id(base: Mapping[str, Any], path: str) -> str | None:
    return _opt_str(base, "idOfStr", path) or _opt_str(base, "id", path)


def alibaba_order(data: Any, path: str = "") -> OrderSnapshot:
    """1688 order detail (§4.2) → OrderSnapshot."""
    obj = _as_object(data, path)
    base_path = _field(path, "baseInfo")
    base = _object(obj, "baseInfo", path)
    order_id = _alibaba_order_id(base, base_path)
    if order_id is None:
        raise _bad(base_path, "idOfStr", "missing")
    raw_status = _str(base, "status", base_path)
    items_path = _field(path, "productItems")
    lines: list[LineSnapshot] = []
    refund_ids: list[str] = []
    for i, entry in enumerate(_list(obj, "productItems", path)):
        item_path = _at(items_path, i)
        item = _as_object(entry, item_path)
        lines.append(_alibaba_line(item, item_path))
        refund_id = _opt_str(item, "refundId", item_path)  # [assumed] as in 1688's buyer view
        if refund_id and refund_id not in refund_ids:
            refund_ids.append(refund_id)
    return OrderSnapshot(
        platform=Platform.ALIBABA_1688,
        order_id=order_id,
        status=order_status(Platform.ALIBABA_1688, raw_status),
        raw_status=raw_status,
        currency=DEFAULT_CURRENCY,
        total_amount=_yuan(base, "totalAmount", base_path),
        product_amount=_yuan(base, "sumProductPayment", base_path),
        shipping_fee=_yuan(base, "shippingFee", base_path),
        discount_amount=_yuan(base, "discount", base_path),
        close_reason=_opt_str(base, "closeReason", base_path),
        created_at=_time(base, "createTime", base_path),
        modified_at=_time(base, "modifyTime", base_path),
        paid_at=_time(base, "payTime", base_path),
        shipped_at=_time(base, "allDeliveredTime", base_path),
        completed_at=_time(base, "completeTime", base_path),
        lines=tuple(lines),
        refund_ids=tuple(refund_ids),
        raw=jsonable(obj),
    )


def _alibaba_line(item: Mapping[str, Any], path: str) -> LineSnapshot:
    line_id = _opt_str(item, "subItemIDString", path) or _opt_str(item, "subItemID", path)
    if line_id is None:
        raise _bad(path, "subItemID", "missing")
    return LineSnapshot(
        line_id=line_id,
        product_id=_opt_str(item, "productID", path),
        sku_id=_opt_str(item, "skuID", path),
        title=_opt_str(item, "name", path),
        quantity=_opt_int(item, "quantity", path),
        unit_price=_yuan(item, "price", path),
        amount=_yuan(item, "itemAmount", path),
        raw_status=_opt_str(item, "status", path),
        raw=jsonable(dict(item)),
    )


def alibaba_shipments(data: Any, path: str = "") -> list[ShipmentSnapshot]:
    """1688 logistics trace (§4.3, one order) → one ShipmentSnapshot per waybill."""
    obj = _as_object(data, path)
    traces_path = _field(path, "logisticsTrace")
    shipments = []
    for i, entry in enumerate(_list(obj, "logisticsTrace", path)):
        trace_path = _at(traces_path, i)
        trace = _as_object(entry, trace_path)
        steps_path = _field(trace_path, "logisticsSteps")
        events = sort_events(
            _alibaba_event(_as_object(step, _at(steps_path, j)), _at(steps_path, j))
            for j, step in enumerate(_list(trace, "logisticsSteps", trace_path))
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=_str(trace, "logisticsBillNo", trace_path),
                carrier=_opt_str(trace, "logisticsCompanyName", trace_path),
                carrier_code=_opt_str(trace, "logisticsCompanyCode", trace_path),
                raw_status=_opt_str(trace, "status", trace_path),
                delivered=any(ALIBABA_DELIVERED_MARK in (e.description or "") for e in events),
                events=events,
                raw=jsonable({k: v for k, v in trace.items() if k != "logisticsSteps"}),
            )
        )
    return shipments


def _alibaba_event(step: Mapping[str, Any], path: str) -> ShipmentEventSnapshot:
    at = _time(step, "acceptTime", path)
    description = _opt_str(step, "remark", path)
    return ShipmentEventSnapshot(
        event_key=event_key(at, None, description),
        event_at=at,
        description=description,
        raw=jsonable(dict(step)),
    )


def alibaba_refund(data: Any, path: str = "") -> RefundSnapshot:
    """1688 after-sales record (§4.4) → RefundSnapshot; amounts here are in fen."""
    obj = _as_object(data, path)
    refund_id = _opt_str(obj, "refundId", path) or _opt_str(obj, "id", path)
    if refund_id is None:
        raise _bad(path, "refundId", "missing")
    raw_status = _str(obj, "status", path)
    refunded = _fen(obj, "refundPayment", path)
    return RefundSnapshot(
        platform=Platform.ALIBABA_1688,
        refund_id=refund_id,
        order_id=_str(obj, "orderId", path),
        status=refund_status(Platform.ALIBABA_1688, raw_status),
        raw_status=raw_status,
        amount=refunded if refunded is not None else _fen(obj, "applyPayment", path),
        reason=_opt_str(obj, "applyReason", path),
        requested_at=_time(obj, "gmtApply", path) or _time(obj, "createTime", path),
        resolved_at=_time(obj, "gmtCompleted", path),
        modified_at=_time(obj, "updateTime", path),
        raw=jsonable(obj),
    )


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
    Platform.TAOBAO: ("pnmLogisticsDetails", "logisticsTraces"),
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
    """An order-list page (§4.5); ``page_no``/``page_size`` stand in when the body omits them."""
    obj = _as_object(data, "")
    total = _opt_int(obj, "total", "")
    if total is None:
        raise _bad("", "total", "missing")
    records = obj.get("records")
    if not isinstance(records, list):
        raise _bad("", "records", "missing" if records is None else "not a list")
    mapper = _ORDER_MAPPERS[platform]
    orders: list[OrderSnapshot] = []
    unreadable: list[UnreadableRecord] = []
    for i, record in enumerate(records):
        try:
            orders.append(mapper(record, _at("records", i)))
        except MalformedResponse as error:
            unreadable.append(UnreadableRecord(_listed_order_id(platform, record), str(error)))
    return OrderListPage(
        total=total,
        page_no=_opt_int(obj, "pageNo", "") or page_no,
        page_size=_opt_int(obj, "pageSize", "") or page_size,
        orders=tuple(orders),
        unreadable=tuple(unreadable),
    )


def _listed_order_id(platform: Platform, record: Any) -> str | None:
    """The order id of a record that could not be read whole, if that much can be."""
    try:
        obj = _as_object(record, "")
        if platform is Platform.TAOBAO:
            return _opt_str(obj, "salesOrderId", "")
        return _alibaba_order_id(_object(obj, "baseInfo", ""), "")
    except MalformedResponse:
        return None


def sort_events(events: Iterable[ShipmentEventSnapshot]) -> tuple[ShipmentEventSnapshot, ...]:
    """Events oldest first, each natural key once (upstream sometimes repeats a step)."""
    unique: dict[str, ShipmentEventSnapshot] = {}
    for event in events:
        unique.setdefault(event.event_key, event)
    far_future = datetime.max.replace(tzinfo=UTC)
    return tuple(sorted(unique.values(), key=lambda e: e.event_at or far_future))
