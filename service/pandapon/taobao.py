"""Taobao payloads (camelCase and snake_case [TG], docs/upstream.md#payloads) → snapshots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.domain import Platform
from service.pandapon.fields import (
    DEFAULT_CURRENCY,
    as_object,
    at_index,
    event_key,
    fen,
    field_path,
    jsonable,
    malformed,
    opt_int,
    opt_object,
    opt_str,
    opt_time,
    req_list,
    req_object,
    req_str,
    sort_events,
    spelling,
)
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)
from service.pandapon.statuses import (
    FINAL_REFUND_STATUSES,
    TAOBAO_DELIVERED_STATUSES,
    order_status,
    refund_status,
)

# --- Taobao ---------------------------------------------------------------------------------------

# A field's spellings, the assumed camelCase first, then the evidence's ([TG],
# snake_case); see ``fields.spelling``.
TB_ORDER_ID = ("salesOrderId", "purchase_id")
_TB_SUB_ORDERS = ("subOrders", "sub_purchase_orders")
_TB_CREATED = ("gmtCreate", "created_time")
_TB_MODIFIED = ("gmtModified", "modify_time")
_TB_PAID = ("payTime", "pay_time")
_TB_PRICE = "purchaseOrderPriceDTO"
# [TG] keeps the amounts on the order itself: any of these without a price object says so.
_TB_ORDER_AMOUNTS = (
    "purchase_amount",
    "pay_amount",
    "product_amount",
    "domestic_post_fee",
    "purchase_currency",
)
_TB_ORDER_TOTAL = ("purchase_amount", "pay_amount")
_TB_SUB_ORDER_ID = ("subPurchaseOrderId", "sub_purchase_order_id")
_TB_PARCELS = ("pnmLogisticsDetails", "pnm_logistics_details")
TB_TRACES = ("logisticsTraces", "logistics_traces")
_TB_MAIL_NO = ("mailNo", "mail_no")
_TB_PARCEL_STATUS = ("status", "logistics_status")
_TB_STEP_TEXT = ("standerdDesc", "standerd_desc")  # sic, as the API spells it
_TB_STEP_LABEL = ("statusDesc", "status_desc")
_TB_STEP_FACILITY = ("facilityName", "facility_name")
_TB_REFUND_ID = ("refundId", "refund_id")
_TB_REFUND_STATUS = ("refundStatus", "refund_status")
_TB_REFUND_ORDER = ("salesOrderId", "sales_order_id")
_TB_REFUND_FEE = ("refundFee", "refund_fee")
_TB_REFUND_LINE = ("subPurchaseOrderId", "sub_purchase_order_id", "purchase_order_line_id")
_TB_REFUND_REASON = ("reason", "reason_desc")
_TB_REFUND_AGGREGATE = "refund_order_aggregate"


def taobao_order(data: Any, path: str = "") -> OrderSnapshot:
    """Taobao order detail (camelCase, or [TG]'s snake_case) → OrderSnapshot.

    Amounts come from ``purchaseOrderPriceDTO`` (camel) or from the order itself ([TG]
    ``purchase_amount`` (else ``pay_amount``), ``product_amount``, ``domestic_post_fee``,
    ``purchase_currency``), in fen either way.
    """
    obj = as_object(data, path)
    if _TB_PRICE in obj or not any(key in obj for key in _TB_ORDER_AMOUNTS):
        price_path = field_path(path, _TB_PRICE)
        price = opt_object(obj, _TB_PRICE, path)
        currency = opt_str(price, "purchaseCurrency", price_path)
        total = fen(price, "purchaseTotalFee", price_path)
        product = fen(price, "purchaseProductFee", price_path)
        shipping = fen(price, "purchaseShippingFee", price_path)
    else:
        currency = opt_str(obj, "purchase_currency", path)
        total = fen(obj, spelling(obj, _TB_ORDER_TOTAL), path)
        product = fen(obj, "product_amount", path)
        shipping = fen(obj, "domestic_post_fee", path)
    subs_key = spelling(obj, _TB_SUB_ORDERS)
    sub_path = field_path(path, subs_key)
    lines = tuple(
        _taobao_line(as_object(sub, at_index(sub_path, i)), at_index(sub_path, i))
        for i, sub in enumerate(req_list(obj, subs_key, path))
    )
    raw_status = req_str(obj, "status", path)
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=req_str(obj, spelling(obj, TB_ORDER_ID), path),
        status=order_status(Platform.TAOBAO, raw_status),
        raw_status=raw_status,
        currency=currency or DEFAULT_CURRENCY,
        total_amount=total,
        product_amount=product,
        shipping_fee=shipping,
        created_at=opt_time(obj, spelling(obj, _TB_CREATED), path),
        modified_at=opt_time(obj, spelling(obj, _TB_MODIFIED), path),
        paid_at=opt_time(obj, spelling(obj, _TB_PAID), path),
        lines=lines,
        # A sub-order names its latest after-sales record in ``refund_id`` ([TG]; [assumed] in
        # the camel shape); it lets a reconcile find refunds a message did not name.
        refund_ids=tuple(
            dict.fromkeys(ref for line in lines if (ref := _named_refund(line.raw)) is not None)
        ),
        raw=jsonable(obj),
    )


def _named_refund(sub: Mapping[str, Any]) -> str | None:
    """The after-sales record a sub-order names; empty or ``0`` (Go's zero value [TG]) is none."""
    value = sub.get("refund_id")
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return None if text in ("", "0") else text


def _taobao_line(sub: Mapping[str, Any], path: str) -> LineSnapshot:
    # The sub-order id (either spelling) is what the logistics call takes; Taobao's own line
    # number (``purchase_order_line_outer_id``) names the line only when there is none.
    sub_id = opt_str(sub, spelling(sub, _TB_SUB_ORDER_ID), path)
    line_id = sub_id or opt_str(sub, "purchase_order_line_outer_id", path)
    if line_id is None:
        raise malformed(path, _TB_SUB_ORDER_ID[0], "missing")
    tracking, carrier, has_tracking = _taobao_line_parcel(sub, path)
    return LineSnapshot(
        line_id=line_id,
        product_id=opt_str(sub, "item_id", path),
        sku_id=opt_str(sub, "sku_id", path),
        title=opt_str(sub, "title", path),
        quantity=opt_int(sub, "quantity", path),
        amount=fen(sub, "product_amount", path),
        raw_status=opt_str(sub, "status", path),
        logistics_ref=sub_id,
        tracking_number=tracking,
        carrier=carrier,
        has_tracking=has_tracking,
        raw=jsonable(dict(sub)),
    )


def _taobao_line_parcel(
    sub: Mapping[str, Any], path: str
) -> tuple[str | None, str | None, bool | None]:
    """(tracking number, carrier, has tracking) of a sub-order's latest parcel.

    From ``logistic_orders[]`` [TG] (the last entry with a number), else the flat
    ``logistic_number`` / ``logistic_company_name`` (documented; [TG] marks them deprecated).
    ``has tracking`` is False when the sub-order says there is no number yet (null, or an empty
    list), None when it says nothing.
    """
    parcels = sub.get("logistic_orders")
    if parcels:
        if not isinstance(parcels, list):
            raise malformed(path, "logistic_orders", "not a list")
        parcels_path = field_path(path, "logistic_orders")
        for i in range(len(parcels) - 1, -1, -1):
            parcel_path = at_index(parcels_path, i)
            parcel = as_object(parcels[i], parcel_path)
            number = opt_str(parcel, "logistic_number", parcel_path)
            if number is not None:
                return number, opt_str(parcel, "logistic_company_name", parcel_path), True
    if "logistic_orders" in sub and "logistic_number" not in sub:
        return None, None, False
    tracking = opt_str(sub, "logistic_number", path)
    carrier = opt_str(sub, "logistic_company_name", path)
    if tracking is not None:
        return tracking, carrier, True
    says = "logistic_number" in sub or "logistic_orders" in sub
    return None, carrier, False if says else None


def taobao_shipments(
    data: Any, line_id: str | None = None, path: str = ""
) -> list[ShipmentSnapshot]:
    """Taobao logistics detail (one sub-order) → one ShipmentSnapshot per parcel.

    Parcels in the documented camel names or [TG]'s snake ones: the parcel status in ``status``
    [assumed] or ``logistics_status`` [TG], the carrier in ``logisticsCompanyName`` [assumed]
    or ``logistics_partner[].company`` [TG]. A parcel is delivered when it or a trace step says
    so (``PARCEL_STATUSES``).
    """
    obj = as_object(data, path)
    parcels_key = spelling(obj, _TB_PARCELS)
    parcels_path = field_path(path, parcels_key)
    shipments = []
    for i, item in enumerate(req_list(obj, parcels_key, path)):
        parcel_path = at_index(parcels_path, i)
        parcel = as_object(item, parcel_path)
        traces_key = spelling(parcel, TB_TRACES)
        traces_path = field_path(parcel_path, traces_key)
        events = sort_events(
            _taobao_event(as_object(trace, at_index(traces_path, j)), at_index(traces_path, j))
            for j, trace in enumerate(req_list(parcel, traces_key, parcel_path))
        )
        raw_status = opt_str(parcel, spelling(parcel, _TB_PARCEL_STATUS), parcel_path)
        delivered = (raw_status or "").upper() in TAOBAO_DELIVERED_STATUSES or any(
            (e.status or "").upper() in TAOBAO_DELIVERED_STATUSES for e in events
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=req_str(parcel, spelling(parcel, _TB_MAIL_NO), parcel_path),
                carrier=_taobao_carrier(parcel, parcel_path),
                carrier_code=opt_str(parcel, "logisticsCompanyCode", parcel_path),
                raw_status=raw_status,
                line_id=line_id,
                delivered=delivered,
                events=events,
                raw=jsonable({k: v for k, v in parcel.items() if k not in TB_TRACES}),
            )
        )
    return shipments


def _taobao_carrier(parcel: Mapping[str, Any], path: str) -> str | None:
    if parcel.get("logisticsCompanyName") is not None or "logistics_partner" not in parcel:
        return opt_str(parcel, "logisticsCompanyName", path)
    partners_path = field_path(path, "logistics_partner")
    for i, partner in enumerate(req_list(parcel, "logistics_partner", path)):
        partner_path = at_index(partners_path, i)
        company = opt_str(as_object(partner, partner_path), "company", partner_path)
        if company is not None:
            return company
    return None


def _taobao_event(trace: Mapping[str, Any], path: str) -> ShipmentEventSnapshot:
    at = opt_time(trace, "time", path)
    status = opt_str(trace, "status", path)
    description = opt_str(trace, spelling(trace, _TB_STEP_TEXT), path) or opt_str(
        trace, spelling(trace, _TB_STEP_LABEL), path
    )
    place = [opt_str(trace, k, path) for k in ("province", "city", "district")]
    location = " ".join(p for p in place if p) or opt_str(
        trace, spelling(trace, _TB_STEP_FACILITY), path
    )
    return ShipmentEventSnapshot(
        event_key=event_key(at, status, description),
        event_at=at,
        status=status,
        description=description,
        location=location,
        raw=jsonable(dict(trace)),
    )


def taobao_refund(data: Any, path: str = "") -> RefundSnapshot:
    """Taobao after-sales record → RefundSnapshot, flat or nested.

    Flat: the assumed camel names, or PandaPon's refund list [VN] (``refundId``, an
    integer or text ``refundStatus``), or the same in snake_case. Nested: Taobao Global's
    ``refund_order_aggregate`` [TG], read by ``_taobao_nested_refund``. Statuses in
    ``TAOBAO_REFUND_STATUSES``.
    """
    obj = as_object(data, path)
    if _TB_REFUND_AGGREGATE in obj:
        return _taobao_nested_refund(obj, path)
    raw_status = req_str(obj, spelling(obj, _TB_REFUND_STATUS), path)
    status = refund_status(Platform.TAOBAO, raw_status)
    modified_at = opt_time(obj, "gmtModified", path)
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id=req_str(obj, spelling(obj, _TB_REFUND_ID), path),
        order_id=req_str(obj, spelling(obj, _TB_REFUND_ORDER), path),
        status=status,
        raw_status=raw_status,
        amount=fen(obj, spelling(obj, _TB_REFUND_FEE), path),
        line_id=opt_str(obj, spelling(obj, _TB_REFUND_LINE), path),
        reason=opt_str(obj, spelling(obj, _TB_REFUND_REASON), path),
        requested_at=opt_time(obj, "gmtCreate", path),
        # Taobao gives no completion time: a final record was resolved when last modified.
        resolved_at=modified_at if status in FINAL_REFUND_STATUSES else None,
        modified_at=modified_at,
        raw=jsonable(obj),
    )


def _taobao_nested_refund(obj: Mapping[str, Any], path: str) -> RefundSnapshot:
    """[TG] ``{"currency", "refund_order_aggregate": {"refund_order": {"refund_id",
    "refund_fee", "refund_status", "reason_desc", …}, "purchase_order_line": {"sales_order_id",
    "purchase_order_id", "purchase_order_line_id", …}}}``.

    The order is ``sales_order_id`` (else ``purchase_order_id``), the line
    ``purchase_order_line_id``. The record carries no time of its own, so requested, resolved
    and modified times stay unknown.
    """
    aggregate_path = field_path(path, _TB_REFUND_AGGREGATE)
    aggregate = req_object(obj, _TB_REFUND_AGGREGATE, path)
    record_path = field_path(aggregate_path, "refund_order")
    record = req_object(aggregate, "refund_order", aggregate_path)
    line_path = field_path(aggregate_path, "purchase_order_line")
    line = opt_object(aggregate, "purchase_order_line", aggregate_path)
    raw_status = req_str(record, "refund_status", record_path)
    order_id = opt_str(line, spelling(line, ("sales_order_id", "purchase_order_id")), line_path)
    if order_id is None:
        raise malformed(line_path, "sales_order_id", "missing")
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id=req_str(record, "refund_id", record_path),
        order_id=order_id,
        status=refund_status(Platform.TAOBAO, raw_status),
        raw_status=raw_status,
        currency=opt_str(obj, "currency", path) or DEFAULT_CURRENCY,
        amount=fen(record, "refund_fee", record_path),
        line_id=opt_str(line, "purchase_order_line_id", line_path),
        reason=opt_str(record, "reason_desc", record_path),
        raw=jsonable(obj),
    )
