"""Reading PandaPon's callback envelope (docs/upstream.md#callback-envelope): pure functions.

``{"messageType": str, "messageBody": object | JSON string, "messagePlatform": 0 | 1,
"timestamp": "1715669977082"}``. Message type names are partly [assumed], so a message is
classified by what its type says and routed on ``messagePlatform``; an unknown type is kept,
never dropped. Everything a message will put in a text column is checked here, so a storable
envelope cannot make the inbox insert fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.domain import MessageKind, Platform
from service.webhooks.errors import MalformedRequest

# The types the docs (or the white-label copy of the platform) name; others are "unknown".
KNOWN_TYPES = frozenset(
    {
        "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
        "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "TAOBAO_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
        "1688_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
        "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "1688_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
        "ORDER_CREATE",
        "ORDER_CANCEL",
        "ORDER_PAY_SUCCESS",
        "ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
        "ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
    }
)
PLATFORM_CODES = {0: Platform.TAOBAO, 1: Platform.ALIBABA_1688}
PLATFORM_BY_TYPE_PREFIX = (("TAOBAO_", Platform.TAOBAO), ("1688_", Platform.ALIBABA_1688))

# Column widths of webhook_inbox.
MAX_TYPE_LENGTH = 128
MAX_ID_LENGTH = 64
# A bound on the digits converted; a time past the year 9999 is refused after conversion.
MAX_TIMESTAMP_DIGITS = 16


@dataclass(frozen=True, slots=True)
class Envelope:
    message_type: str
    kind: MessageKind
    known_type: bool
    platform: Platform | None
    order_id: str | None
    refund_id: str | None
    pushed_at: datetime | None
    # The message's identity for deduplication: type, platform, decoded body and push time,
    # serialized canonically (see inbox.dedupe_key).
    canonical: bytes


def _malformed(detail: str) -> MalformedRequest:
    return MalformedRequest("malformed_envelope", detail)


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body, UTF-8 JSON, as a JSON object, or MalformedRequest."""
    try:
        # Strictly UTF-8 (RFC 8259 §8.1): json.loads of bytes would also guess UTF-16 and 32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("malformed_json", "body is not UTF-8") from None
    try:
        value = json.loads(text.removeprefix("\ufeff"))
    except (ValueError, RecursionError):
        # ValueError covers bad JSON and over-long integers.
        raise MalformedRequest("malformed_json", "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _malformed("body is not a JSON object")
    return value


def is_probe(document: dict[str, Any]) -> bool:
    """The console's "Verify" (and anything like it): no messageType, nothing to store."""
    return document.get("messageType") in (None, "")


def classify(message_type: str) -> tuple[MessageKind, bool]:
    """(kind, known) from what the type says: PRICE_MODIFY, REFUND, else an order status."""
    upper = message_type.upper()
    known = upper in KNOWN_TYPES
    if "PRICE_MODIFY" in upper:
        return MessageKind.PRICE, known
    if "REFUND" in upper:
        return MessageKind.REFUND, known
    if known or "ORDER" in upper:
        return MessageKind.STATUS, known
    return MessageKind.OTHER, known


def _storable(value: str, field: str, max_length: int) -> str:
    if len(value) > max_length:
        raise _malformed(f"{field} longer than {max_length} characters")
    if "\x00" in value:
        raise _malformed(f"{field} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _malformed(f"{field} is not valid Unicode") from None
    return value


def _platform(document: dict[str, Any], message_type: str) -> Platform | None:
    code = document.get("messagePlatform")
    if code is None:
        upper = message_type.upper()
        for prefix, platform in PLATFORM_BY_TYPE_PREFIX:
            if upper.startswith(prefix):
                return platform
        return None
    if isinstance(code, str) and code.strip() in ("0", "1"):
        code = int(code)
    if isinstance(code, bool) or not isinstance(code, int) or code not in PLATFORM_CODES:
        raise _malformed("messagePlatform must be 0 (Taobao) or 1 (1688)")
    return PLATFORM_CODES[code]


def _body(document: dict[str, Any]) -> dict[str, Any]:
    body = document.get("messageBody")
    if body is None:
        return {}
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            raise _malformed("messageBody is a string but not JSON") from None
    if not isinstance(body, dict):
        raise _malformed("messageBody must be an object or a JSON-encoded object")
    return body


def _id(container: dict[str, Any], key: str, field: str) -> str | None:
    value = container.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _malformed(f"{field} must be a string or an integer")
    text = str(value).strip()
    return _storable(text, field, MAX_ID_LENGTH) if text else None


def extract_order_id(body: dict[str, Any]) -> str | None:
    """Taobao ``salesOrderId``; 1688 ``baseInfo.idOfStr`` / ``baseInfo.id``; flat ``orderId``."""
    base = body.get("baseInfo")
    if base is not None and not isinstance(base, dict):
        raise _malformed("messageBody.baseInfo must be an object")
    candidates = [
        _id(body, "salesOrderId", "salesOrderId"),
        _id(base, "idOfStr", "baseInfo.idOfStr") if base else None,
        _id(base, "id", "baseInfo.id") if base else None,
        _id(body, "orderId", "orderId"),
    ]
    return next((c for c in candidates if c), None)


def _pushed_at(document: dict[str, Any]) -> tuple[str | None, datetime | None]:
    """(the timestamp as sent, for the dedupe key; the push time), or MalformedRequest."""
    value = document.get("timestamp")
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _malformed("timestamp must be a string of digits or an integer")
    text = str(value).strip()
    if not text:
        return text, None
    # ASCII only: str.isdigit() is also true of "²³" and other scripts' digits.
    if not (text.isascii() and text.isdigit()):
        raise _malformed("timestamp must be epoch milliseconds in ASCII digits")
    if len(text) > MAX_TIMESTAMP_DIGITS:
        raise _malformed(f"timestamp longer than {MAX_TIMESTAMP_DIGITS} digits")
    number = int(text)
    # 13 digits in the docs' examples (milliseconds); 10 would be seconds.
    seconds = number / 1000 if len(text) >= 12 else float(number)
    try:
        return text, datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise _malformed("timestamp out of range") from None


def parse_envelope(document: dict[str, Any]) -> Envelope:
    """A storable envelope (not a probe: see ``is_probe``), or MalformedRequest.

    Whatever the document holds, the outcome is one of the two: an envelope that cannot be read
    is the sender's fault (400), never a 5xx that PandaPon would retry for good.
    """
    try:
        return _parse_envelope(document)
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        raise _malformed(f"envelope could not be read ({type(error).__name__})") from None


def _parse_envelope(document: dict[str, Any]) -> Envelope:
    message_type = document.get("messageType")
    if not isinstance(message_type, str):
        raise _malformed("messageType must be a string")
    _storable(message_type, "messageType", MAX_TYPE_LENGTH)
    kind, known = classify(message_type)
    platform = _platform(document, message_type)
    body = _body(document)
    raw_timestamp, pushed_at = _pushed_at(document)
    refund_id = _id(body, "refundId", "refundId")
    canonical = json.dumps(
        [message_type, platform.value if platform else None, body, raw_timestamp],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    return Envelope(
        message_type=message_type,
        kind=kind,
        known_type=known,
        platform=platform,
        order_id=extract_order_id(body),
        refund_id=refund_id,
        pushed_at=pushed_at,
        canonical=canonical,
    )
