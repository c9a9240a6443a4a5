"""Neutral world → what PandaPon would send: query-API ``data`` and callback messages.

Written from docs/upstream.md directly, not from ``service.pandapon.mapping``: raw status
names, fen for Taobao and refunds, yuan for 1688, ``yyyy-MM-dd HH:mm:ss`` China time for Taobao,
``20180801104333000+0800`` for 1688, field names as documented (or assumed) there.

What a platform does not carry is not rendered, so the ledger cannot know it either: Taobao has
no unit price, ship/complete time, discount or close reason; 1688 trace steps have no status or
location, and 1688 refunds name no line.

Taobao query payloads come in two spellings (``PayloadCase``): ``camel``, the contract's
assumption, and ``snake``, the shape the public evidence shows ([TG]: Taobao Global's
snake_case names, ``WAIT_BUYER_P``, integer refund statuses, epoch-millisecond times, a nested
refund record, ``SIGNED`` / ``DELIVERING`` parcels). 1688 payloads and callbacks have one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from service.domain import OrderStatus, Platform, RefundStatus
from service.sandbox.world import (
    ChangeKind,
    WorldEvent,
    WorldLine,
    WorldOrder,
    WorldRefund,
    WorldShipment,
)

CHINA = timezone(timedelta(hours=8))

TAOBAO_STATUS: Mapping[OrderStatus, str] = {
    OrderStatus.PENDING_PAYMENT: "WAIT_BUYER_PAY",
    OrderStatus.PAID: "WAIT_SELLER_SEND_GOODS",
    OrderStatus.SHIPPED: "WAIT_BUYER_CONFIRM_GOODS",
    OrderStatus.COMPLETED: "TRADE_FINISHED",
    OrderStatus.CANCELLED: "TRADE_CLOSED",
}
ALIBABA_STATUS: Mapping[OrderStatus, str] = {
    OrderStatus.PENDING_PAYMENT: "waitbuyerpay",
    OrderStatus.PAID: "waitsellersend",
    OrderStatus.SHIPPED: "waitbuyerreceive",
    OrderStatus.COMPLETED: "success",
    OrderStatus.CANCELLED: "cancel",  # "terminated" once it had been paid
}
TAOBAO_REFUND: Mapping[RefundStatus, str] = {
    RefundStatus.REQUESTED: "WAIT_SELLER_AGREE",
    RefundStatus.REJECTED: "SELLER_REFUSE_BUYER",
    RefundStatus.CANCELLED: "CLOSED",
    RefundStatus.REFUNDED: "SUCCESS",
}
ALIBABA_REFUND: Mapping[RefundStatus, str] = {
    RefundStatus.REQUESTED: "waitselleragree",
    RefundStatus.REJECTED: "waitbuyermodify",
    RefundStatus.CANCELLED: "refundclose",
    RefundStatus.REFUNDED: "refundsuccess",
}
_TRACE_LABEL = {"ACCEPT": "已揽收", "TRANSPORT": "运输中", "DELIVERING": "派送中", "SIGN": "已签收"}

MESSAGE_PLATFORM = {Platform.TAOBAO: 0, Platform.ALIBABA_1688: 1}
_MESSAGE_PREFIX = {Platform.TAOBAO: "TAOBAO", Platform.ALIBABA_1688: "1688"}
CallbackStyle = Literal["platform", "flat"]
PayloadCase = Literal["camel", "snake"]

# [TG]: awaiting payment is WAIT_BUYER_P; no source shows a completed order's status, so it
# keeps the contract's TRADE_FINISHED.
TAOBAO_SNAKE_STATUS: Mapping[OrderStatus, str] = {
    **TAOBAO_STATUS,
    OrderStatus.PENDING_PAYMENT: "WAIT_BUYER_P",
}
# [TG] integer refund statuses: 0 none, 10 applied, 20 agreed, 30 returned, 100 success,
# -10 refused, -20 closed.
TAOBAO_SNAKE_REFUND: Mapping[RefundStatus, int] = {
    RefundStatus.REQUESTED: 10,
    RefundStatus.REJECTED: -10,
    RefundStatus.CANCELLED: -20,
    RefundStatus.REFUNDED: 100,
}
NO_REFUND = 0
REFUND_TYPE_ONLY_REFUND = 1  # [TG] 1 refund only, 2 return and refund


# --- little formats -------------------------------------------------------------------------------


def fen(amount: Decimal) -> int:
    return int((amount * 100).to_integral_value())


def yuan(amount: Decimal) -> float:
    """A JSON number; 2-decimal amounts survive the float exactly (shortest repr)."""
    return float(amount)


def taobao_time(moment: datetime | None) -> str | None:
    return moment.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S") if moment else None


def epoch_ms(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment else None


def alibaba_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    local = moment.astimezone(CHINA)
    return local.strftime("%Y%m%d%H%M%S") + f"{local.microsecond // 1000:03d}+0800"


def raw_order_status(order: WorldOrder) -> str:
    if order.raw_status is not None:  # set through the control API
        return order.raw_status
    if order.platform is Platform.TAOBAO:
        return TAOBAO_STATUS[order.status]
    if order.status is OrderStatus.CANCELLED and order.paid_at is not None:
        return "terminated"
    return ALIBABA_STATUS[order.status]


def raw_refund_status(refund: WorldRefund) -> str:
    table = TAOBAO_REFUND if refund.platform is Platform.TAOBAO else ALIBABA_REFUND
    return table[refund.status]


# --- Taobao ---------------------------------------------------------------------------------------


def taobao_order(order: WorldOrder) -> dict[str, Any]:
    status = raw_order_status(order)
    return {
        "salesOrderId": order.order_id,
        "status": status,
        "gmtCreate": taobao_time(order.created_at),
        "gmtModified": taobao_time(order.modified_at),
        "payTime": taobao_time(order.paid_at),
        "purchaseOrderPriceDTO": _taobao_price(order),
        "subOrders": [_taobao_sub_order(order, line, status) for line in order.lines],
    }


def _taobao_price(order: WorldOrder) -> dict[str, Any]:
    return {
        "purchaseCurrency": order.currency,
        "purchaseTotalFee": fen(order.total_amount),
        "purchaseProductFee": fen(order.product_amount),
        "purchaseShippingFee": fen(order.shipping_fee),
    }


def _taobao_sub_order(order: WorldOrder, line: WorldLine, status: str) -> dict[str, Any]:
    shipment = order.shipment_for_line(line.line_id)
    refunds = [r.refund_id for r in order.refunds if r.line_id == line.line_id]
    return {
        "subPurchaseOrderId": line.line_id,
        "purchase_order_outer_id": order.order_id,
        "purchase_order_line_outer_id": line.outer_line_id,
        "item_id": line.product_id,
        "sku_id": line.sku_id,
        "title": line.title,
        "quantity": line.quantity,
        "product_amount": fen(line.amount),
        "status": status,
        "close_time_without_payment": None,
        "detail_error_code": None,
        "logistic_company_name": shipment.carrier if shipment else None,
        "logistic_number": shipment.tracking_number if shipment else None,
        "refund_id": refunds[-1] if refunds else None,  # [assumed], see mapping.taobao_order
    }


def taobao_logistics(order: WorldOrder, line: WorldLine) -> dict[str, Any]:
    parcels = [s for s in order.shipments if line.line_id in s.line_ids]
    return {
        "purchaseOrderOuterId": order.order_id,
        "pnmLogisticsDetails": [_taobao_parcel(s) for s in parcels],
    }


def _taobao_parcel(shipment: WorldShipment) -> dict[str, Any]:
    last = shipment.events[-1].status if shipment.events else None
    return {
        "mailNo": shipment.tracking_number,
        "logisticsCompanyName": shipment.carrier,
        "logisticsCompanyCode": shipment.carrier_code,
        "status": "SIGN" if shipment.delivered_at else (last or "ACCEPT"),
        "logisticsTraces": [_taobao_trace(e) for e in shipment.events],
    }


def _taobao_trace(event: WorldEvent) -> dict[str, Any]:
    return {
        "statusDesc": _TRACE_LABEL.get(event.status or "", event.status),
        "province": None,
        "city": event.location,
        "district": None,
        "action": f"TMS_{event.status}" if event.status else None,
        "facilityName": event.location,
        "time": taobao_time(event.at),
        "standerdDesc": event.description,
        "status": event.status,
        "nextCity": None,
        "nextNodeName": None,
    }


def taobao_refund(refund: WorldRefund) -> dict[str, Any]:
    return {
        "refundId": refund.refund_id,
        "salesOrderId": refund.order_id,
        "subPurchaseOrderId": refund.line_id,
        "refundStatus": raw_refund_status(refund),
        "refundFee": fen(refund.amount),
        "reason": refund.reason,
        "gmtCreate": taobao_time(refund.requested_at),
        "gmtModified": taobao_time(refund.modified_at),
    }


# --- Taobao, snake_case ([TG]) --------------------------------------------------------------------


def taobao_order_snake(order: WorldOrder) -> dict[str, Any]:
    status = order.raw_status or TAOBAO_SNAKE_STATUS[order.status]
    paid = order.paid_at is not None
    return {
        "purchase_id": order.order_id,
        "status": status,
        "purchase_amount": fen(order.total_amount),
        "product_amount": fen(order.product_amount),
        "pay_amount": fen(order.total_amount) if paid else None,
        "domestic_post_fee": fen(order.shipping_fee),
        "purchase_currency": order.currency,
        "pay_time": epoch_ms(order.paid_at),
        "created_time": epoch_ms(order.created_at),
        "modify_time": epoch_ms(order.modified_at),
        "sub_purchase_orders": [
            _taobao_sub_order_snake(order, line, status, paid) for line in order.lines
        ],
    }


def _taobao_sub_order_snake(
    order: WorldOrder, line: WorldLine, status: str, paid: bool
) -> dict[str, Any]:
    refunds = [r for r in order.refunds if r.line_id == line.line_id]
    latest = refunds[-1] if refunds else None
    return {
        "sub_purchase_order_id": line.line_id,
        "purchase_order_outer_id": order.order_id,
        "purchase_order_line_outer_id": line.outer_line_id,
        "status": status,
        "quantity": line.quantity,
        "title": line.title,
        "item_id": line.product_id,
        "sku_id": line.sku_id,
        "purchase_amount": fen(line.amount),
        "pay_amount": fen(line.amount) if paid else None,
        "product_amount": fen(line.amount),
        "refund_id": latest.refund_id if latest else None,
        "refund_status": TAOBAO_SNAKE_REFUND[latest.status] if latest else NO_REFUND,
        "logistic_orders": [
            {
                "logistic_company_name": s.carrier,
                "logistic_number": s.tracking_number,
                "rts_time": epoch_ms(s.shipped_at),
            }
            for s in order.shipments
            if line.line_id in s.line_ids
        ],
    }


def taobao_logistics_snake(order: WorldOrder, line: WorldLine) -> dict[str, Any]:
    """The documented camel wrapper and traces; parcels carry [TG]'s fields (``mailNo`` camel)."""
    parcels = [s for s in order.shipments if line.line_id in s.line_ids]
    return {
        "purchaseOrderOuterId": order.order_id,
        "pnmLogisticsDetails": [_taobao_parcel_snake(order, s) for s in parcels],
    }


def _taobao_parcel_snake(order: WorldOrder, shipment: WorldShipment) -> dict[str, Any]:
    delivered = shipment.delivered_at is not None
    return {
        "mailNo": shipment.tracking_number,
        "logistics_partner": [
            {"company": shipment.carrier, "company_contact": None, "company_image_url": None}
        ],
        "logistics_status": "SIGNED" if delivered else "DELIVERING",
        "logistics_desc": _TRACE_LABEL["SIGN"] if delivered else _TRACE_LABEL["DELIVERING"],
        "goods_number": sum(
            line.quantity for line in order.lines if line.line_id in shipment.line_ids
        ),
        "logisticsTraces": [_taobao_trace(e) for e in shipment.events],
    }


def taobao_refund_snake(refund: WorldRefund, order: WorldOrder) -> dict[str, Any]:
    line = order.line(refund.line_id) if refund.line_id else None
    return {
        "currency": order.currency,
        "refund_order_aggregate": {
            "refund_order": {
                "refund_id": refund.refund_id,
                "refund_fee": fen(refund.amount),
                "refund_status": TAOBAO_SNAKE_REFUND[refund.status],
                "refund_type": REFUND_TYPE_ONLY_REFUND,
                "reason_desc": refund.reason,
            },
            "purchase_order_line": {
                "sales_order_id": refund.order_id,
                "purchase_order_id": refund.order_id,
                "purchase_order_line_id": refund.line_id,
                "total_price": fen(line.amount) if line else None,
            },
        },
    }


# --- 1688 -----------------------------------------------------------------------------------------


def alibaba_order(order: WorldOrder) -> dict[str, Any]:
    status = raw_order_status(order)
    refunded_by_line: dict[str, Decimal] = {}
    refund_by_line: dict[str, str] = {}
    for refund in order.refunds:
        if refund.line_id is None:
            continue
        refund_by_line[refund.line_id] = refund.refund_id
        if refund.status is RefundStatus.REFUNDED:
            total = refunded_by_line.get(refund.line_id, Decimal("0"))
            refunded_by_line[refund.line_id] = total + refund.amount
    items = []
    for line in order.lines:
        item: dict[str, Any] = {
            "subItemID": int(line.line_id),
            "productID": int(line.product_id) if line.product_id.isdigit() else line.product_id,
            "skuID": int(line.sku_id) if line.sku_id and line.sku_id.isdigit() else line.sku_id,
            "name": line.title,
            "quantity": line.quantity,
            "price": yuan(line.unit_price),
            "itemAmount": yuan(line.amount),
            "status": status,
            "refund": yuan(refunded_by_line.get(line.line_id, Decimal("0.00"))),
            "unit": "件",
        }
        if line.line_id in refund_by_line:
            item["refundId"] = refund_by_line[line.line_id]
        items.append(item)
    return {
        "baseInfo": {
            "id": int(order.order_id),
            "idOfStr": order.order_id,
            "status": status,
            "totalAmount": yuan(order.total_amount),
            "sumProductPayment": yuan(order.product_amount),
            "shippingFee": yuan(order.shipping_fee),
            "discount": yuan(order.discount_amount),
            "refund": yuan(order.refunded_amount),
            "createTime": alibaba_time(order.created_at),
            "modifyTime": alibaba_time(order.modified_at),
            "payTime": alibaba_time(order.paid_at),
            "allDeliveredTime": alibaba_time(order.shipped_at),
            "completeTime": alibaba_time(order.completed_at),
            "closeReason": order.close_reason,
            "buyerID": "b2b-sandboxbuyer",
            "sellerID": "b2b-sandboxseller",
            "tradeType": "50060",
        },
        "productItems": items,
        "nativeLogistics": {
            "address": "文一西路 969 号",
            "area": "余杭区",
            "city": "杭州市",
            "province": "浙江省",
            "contactPerson": "沙盒",
            "logisticsItems": [
                {
                    "logisticsBillNo": s.tracking_number,
                    "logisticsCompanyName": s.carrier,
                    "deliveredTime": alibaba_time(s.shipped_at),
                    "status": "SIGN" if s.delivered_at else "SEND",
                }
                for s in order.shipments
            ],
        },
        "tradeTerms": [],
        "guaranteesTerms": {},
        "extAttributes": [],
        "orderRateInfo": {},
        "orderInvoiceInfo": None,
        "customs": None,
        "overseasExtraAddress": None,
        "orderBizInfo": {},
    }


def alibaba_logistics(order: WorldOrder) -> dict[str, Any]:
    return {
        "logisticsTrace": [
            {
                "logisticsBillNo": s.tracking_number,
                "logisticsId": f"LP00{s.tracking_number}",
                "logisticsCompanyName": s.carrier,
                "logisticsSteps": [
                    {"acceptTime": taobao_time(e.at), "remark": e.description} for e in s.events
                ],
            }
            for s in order.shipments
        ]
    }


def alibaba_refund(refund: WorldRefund) -> dict[str, Any]:
    refunded = refund.status is RefundStatus.REFUNDED
    return {
        "id": int(refund.refund_id.removeprefix("TQ")),
        "refundId": refund.refund_id,
        "orderId": refund.order_id,
        "status": raw_refund_status(refund),
        "createTime": alibaba_time(refund.requested_at),
        "updateTime": alibaba_time(refund.modified_at),
        "alipayPaymentId": f"2026{refund.refund_id[-12:]}",
        "applyCarriage": 0,
        "applyPayment": fen(refund.amount),
        "applyReason": refund.reason,
        "applyReasonId": 20006,
        "applySubReason": None,
        "buyerLogisticsName": None,
        "buyerSendGoods": False,
        "refundPayment": fen(refund.amount) if refunded else None,
        "gmtApply": alibaba_time(refund.requested_at),
        "gmtCompleted": alibaba_time(refund.resolved_at),
    }


# --- by platform ----------------------------------------------------------------------------------


def order_data(order: WorldOrder, case: PayloadCase = "camel") -> dict[str, Any]:
    if order.platform is Platform.ALIBABA_1688:
        return alibaba_order(order)
    return taobao_order_snake(order) if case == "snake" else taobao_order(order)


def refund_data(
    refund: WorldRefund, case: PayloadCase = "camel", order: WorldOrder | None = None
) -> dict[str, Any]:
    """The after-sales record; the snake Taobao one needs ``order`` (its line's price)."""
    if refund.platform is Platform.ALIBABA_1688:
        return alibaba_refund(refund)
    if case == "snake":
        if order is None:
            raise ValueError("a snake_case Taobao refund is rendered with its order")
        return taobao_refund_snake(refund, order)
    return taobao_refund(refund)


# [1688]: 1688's own logistics API answers error 500_2 ("not shipped yet, no logistics") for
# an order that has not shipped. The evidence variant (``snake``) answers so; ``camel`` keeps the
# contract's empty ``logisticsTrace``.
ALIBABA_NOT_SHIPPED_CODE = "500_2"
ALIBABA_NOT_SHIPPED_MSG = "订单未发货，暂无物流信息"


def logistics_error(order: WorldOrder, case: PayloadCase = "camel") -> tuple[str, str] | None:
    """The error (code, msg) a logistics request for ``order`` answers instead of data, if any."""
    if order.platform is Platform.ALIBABA_1688 and case == "snake" and not order.shipments:
        return ALIBABA_NOT_SHIPPED_CODE, ALIBABA_NOT_SHIPPED_MSG
    return None


def logistics_data(
    order: WorldOrder, line: WorldLine | None = None, case: PayloadCase = "camel"
) -> dict[str, Any]:
    """Taobao answers per sub-order (``line``), 1688 per order."""
    if order.platform is Platform.ALIBABA_1688:
        return alibaba_logistics(order)
    if line is None:
        raise ValueError("Taobao logistics are rendered per sub-order")
    return taobao_logistics_snake(order, line) if case == "snake" else taobao_logistics(order, line)


def order_page(
    orders: list[WorldOrder],
    total: int,
    page_no: int,
    page_size: int,
    case: PayloadCase = "camel",
) -> dict[str, Any]:
    """The page wrapper keeps the contract's names in either case; only the records change."""
    return _page([order_data(o, case) for o in orders], total, page_no, page_size)


def refund_page(
    refunds: list[tuple[WorldRefund, WorldOrder]],
    total: int,
    page_no: int,
    page_size: int,
    case: PayloadCase = "camel",
) -> dict[str, Any]:
    """A refund-list page [assumed]: the order list's wrapper around after-sales records
    rendered as the refund detail renders them (each with its order, for the snake spelling)."""
    return _page([refund_data(r, case, o) for r, o in refunds], total, page_no, page_size)


def _page(
    records: list[dict[str, Any]], total: int, page_no: int, page_size: int
) -> dict[str, Any]:
    return {"total": total, "pageNo": page_no, "pageSize": page_size, "records": records}


def envelope(
    data: Any, request_id: str, *, code: int | str = 200, msg: str = "成功"
) -> dict[str, Any]:
    return {
        "requestId": request_id,
        "code": code,
        "developId": "1014533973088404335",
        "msg": msg,
        "data": data,
    }


# --- callbacks (docs/upstream.md#callbacks) ---------------------------------------------------

_FLAT_TYPES = {
    ChangeKind.CREATED: "ORDER_CREATE",
    ChangeKind.CANCELLED: "ORDER_CANCEL",
    ChangeKind.PAID: "ORDER_PAY_SUCCESS",
    ChangeKind.PRICE_CHANGED: "ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
    ChangeKind.REFUND_OPENED: "ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
    ChangeKind.REFUND_RESOLVED: "ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
}
# The white-label copy names no type for shipping or confirming: the sandbox's stand-in.
FLAT_STATUS_TYPE = "ORDER_STATUS_CHANGE"


def message_type(kind: ChangeKind, platform: Platform, style: CallbackStyle) -> str:
    if style == "flat":
        return _FLAT_TYPES.get(kind, FLAT_STATUS_TYPE)
    prefix = _MESSAGE_PREFIX[platform]
    if kind is ChangeKind.PRICE_CHANGED:
        return f"{prefix}_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY"
    if kind in (ChangeKind.REFUND_OPENED, ChangeKind.REFUND_RESOLVED):
        return f"{prefix}_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND"
    return f"{prefix}_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"


def callback_body(
    kind: ChangeKind, order: WorldOrder, refund: WorldRefund | None, style: CallbackStyle
) -> dict[str, Any]:
    if style == "flat":
        return _flat_body(order, refund)
    if order.platform is Platform.ALIBABA_1688:
        body = alibaba_order(order)  # 1688 callbacks have the shape of the order detail
        if refund is not None:
            body["refundId"] = refund.refund_id
        return body
    status = raw_order_status(order)
    body = {
        "salesOrderId": order.order_id,
        "subOrders": [
            {
                k: v
                for k, v in _taobao_sub_order(order, line, status).items()
                if k
                not in ("subPurchaseOrderId", "item_id", "sku_id", "title", "status", "refund_id")
            }
            for line in order.lines
        ],
        "purchaseOrderPriceDTO": _taobao_price(order),
    }
    if refund is not None:
        body["refundId"] = refund.refund_id
        body["refundStatus"] = raw_refund_status(refund)
    return body


def _flat_body(order: WorldOrder, refund: WorldRefund | None) -> dict[str, Any]:
    latest = refund or (order.refunds[-1] if order.refunds else None)
    return {
        "orderId": order.order_id,
        "orderNo": order.order_id,
        "orderStatus": raw_order_status(order),
        "payStatus": 1 if order.paid_at else 0,
        "totalAmount": fen(order.total_amount),
        "shippingFee": fen(order.shipping_fee),
        "productAmount": fen(order.total_amount - order.shipping_fee),
        "refundAmount": fen(order.refunded_amount),
        "refundStatus": raw_refund_status(latest) if latest else None,
        "closeReason": order.close_reason,
        "tbCreateTime": taobao_time(order.created_at),
        "payTime": taobao_time(order.paid_at),
    }


def callback_message(
    kind: ChangeKind,
    order: WorldOrder,
    refund: WorldRefund | None,
    *,
    style: CallbackStyle,
    body_as_string: bool,
    timestamp_ms: int,
) -> dict[str, Any]:
    body = callback_body(kind, order, refund, style)
    return {
        "messageType": message_type(kind, order.platform, style),
        "messageBody": json.dumps(body, ensure_ascii=False) if body_as_string else body,
        "messagePlatform": MESSAGE_PLATFORM[order.platform],
        "timestamp": str(timestamp_ms),
    }
