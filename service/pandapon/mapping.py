"""Payload mapping: what PandaPon's query APIs return → the snapshots of ``models.py``.

This is the one module that knows upstream field names, units, time formats and status names
(``pandapon-api.md`` §4, and the public evidence of §6); what is [assumed] lives here and is
pinned by the fixture tests in ``tests/fixtures/{taobao,1688}/``. docs/upstream.md describes the
contract as this module reads it.

Taobao payloads come in two spellings: the contract's camelCase (``salesOrderId``,
``subOrders``, ``purchaseOrderPriceDTO`` …) and Taobao Global's snake_case that PandaPon passes
through (``purchase_id``, ``sub_purchase_orders``, ``purchase_amount`` …, §6). Each field is read
under its first name and, only when that is absent, under the others (``_spelling``); an
after-sales record may also come nested (``refund_order_aggregate``). Statuses may be text or
integers.

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

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from service.domain import OrderStatus, Platform, RefundStatus
from service.pandapon.errors import MalformedResponse
from service.pandapon.models import (
    LineSnapshot,
    OrderListPage,
    OrderSnapshot,
    RefundListPage,
    RefundSnapshot,
    ShipmentEventSnapshot,
    ShipmentSnapshot,
    UnreadableRecord,
    UnreadableRefund,
)

CST = timezone(timedelta(hours=8), "CST")
DEFAULT_CURRENCY = "CNY"

# --- statuses, each with where it comes from -----------------------------------------------------
#
# Sources (pandapon-api.md): [doc] a PandaPon doc page; [TG] Taobao Global's distributor API, which
# PandaPon's Taobao side passes through (§6); [DJ] another reseller gateway on the same platform;
# [VN] PandaPon's Vietnamese pages; [1688] 1688's own API and message pages; [assumed] no public
# source: this project's stand-in (kept so the contract's guesses still read). docs/upstream.md
# prints these tables.

# raw Taobao order status → (normalized, source)
TAOBAO_ORDER_STATUSES: Mapping[str, tuple[OrderStatus, str]] = {
    "BULIDING": (OrderStatus.PENDING_PAYMENT, "[TG] [DJ]"),  # sic: the order is being created
    "BUILDING": (OrderStatus.PENDING_PAYMENT, "[assumed]"),  # in case the typo is ever fixed
    "WAIT_BUYER_P": (OrderStatus.PENDING_PAYMENT, "[TG] [DJ]"),
    "WAIT_BUYER_PAY": (OrderStatus.PENDING_PAYMENT, "[assumed]"),  # the contract's §4.1 name
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
    "WAIT_SELLER_AGREE": (RefundStatus.REQUESTED, "[assumed]"),  # the contract's §4.4 names
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
# An epoch number below this is in seconds ([TG] writes 10 digits), at or above in milliseconds.
EPOCH_SECONDS_BELOW = 10**11


def parse_time(value: str | int) -> datetime:
    """An upstream time as an aware datetime; ValueError when it is none of the known forms.

    Epoch numbers (or all-digit text of 10 or 13 digits) are milliseconds, or seconds when they
    are below 10^11 (10 digits until the year 5138; milliseconds that small are before 1973).
    """
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, str) and value.isdigit() and len(value) in (10, 13):
        value = int(value)
    if isinstance(value, int):
        if -EPOCH_SECONDS_BELOW < value < EPOCH_SECONDS_BELOW:
            return datetime.fromtimestamp(value, UTC)
        return datetime.fromtimestamp(value / 1000, UTC)
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


def _spelling(obj: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """Which of a field's spellings to read in ``obj``: the first of ``names`` with a value,
    else the first present (null), else the first name.

    The readers then note an absence once, under the first name, and only when every spelling
    is absent. Costs one lookup when the first name has a value (the common case); the others
    are looked at only when it has none.
    """
    first = names[0]
    if obj.get(first) is not None:
        return first
    present = first if first in obj else None
    for name in names[1:]:
        if obj.get(name) is not None:
            return name
        if present is None and name in obj:
            present = name
    return present or first


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
    # [TG] writes an epoch 0 for a time that has not come yet (pay_time of an unpaid order).
    if value is None or value == "" or value == "0" or (value == 0 and value is not False):
        _note_absent(obj, key, path)
        return None
    try:
        return parse_time(value)
    except (ValueError, TypeError):
        raise _bad(path, key, "not a time") from None


def _at(path: str, index: int) -> str:
    return f"{path}[{index}]"


# --- Taobao ---------------------------------------------------------------------------------------

# A field's spellings, the contract's (§4, camelCase) first, then the evidence's (§6 [TG],
# snake_case); see ``_spelling``.
_TB_ORDER_ID = ("salesOrderId", "purchase_id")
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
_TB_TRACES = ("logisticsTraces", "logistics_traces")
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
    """Taobao order detail (§4.1, or §6's snake_case) → OrderSnapshot.

    Amounts come from ``purchaseOrderPriceDTO`` (camel) or from the order itself ([TG]
    ``purchase_amount`` (else ``pay_amount``), ``product_amount``, ``domestic_post_fee``,
    ``purchase_currency``), in fen either way.
    """
    obj = _as_object(data, path)
    if _TB_PRICE in obj or not any(key in obj for key in _TB_ORDER_AMOUNTS):
        price_path = _field(path, _TB_PRICE)
        price = _opt_object(obj, _TB_PRICE, path)
        currency = _opt_str(price, "purchaseCurrency", price_path)
        total = _fen(price, "purchaseTotalFee", price_path)
        product = _fen(price, "purchaseProductFee", price_path)
        shipping = _fen(price, "purchaseShippingFee", price_path)
    else:
        currency = _opt_str(obj, "purchase_currency", path)
        total = _fen(obj, _spelling(obj, _TB_ORDER_TOTAL), path)
        product = _fen(obj, "product_amount", path)
        shipping = _fen(obj, "domestic_post_fee", path)
    subs_key = _spelling(obj, _TB_SUB_ORDERS)
    sub_path = _field(path, subs_key)
    lines = tuple(
        _taobao_line(_as_object(sub, _at(sub_path, i)), _at(sub_path, i))
        for i, sub in enumerate(_list(obj, subs_key, path))
    )
    raw_status = _str(obj, "status", path)
    return OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=_str(obj, _spelling(obj, _TB_ORDER_ID), path),
        status=order_status(Platform.TAOBAO, raw_status),
        raw_status=raw_status,
        currency=currency or DEFAULT_CURRENCY,
        total_amount=total,
        product_amount=product,
        shipping_fee=shipping,
        created_at=_time(obj, _spelling(obj, _TB_CREATED), path),
        modified_at=_time(obj, _spelling(obj, _TB_MODIFIED), path),
        paid_at=_time(obj, _spelling(obj, _TB_PAID), path),
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
    sub_id = _opt_str(sub, _spelling(sub, _TB_SUB_ORDER_ID), path)
    line_id = sub_id or _opt_str(sub, "purchase_order_line_outer_id", path)
    if line_id is None:
        raise _bad(path, _TB_SUB_ORDER_ID[0], "missing")
    tracking, carrier, has_tracking = _taobao_line_parcel(sub, path)
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
            raise _bad(path, "logistic_orders", "not a list")
        parcels_path = _field(path, "logistic_orders")
        for i in range(len(parcels) - 1, -1, -1):
            parcel_path = _at(parcels_path, i)
            parcel = _as_object(parcels[i], parcel_path)
            number = _opt_str(parcel, "logistic_number", parcel_path)
            if number is not None:
                return number, _opt_str(parcel, "logistic_company_name", parcel_path), True
    if "logistic_orders" in sub and "logistic_number" not in sub:
        return None, None, False
    tracking = _opt_str(sub, "logistic_number", path)
    carrier = _opt_str(sub, "logistic_company_name", path)
    if tracking is not None:
        return tracking, carrier, True
    says = "logistic_number" in sub or "logistic_orders" in sub
    return None, carrier, False if says else None


def taobao_shipments(
    data: Any, line_id: str | None = None, path: str = ""
) -> list[ShipmentSnapshot]:
    """Taobao logistics detail (§4.3, one sub-order) → one ShipmentSnapshot per parcel.

    Parcels in the documented camel names or [TG]'s snake ones: the parcel status in ``status``
    [assumed] or ``logistics_status`` [TG], the carrier in ``logisticsCompanyName`` [assumed]
    or ``logistics_partner[].company`` [TG]. A parcel is delivered when it or a trace step says
    so (``PARCEL_STATUSES``).
    """
    obj = _as_object(data, path)
    parcels_key = _spelling(obj, _TB_PARCELS)
    parcels_path = _field(path, parcels_key)
    shipments = []
    for i, item in enumerate(_list(obj, parcels_key, path)):
        parcel_path = _at(parcels_path, i)
        parcel = _as_object(item, parcel_path)
        traces_key = _spelling(parcel, _TB_TRACES)
        traces_path = _field(parcel_path, traces_key)
        events = sort_events(
            _taobao_event(_as_object(trace, _at(traces_path, j)), _at(traces_path, j))
            for j, trace in enumerate(_list(parcel, traces_key, parcel_path))
        )
        raw_status = _opt_str(parcel, _spelling(parcel, _TB_PARCEL_STATUS), parcel_path)
        delivered = (raw_status or "").upper() in TAOBAO_DELIVERED_STATUSES or any(
            (e.status or "").upper() in TAOBAO_DELIVERED_STATUSES for e in events
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=_str(parcel, _spelling(parcel, _TB_MAIL_NO), parcel_path),
                carrier=_taobao_carrier(parcel, parcel_path),
                carrier_code=_opt_str(parcel, "logisticsCompanyCode", parcel_path),
                raw_status=raw_status,
                line_id=line_id,
                delivered=delivered,
                events=events,
                raw=jsonable({k: v for k, v in parcel.items() if k not in _TB_TRACES}),
            )
        )
    return shipments


def _taobao_carrier(parcel: Mapping[str, Any], path: str) -> str | None:
    if parcel.get("logisticsCompanyName") is not None or "logistics_partner" not in parcel:
        return _opt_str(parcel, "logisticsCompanyName", path)
    partners_path = _field(path, "logistics_partner")
    for i, partner in enumerate(_list(parcel, "logistics_partner", path)):
        partner_path = _at(partners_path, i)
        company = _opt_str(_as_object(partner, partner_path), "company", partner_path)
        if company is not None:
            return company
    return None


def _taobao_event(trace: Mapping[str, Any], path: str) -> ShipmentEventSnapshot:
    at = _time(trace, "time", path)
    status = _opt_str(trace, "status", path)
    description = _opt_str(trace, _spelling(trace, _TB_STEP_TEXT), path) or _opt_str(
        trace, _spelling(trace, _TB_STEP_LABEL), path
    )
    place = [_opt_str(trace, k, path) for k in ("province", "city", "district")]
    location = " ".join(p for p in place if p) or _opt_str(
        trace, _spelling(trace, _TB_STEP_FACILITY), path
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

    Flat: the contract's camel names (§4.4), or PandaPon's refund list [VN] (``refundId``, an
    integer or text ``refundStatus``), or the same in snake_case. Nested: Taobao Global's
    ``refund_order_aggregate`` [TG], read by ``_taobao_nested_refund``. Statuses in
    ``TAOBAO_REFUND_STATUSES``.
    """
    obj = _as_object(data, path)
    if _TB_REFUND_AGGREGATE in obj:
        return _taobao_nested_refund(obj, path)
    raw_status = _str(obj, _spelling(obj, _TB_REFUND_STATUS), path)
    status = refund_status(Platform.TAOBAO, raw_status)
    modified_at = _time(obj, "gmtModified", path)
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id=_str(obj, _spelling(obj, _TB_REFUND_ID), path),
        order_id=_str(obj, _spelling(obj, _TB_REFUND_ORDER), path),
        status=status,
        raw_status=raw_status,
        amount=_fen(obj, _spelling(obj, _TB_REFUND_FEE), path),
        line_id=_opt_str(obj, _spelling(obj, _TB_REFUND_LINE), path),
        reason=_opt_str(obj, _spelling(obj, _TB_REFUND_REASON), path),
        requested_at=_time(obj, "gmtCreate", path),
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
    aggregate_path = _field(path, _TB_REFUND_AGGREGATE)
    aggregate = _object(obj, _TB_REFUND_AGGREGATE, path)
    record_path = _field(aggregate_path, "refund_order")
    record = _object(aggregate, "refund_order", aggregate_path)
    line_path = _field(aggregate_path, "purchase_order_line")
    line = _opt_object(aggregate, "purchase_order_line", aggregate_path)
    raw_status = _str(record, "refund_status", record_path)
    order_id = _opt_str(line, _spelling(line, ("sales_order_id", "purchase_order_id")), line_path)
    if order_id is None:
        raise _bad(line_path, "sales_order_id", "missing")
    return RefundSnapshot(
        platform=Platform.TAOBAO,
        refund_id=_str(record, "refund_id", record_path),
        order_id=order_id,
        status=refund_status(Platform.TAOBAO, raw_status),
        raw_status=raw_status,
        currency=_opt_str(obj, "currency", path) or DEFAULT_CURRENCY,
        amount=_fen(record, "refund_fee", record_path),
        line_id=_opt_str(line, "purchase_order_line_id", line_path),
        reason=_opt_str(record, "reason_desc", record_path),
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
    """1688 logistics trace (§4.3, one order) → one ShipmentSnapshot per waybill.

    Delivered when the waybill's ``status`` is ``SIGN`` [1688] or a step's text says 签收.
    (An order not shipped yet may answer error ``500_2`` instead: the client reads that as no
    parcels, see ``PandaPonClient.logistics``.)
    """
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
        raw_status = _opt_str(trace, "status", trace_path)
        delivered = (raw_status or "").upper() in ALIBABA_DELIVERED_STATUSES or any(
            ALIBABA_DELIVERED_MARK in (e.description or "") for e in events
        )
        shipments.append(
            ShipmentSnapshot(
                tracking_number=_str(trace, "logisticsBillNo", trace_path),
                carrier=_opt_str(trace, "logisticsCompanyName", trace_path),
                carrier_code=_opt_str(trace, "logisticsCompanyCode", trace_path),
                raw_status=raw_status,
                delivered=delivered,
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
    Platform.TAOBAO: ("pnmLogisticsDetails", _TB_TRACES[0]),
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
            return _opt_str(obj, _spelling(obj, _TB_ORDER_ID), "")
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


# --- refund lists (§6 [VN]; the wrapper and the record shape [assumed]) -------------------------


def map_refund_page(platform: Platform, data: Any, page_no: int, page_size: int) -> RefundListPage:
    """A refund-list page: the order list's wrapper (§4.5) around after-sales records shaped
    as the refund detail returns them (§4.4), read by the same per-record mappers. A record
    that cannot be read is set aside with whatever ids could be read, as on an order list;
    ``page_no``/``page_size`` stand in when the body omits them."""
    obj = _as_object(data, "")
    total = _opt_int(obj, "total", "")
    if total is None:
        raise _bad("", "total", "missing")
    records = obj.get("records")
    if not isinstance(records, list):
        raise _bad("", "records", "missing" if records is None else "not a list")
    mapper = taobao_refund if platform is Platform.TAOBAO else alibaba_refund
    refunds: list[RefundSnapshot] = []
    unreadable: list[UnreadableRefund] = []
    for i, record in enumerate(records):
        try:
            refunds.append(mapper(record, _at("records", i)))
        except MalformedResponse as error:
            order_id, refund_id = _listed_refund_ids(platform, record)
            unreadable.append(UnreadableRefund(order_id, refund_id, str(error)))
    return RefundListPage(
        total=total,
        page_no=_opt_int(obj, "pageNo", "") or page_no,
        page_size=_opt_int(obj, "pageSize", "") or page_size,
        refunds=tuple(refunds),
        unreadable=tuple(unreadable),
    )


# Where an after-sales record may keep its ids, in either spelling (§4.4, §6 [TG]: flat or
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
