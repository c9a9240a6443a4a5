"""Upstream statuses → the domain's, per platform, each entry with the source that shows it
(docs/upstream.md#statuses lists them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.domain import OrderStatus, Platform, RefundStatus

# --- statuses, each with where it comes from -----------------------------------------------------
#
# Sources (docs/upstream.md#evidence): [doc] a PandaPon doc page; [TG] Taobao Global's
# distributor API, which PandaPon's Taobao side passes through; [DJ] another reseller gateway
# on the same platform; [VN] PandaPon's Vietnamese pages; [1688] 1688's own API and message
# pages; [assumed] no public source: this project's stand-in (kept so the contract's guesses
# still read). docs/upstream.md prints these tables.

# raw Taobao order status → (normalized, source)
TAOBAO_ORDER_STATUSES: Mapping[str, tuple[OrderStatus, str]] = {
    "BULIDING": (OrderStatus.PENDING_PAYMENT, "[TG] [DJ]"),  # sic: the order is being created
    "BUILDING": (OrderStatus.PENDING_PAYMENT, "[assumed]"),  # in case the typo is ever fixed
    "WAIT_BUYER_P": (OrderStatus.PENDING_PAYMENT, "[TG] [DJ]"),
    "WAIT_BUYER_PAY": (OrderStatus.PENDING_PAYMENT, "[assumed]"),  # the assumed camel detail's name
    "WAIT_SELLER_SEND_GOODS": (OrderStatus.PAID, "[TG] [DJ]"),
    "WAIT_BUYER_CONFIRM_GOODS": (OrderStatus.SHIPPED, "[TG] [DJ]"),
    # No public source shows it: a delivered order is seen through its parcels (SIGNED).
    "TRADE_FINISHED": (OrderStatus.COMPLETED, "[assumed]"),
    "TRADE_CLOSED": (OrderStatus.CANCELLED, "[TG] [DJ]"),
}
# raw 1688 order status (lower case) → (normalized, source)
ALIBABA_ORDER_STATUSES: Mapping[str, tuple[OrderStatus, str]] = {
    "waitbuyerpay": (OrderStatus.PENDING_PAYMENT, "[assumed]"),  # 1688's public API names
    "waitsellersend": (OrderStatus.PAID, "[assumed]"),
    "waitbuyerreceive": (OrderStatus.SHIPPED, "[assumed]"),
    "confirm_goods": (OrderStatus.COMPLETED, "[assumed]"),  # the buyer confirmed receipt
    "success": (OrderStatus.COMPLETED, "[assumed]"),
    "cancel": (OrderStatus.CANCELLED, "[assumed]"),
    "terminated": (OrderStatus.CANCELLED, "[assumed]"),
}
# raw Taobao after-sales status → (normalized, source). Integers ([TG] ``refund_status``, and
# PandaPon's own ``refundStatus`` [VN]) are read as their decimal text.
TAOBAO_REFUND_STATUSES: Mapping[str, tuple[RefundStatus, str]] = {
    # "No refund applied for": a record saying so is no refund, never a refunded one. Cancelled
    # is the final status that leaves the order's refund_state at none.
    "0": (RefundStatus.CANCELLED, "[TG]"),
    "10": (RefundStatus.REQUESTED, "[TG]"),  # the buyer applied, awaiting the seller
    "20": (RefundStatus.REQUESTED, "[TG]"),  # the seller agreed, awaiting the goods back
    "30": (RefundStatus.REQUESTED, "[TG]"),  # goods returned, awaiting the seller
    "100": (RefundStatus.REFUNDED, "[TG]"),
    "-10": (RefundStatus.REJECTED, "[TG]"),  # the seller refused
    "-20": (RefundStatus.CANCELLED, "[TG]"),  # closed
    "WAIT_SELLER_AGREE": (RefundStatus.REQUESTED, "[assumed]"),  # the flat camel record's names
    "WAIT_BUYER_RETURN_GOODS": (RefundStatus.REQUESTED, "[assumed]"),
    "WAIT_SELLER_CONFIRM_GOODS": (RefundStatus.REQUESTED, "[assumed]"),
    "SELLER_REFUSE_BUYER": (RefundStatus.REJECTED, "[assumed]"),
    "CLOSED": (RefundStatus.CANCELLED, "[assumed]"),
    "SUCCESS": (RefundStatus.REFUNDED, "[assumed]"),
}
# raw 1688 after-sales status (lower case) → (normalized, source)
ALIBABA_REFUND_STATUSES: Mapping[str, tuple[RefundStatus, str]] = {
    "waitselleragree": (RefundStatus.REQUESTED, "[assumed]"),  # 1688's public API names
    "waitbuyersend": (RefundStatus.REQUESTED, "[assumed]"),
    "waitsellerreceive": (RefundStatus.REQUESTED, "[assumed]"),
    # The seller refused and the buyer may amend: still open, not final (1688 has no final
    # "refused": an unamended request ends as refundclose).
    "waitbuyermodify": (RefundStatus.REQUESTED, "[1688]"),
    "refundsuccess": (RefundStatus.REFUNDED, "[assumed]"),
    "refundclose": (RefundStatus.CANCELLED, "[assumed]"),
}
FINAL_REFUND_STATUSES = frozenset(
    {RefundStatus.REFUNDED, RefundStatus.REJECTED, RefundStatus.CANCELLED}
)


def _meanings(table: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    return {raw: meaning for raw, (meaning, _source) in table.items()}


# The lookups the mapping uses (raw → normalized), built once from the tables above.
TAOBAO_ORDER_STATUS: Mapping[str, OrderStatus] = _meanings(TAOBAO_ORDER_STATUSES)
ALIBABA_ORDER_STATUS: Mapping[str, OrderStatus] = _meanings(ALIBABA_ORDER_STATUSES)
TAOBAO_REFUND_STATUS: Mapping[str, RefundStatus] = _meanings(TAOBAO_REFUND_STATUSES)
ALIBABA_REFUND_STATUS: Mapping[str, RefundStatus] = _meanings(ALIBABA_REFUND_STATUSES)


@dataclass(frozen=True, slots=True)
class ParcelStatus:
    """What a raw parcel (or trace step) status says: signed for or not, and who says so."""

    delivered: bool
    source: str


# Parcel and trace-step statuses the mapping can place (upper case); any other is an unmapped
# value. Taobao parcels say it in ``status`` (camel, [assumed]) or ``logistics_status`` [TG],
# trace steps in ``status``; 1688 in a waybill's ``status``.
PARCEL_STATUSES: Mapping[Platform, Mapping[str, ParcelStatus]] = {
    Platform.TAOBAO: {
        "SIGNED": ParcelStatus(True, "[TG]"),
        "SIGN": ParcelStatus(True, "[assumed]"),  # the sandbox's camel parcels and steps
        "TRANSPORT": ParcelStatus(False, "[doc]"),  # the documented trace example
        "ACCEPT": ParcelStatus(False, "[assumed]"),  # the sandbox's first step
        "DELIVERING": ParcelStatus(False, "[TG]"),
        "COLLECTED": ParcelStatus(False, "[TG]"),
        "WAITING_COLLECT": ParcelStatus(False, "[TG]"),
        "WAITING_CUSTOMS": ParcelStatus(False, "[TG]"),
        "CUSTOMS_CLEARANCE": ParcelStatus(False, "[TG]"),
        "CUSTOMS_FAILED": ParcelStatus(False, "[TG]"),
        "EXCEPTION": ParcelStatus(False, "[TG]"),
        "REJECTED": ParcelStatus(False, "[TG]"),  # refused by the receiver
        "RETURNED": ParcelStatus(False, "[TG]"),
        "UNKNOWN": ParcelStatus(False, "[TG]"),
    },
    Platform.ALIBABA_1688: {
        "SIGN": ParcelStatus(True, "[1688]"),
        "SEND": ParcelStatus(False, "[assumed]"),  # the sandbox's waybill on its way
    },
}
TAOBAO_DELIVERED_STATUSES = frozenset(
    raw for raw, known in PARCEL_STATUSES[Platform.TAOBAO].items() if known.delivered
)
ALIBABA_DELIVERED_STATUSES = frozenset(
    raw for raw, known in PARCEL_STATUSES[Platform.ALIBABA_1688].items() if known.delivered
)
# [assumed] 1688 trace steps carry only text; a step saying 签收 (signed for) means delivered.
ALIBABA_DELIVERED_MARK = "签收"


def parcel_status_known(platform: Platform, raw: str | None) -> bool:
    """True when a parcel's raw status is one the mapping places (or there is none)."""
    return raw is None or raw.strip().upper() in PARCEL_STATUSES[platform]


def order_status(platform: Platform, raw: str) -> OrderStatus:
    if platform is Platform.TAOBAO:
        return TAOBAO_ORDER_STATUS.get(raw.strip().upper(), OrderStatus.UNKNOWN)
    return ALIBABA_ORDER_STATUS.get(raw.strip().lower(), OrderStatus.UNKNOWN)


def refund_status(platform: Platform, raw: str) -> RefundStatus:
    """``raw`` as text: an integer status (Taobao's ``100``) is looked up as ``"100"``."""
    if platform is Platform.TAOBAO:
        return TAOBAO_REFUND_STATUS.get(raw.strip().upper(), RefundStatus.UNKNOWN)
    return ALIBABA_REFUND_STATUS.get(raw.strip().lower(), RefundStatus.UNKNOWN)
