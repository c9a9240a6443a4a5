"""1688 payloads (docs/upstream.md#1688-payloads, #evidence [1688]) → snapshots."""

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
    opt_str,
    opt_time,
    req_list,
    req_object,
    req_str,
    sort_events,
    yuan,
)
from service.pandapon.models import (
    LineSnapshot,
    OrderSnapshot,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
)
from service.pandapon.statuses import (
    ALIBABA_DELIVERED_MARK,
    ALIBABA_DELIVERED_STATUSES,
    order_status,
    refund_status,
)

# --- 1688 -----------------------------------------------------------------------------------------


def alibaba_order_id(base: Mapping[str, Any], path: str) -> str | None:
    return opt_str(base, "idOfStr", path) or opt_str(base, "id", path)


def alibaba_order(data: Any, path: str = "") -> OrderSnapshot:
    """1688 order detail (docs/upstream.md#1688-payloads) → OrderSnapshot."""
    obj = as_object(data, path)
    base_path = field_path(path, "baseInfo")
    base = req_object(obj, "baseInfo", path)
    order_id = alibaba_order_id(base, base_path)
    if order_id is None:
        raise malformed(base_path, "idOfStr", "missing")
    raw_status = req_str(base, "status", base_path)
    items_path = field_path(path, "productItems")
    lines: list[LineSnapshot] = []
    refund_ids: list[str] = []
    for i, entry in enumerate(req_list(obj, "productItems", path)):
        item_path = at_index(items_path, i)
        item = as_object(entry, item_path)
        lines.append(_alibaba_line(item, item_path))
        refund_id = opt_str(item, "refundId", item_path)  # [assumed] as in 1688's buyer view
        if refund_id and refund_id not in refund_ids:
            refund_ids.append(refund_id)
    return OrderSnapshot(
        platform=Platform.ALIBABA_1688,
        order_id=order_id,
        status=order_status(Platform.ALIBABA_1688, raw_status),
        raw_status=raw_status,
        currency=DEFAULT_CURRENCY,
        total_amount=yuan(base, "totalAmount", base_path),
        product_amount=yuan(base, "sumProductPayment", base_path),
        shipping_fee=yuan(base, "shippingFee", base_path),
        discount_amount=yuan(base, "discount", base_path),
        close_reason=opt_str(base, "closeReason", base_path),
        created_at=opt_time(base, "createTime", base_path),
        modified_at=opt_time(base, "modifyTime", base_path),
        paid_at=opt_time(base, "payTime", base_path),
        shipped_at=opt_time(base, "allDeliveredTime", base_path),
        completed_at=opt_time(base, "completeTime", base_path),
        lines=tuple(lines),
        refund_ids=tuple(refund_ids),
        raw=jsonable(obj),
    )


def _alibaba_line(item: Mapping[str, Any], path: str) -> LineSnapshot:
    line_id = opt_str(item, "subItemIDString", path) or opt_str(item, "subItemID", path)
    if line_id is None:
        raise malformed(path, "subItemID", "missing")
    return LineSnapshot(
        line_id=line_id,
        product_id=opt_str(item, "productID", path),
        sku_id=opt_str(item, "skuID", path),
        title=opt_str(item, "name", path),
        quantity=opt_int(item, "quantity", path),
        unit_price=yuan(item, "price", path),
        amount=yuan(item, "itemAmount", path),
        raw_status=opt_str(item, "status", path),
        raw=jsonable(dict(item)),
    )


def alibaba_shipments(data: Any, path: str = "") -> list[ShipmentSnapshot]:
    """1688 logistics trace (one order) → one ShipmentSnapshot per waybill.

    Delivered when the waybill's ``status`` is ``SIGN`` [1688] or a step's text says 签收.
    (An order not shipped yet may answer error ``500_2`` instead: the client reads that as no
    parcels, see ``PandaPonClient.logistics``.)
    """
    obj = as_object(data, path)
    traces_path = field_path(path, "logisticsTrace")
    shipments = []
    for i, entry in enumerate(req_list(obj, "logisticsTrace", path)):
        trace_path = at_index(traces_path, i)
        trace = as_object(entry, trace_path)
        steps_path = field_path(trace_path, "logisticsSteps")
        events = sort_events(
            _alibaba_event(as_object(step, at_index(steps_path, j)), at_index(steps_path, j))
            for j, step in enumerate(req_list(trace, "logisticsSteps", trace_path))
        )
        raw_status = opt_str(trace, "status", trace_path)
        delivered = (raw_status or "").upper() in ALIBABA_DELIVERED_STATUSES or any(
            ALIBABA_DELIVERED_MARK in (e.description or "") for e in events
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=req_str(trace, "logisticsBillNo", trace_path),
                carrier=opt_str(trace, "logisticsCompanyName", trace_path),
                carrier_code=opt_str(trace, "logisticsCompanyCode", trace_path),
                raw_status=raw_status,
                delivered=delivered,
                events=events,
                raw=jsonable({k: v for k, v in trace.items() if k != "logisticsSteps"}),
            )
        )
    return shipments


def _alibaba_event(step: Mapping[str, Any], path: str) -> ShipmentEventSnapshot:
    at = opt_time(step, "acceptTime", path)
    description = opt_str(step, "remark", path)
    return ShipmentEventSnapshot(
        event_key=event_key(at, None, description),
        event_at=at,
        description=description,
        raw=jsonable(dict(step)),
    )


def alibaba_refund(data: Any, path: str = "") -> RefundSnapshot:
    """1688 after-sales record → RefundSnapshot; amounts here are in fen."""
    obj = as_object(data, path)
    refund_id = opt_str(obj, "refundId", path) or opt_str(obj, "id", path)
    if refund_id is None:
        raise malformed(path, "refundId", "missing")
    raw_status = req_str(obj, "status", path)
    refunded = fen(obj, "refundPayment", path)
    return RefundSnapshot(
        platform=Platform.ALIBABA_1688,
        refund_id=refund_id,
        order_id=req_str(obj, "orderId", path),
        status=refund_status(Platform.ALIBABA_1688, raw_status),
        raw_status=raw_status,
        amount=refunded if refunded is not None else fen(obj, "applyPayment", path),
        reason=opt_str(obj, "applyReason", path),
        requested_at=opt_time(obj, "gmtApply", path) or opt_time(obj, "createTime", path),
        resolved_at=opt_time(obj, "gmtCompleted", path),
        modified_at=opt_time(obj, "updateTime", path),
        raw=jsonable(obj),
    )
