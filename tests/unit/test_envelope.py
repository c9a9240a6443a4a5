"""Reading PandaPon's envelope: kinds, platforms, order and refund ids, probes, refusals, and
the dedupe key's identity of a message across deliveries."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ledger.models import MessageKind, Platform
from service.webhooks.envelope import classify, decode_json, is_probe, parse_envelope
from service.webhooks.errors import MalformedRequest
from service.webhooks.inbox import dedupe_key

TAOBAO_PRICE = {
    "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
    "messagePlatform": 0,
    "timestamp": "1715669977082",
    "messageBody": {
        "salesOrderId": "3682557363260579405",
        "subOrders": [
            {
                "purchase_order_outer_id": "3682557363260579405",
                "purchase_order_line_outer_id": "3682557363261579405",
                "product_amount": 10000,
                "quantity": 2,
            }
        ],
        "purchaseOrderPriceDTO": {"purchaseCurrency": "CNY", "purchaseTotalFee": 10500},
    },
}
TAOBAO_REFUND = {
    "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
    "messagePlatform": 0,
    "timestamp": "1715669977082",
    "messageBody": {
        "salesOrderId": "3682557363260579405",
        "refundId": "RF20261125001",
        "refundStatus": "WAIT_SELLER_AGREE",
    },
}
ALIBABA_STATUS = {
    "messageType": "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
    "messagePlatform": 1,
    "timestamp": "1715669977082",
    "messageBody": {
        "baseInfo": {"id": 2001223344556677889, "idOfStr": "2001223344556677889"},
        "productItems": [],
    },
}
ALIBABA_REFUND = {
    "messageType": "1688_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
    "messagePlatform": 1,
    "messageBody": {"baseInfo": {"id": 2001223344556677889}, "refundId": "TQ7788"},
}
FLAT_PAID = {
    "messageType": "ORDER_PAY_SUCCESS",
    "messagePlatform": 0,
    "timestamp": 1715669977082,
    "messageBody": json.dumps(
        {"orderId": "T-99", "orderStatus": "WAIT_SELLER_SEND_GOODS", "totalAmount": 10000}
    ),
}


@pytest.mark.parametrize(
    ("envelope", "kind", "platform", "order_id", "refund_id"),
    [
        (TAOBAO_PRICE, MessageKind.PRICE, Platform.TAOBAO, "3682557363260579405", None),
        (
            TAOBAO_REFUND,
            MessageKind.REFUND,
            Platform.TAOBAO,
            "3682557363260579405",
            "RF20261125001",
        ),
        (ALIBABA_STATUS, MessageKind.STATUS, Platform.ALIBABA_1688, "2001223344556677889", None),
        (
            ALIBABA_REFUND,
            MessageKind.REFUND,
            Platform.ALIBABA_1688,
            "2001223344556677889",
            "TQ7788",
        ),
        (FLAT_PAID, MessageKind.STATUS, Platform.TAOBAO, "T-99", None),
    ],
    ids=[
        "taobao-price",
        "taobao-refund",
        "1688-status",
        "1688-refund-numeric-id",
        "flat-string-body",
    ],
)
def test_documented_messages(
    envelope: dict[str, Any],
    kind: MessageKind,
    platform: Platform,
    order_id: str,
    refund_id: str | None,
) -> None:
    parsed = parse_envelope(envelope)
    assert (parsed.kind, parsed.platform, parsed.order_id, parsed.refund_id) == (
        kind,
        platform,
        order_id,
        refund_id,
    )
    assert parsed.known_type


def test_push_time_is_read_from_milliseconds() -> None:
    parsed = parse_envelope(TAOBAO_PRICE)
    assert parsed.pushed_at == datetime.fromtimestamp(1715669977.082, UTC)


@pytest.mark.parametrize(
    ("message_type", "kind", "known"),
    [
        ("TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY", MessageKind.PRICE, True),
        ("ORDER_BUYER_VIEW_ORDER_BUYER_REFUND", MessageKind.REFUND, True),
        ("ORDER_CANCEL", MessageKind.STATUS, True),
        ("ORDER_CREATE", MessageKind.STATUS, True),
        ("TAOBAO_ORDER_LOGISTICS_UPDATE", MessageKind.STATUS, False),
        ("1688_SOMETHING_PRICE_MODIFY_V2", MessageKind.PRICE, False),
        ("ACCOUNT_BALANCE_LOW", MessageKind.OTHER, False),
    ],
)
def test_classify_by_what_the_type_says(message_type: str, kind: MessageKind, known: bool) -> None:
    assert classify(message_type) == (kind, known)


def test_unknown_type_still_yields_its_order_id() -> None:
    parsed = parse_envelope(
        {"messageType": "TAOBAO_ORDER_NEW_THING", "messageBody": {"salesOrderId": "77"}}
    )
    assert parsed.order_id == "77"
    assert parsed.known_type is False
    # No messagePlatform: the type's prefix says Taobao.
    assert parsed.platform is Platform.TAOBAO


def test_message_without_order_or_platform_is_still_parsed() -> None:
    parsed = parse_envelope({"messageType": "ACCOUNT_NOTICE", "messageBody": {"text": "hi"}})
    assert (parsed.kind, parsed.platform, parsed.order_id) == (MessageKind.OTHER, None, None)


def test_platform_as_a_digit_string_is_accepted() -> None:
    assert parse_envelope({**ALIBABA_STATUS, "messagePlatform": "1"}).platform is (
        Platform.ALIBABA_1688
    )


@pytest.mark.parametrize(
    ("raw", "probe"),
    [
        (b"{}", True),
        (b'{"messageType": null}', True),
        (b'{"messageType": ""}', True),
        (b'{"hello": "console"}', True),
        (b'{"messageType": "ORDER_CREATE"}', False),
    ],
)
def test_probe_is_a_json_object_without_a_message_type(raw: bytes, probe: bool) -> None:
    assert is_probe(decode_json(raw)) is probe


@pytest.mark.parametrize(
    "raw", [b"{", b"\xff\xfe", b"[" * 100_000, b"NaN-ish", b'{"a": 1} trailing']
)
def test_malformed_json_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedRequest) as caught:
        decode_json(raw)
    assert caught.value.reason == "malformed_json"


@pytest.mark.parametrize(
    "envelope",
    [
        {"messageType": 5},
        {"messageType": "X" * 129},
        {"messageType": "ORDER\x00CREATE"},
        {"messageType": "ORDER_CREATE\ud800"},
        {**TAOBAO_PRICE, "messagePlatform": 2},
        {**TAOBAO_PRICE, "messagePlatform": True},
        {**TAOBAO_PRICE, "messagePlatform": "taobao"},
        {**TAOBAO_PRICE, "messagePlatform": [0]},
        {**TAOBAO_PRICE, "messagePlatform": 0.0},
        {**TAOBAO_PRICE, "messageBody": "not json"},
        {**TAOBAO_PRICE, "messageBody": "[1, 2]"},
        {**TAOBAO_PRICE, "messageBody": [1, 2]},
        {**TAOBAO_PRICE, "messageBody": {"salesOrderId": {"nested": 1}}},
        {**TAOBAO_PRICE, "messageBody": {"salesOrderId": 1.5}},
        {**TAOBAO_PRICE, "messageBody": {"salesOrderId": "9" * 65}},
        {**ALIBABA_STATUS, "messageBody": {"baseInfo": "2001"}},
        {**TAOBAO_REFUND, "messageBody": {"salesOrderId": "1", "refundId": ["x"]}},
    ],
    ids=[
        "type-not-string",
        "type-too-long",
        "type-with-nul",
        "type-lone-surrogate",
        "platform-2",
        "platform-bool",
        "platform-name",
        "platform-list",
        "platform-float",
        "body-string-not-json",
        "body-string-array",
        "body-array",
        "order-id-object",
        "order-id-float",
        "order-id-too-long",
        "base-info-not-object",
        "refund-id-array",
    ],
)
def test_malformed_envelope_is_refused_with_a_reason(envelope: dict[str, Any]) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_envelope(envelope)
    assert caught.value.reason == "malformed_envelope"
    assert caught.value.detail


def _key(envelope: dict[str, Any], account: str = "acct") -> str:
    return dedupe_key(account, parse_envelope(envelope).canonical)


def test_dedupe_key_ignores_serialization_and_body_encoding() -> None:
    as_string = {**TAOBAO_PRICE, "messageBody": json.dumps(TAOBAO_PRICE["messageBody"], indent=2)}
    reordered = dict(reversed(list(TAOBAO_PRICE.items())))
    assert _key(TAOBAO_PRICE) == _key(as_string) == _key(reordered)
    # Timestamp as a number or as a string: the same push.
    assert _key({**TAOBAO_PRICE, "timestamp": 1715669977082}) == _key(TAOBAO_PRICE)


def test_dedupe_key_ignores_envelope_fields_it_does_not_know() -> None:
    assert _key({**TAOBAO_PRICE, "retryTimes": 3}) == _key(TAOBAO_PRICE)


@pytest.mark.parametrize(
    "changed",
    [
        {"timestamp": "1715669977083"},
        {"messagePlatform": 1},
        {"messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE"},
        {"messageBody": {**TAOBAO_PRICE["messageBody"], "salesOrderId": "1"}},
    ],
)
def test_dedupe_key_differs_between_messages(changed: dict[str, Any]) -> None:
    assert _key({**TAOBAO_PRICE, **changed}) != _key(TAOBAO_PRICE)


def test_dedupe_key_differs_between_accounts() -> None:
    assert _key(TAOBAO_PRICE, "a") != _key(TAOBAO_PRICE, "b")
    assert len(_key(TAOBAO_PRICE)) == 64


# --- invalid fields are refused, never a crash (issue 16, finding 8) -----------------------


@pytest.mark.parametrize(
    "timestamp",
    ["²³", "١٧١٥٦٦٩٩٧٧٠٨٢", "-5", -5, 1715669977082.0, "12x", "9" * 17, "9" * 16, True, [1]],
    ids=[
        "superscript-digits",
        "arabic-indic-digits",
        "negative-string",
        "negative-integer",
        "float",
        "not-digits",
        "too-many-digits",
        "out-of-range",
        "bool",
        "list",
    ],
)
def test_invalid_timestamp_is_refused_with_a_reason(timestamp: object) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_envelope({**TAOBAO_PRICE, "timestamp": timestamp})
    assert caught.value.reason == "malformed_envelope"
    assert "timestamp" in caught.value.detail


@pytest.mark.parametrize("timestamp", [None, "", " 1715669977082 ", 1715669977])
def test_absent_or_plain_timestamp_is_accepted(timestamp: object) -> None:
    envelope = {**TAOBAO_PRICE, "timestamp": timestamp}
    assert parse_envelope(envelope).order_id == "3682557363260579405"


# Digits of every script (Nd) and the other numerals (No: superscripts, fractions ...).
numeral_text = st.text(st.characters(categories=("Nd", "No")), min_size=1, max_size=16)
timestamp_values = (
    st.text() | numeral_text | st.integers() | st.floats() | st.booleans() | st.none()
)


@given(timestamp_values)
@settings(max_examples=300, deadline=None, database=None)
def test_any_timestamp_is_read_or_refused_never_crashes(timestamp: object) -> None:
    try:
        parse_envelope({**TAOBAO_PRICE, "timestamp": timestamp})
    except MalformedRequest as error:
        outcome = error.reason
    else:
        outcome = "read"
    assert outcome in ("read", "malformed_envelope")


@pytest.mark.parametrize(
    "raw",
    [
        '{"messageType": "ORDER_CREATE"}'.encode("utf-16"),
        '{"messageType": "ORDER_CREATE"}'.encode("utf-16-le"),
        '{"messageType": "ORDER_CREATE"}'.encode("utf-32"),
        b'{"messageType": "ORDER\xffCREATE"}',
        b'{"messageType": "ORDER\xc3"}',
    ],
    ids=["utf-16-bom", "utf-16-le", "utf-32-bom", "invalid-byte", "truncated-sequence"],
)
def test_body_that_is_not_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedRequest) as caught:
        decode_json(raw)
    assert caught.value.reason == "malformed_json"


def test_utf8_body_with_a_byte_order_mark_is_read() -> None:
    assert decode_json(b'\xef\xbb\xbf{"messageType": "ORDER_CREATE"}') == {
        "messageType": "ORDER_CREATE"
    }
