"""Property-based: whatever a client sends, the answer is never a 5xx, and a request that cannot
be verified never leaves a row behind (inbox or nonce)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.pandapon.signer import signed_headers
from tests.support.webhook_checks import count
from tests.support.webhook_requests import CREDENTIALS, WEBHOOK, receiver_settings
from tests.support.webhook_server import serving

MAX_BODY = 2048
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Header values an HTTP client can send: printable ASCII, no CR/LF, no surrounding blanks.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(
    str.strip
)
json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
message_types = (
    st.sampled_from(
        [
            "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY",
            "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
            "ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
            "ORDER_CREATE",
            "SOMETHING_ELSE",
        ]
    )
    | st.text(max_size=140)
    | json_value
)
order_ids = st.text(max_size=70) | st.integers() | json_value
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "messageType": message_types,
        "messagePlatform": st.sampled_from([0, 1, "0", "1", 2, -1, None, True]) | json_value,
        "timestamp": st.integers() | st.text(max_size=20) | json_value,
        "messageBody": st.fixed_dictionaries(
            {},
            optional={
                "salesOrderId": order_ids,
                "orderId": order_ids,
                "refundId": order_ids,
                "baseInfo": st.fixed_dictionaries(
                    {}, optional={"id": order_ids, "idOfStr": order_ids}
                )
                | json_value,
            },
        )
        | json_value,
    },
)


def as_body(value: Any, as_string_body: bool) -> bytes:
    if as_string_body and isinstance(value, dict) and "messageBody" in value:
        value = {**value, "messageBody": json.dumps(value["messageBody"])}
    return json.dumps(value).encode()


bodies = (
    st.binary(max_size=3000)
    | st.builds(as_body, envelopes, st.booleans())
    | st.builds(as_body, json_value, st.just(False))
    | st.text(max_size=200).map(str.encode)
)
content_types = (
    st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", "application/x+json"]
    )
    | header_text
)


def spoiled(kind: str, junk: str) -> dict[str, str]:
    """Signed headers with one thing made wrong, so that they can never verify."""
    headers = signed_headers(CREDENTIALS)
    if kind == "signature":
        headers["signature"] = junk if junk.strip().upper() != headers["signature"] else "X"
    elif kind == "key":
        headers["access-key"] = "not-" + headers["access-key"] + junk
    elif kind == "stale":
        headers = signed_headers(CREDENTIALS, now=time.time() - 601 - len(junk))
    elif kind == "future":
        headers = signed_headers(CREDENTIALS, now=time.time() + 601 + len(junk))
    elif kind == "timestamp":
        headers["timestamp"] = junk if not junk.isdigit() else junk + "x"
    else:
        headers.pop(kind, None)
    return headers


unverifiable_headers = st.builds(
    spoiled,
    st.sampled_from(
        ["signature", "key", "stale", "future", "timestamp", "access-key", "nonce-str", "signature"]
    ),
    header_text,
) | st.dictionaries(
    st.sampled_from(["access-key", "timestamp", "nonce-str", "user-id", "signature", "x-other"]),
    header_text,
)

ANSWERS_UNVERIFIED = {200, 400, 401, 413, 415}  # 200: a probe, which stores nothing
ANSWERS_SIGNED = {200, 400, 413, 415}


async def test_no_5xx_and_nothing_stored_from_unverifiable_requests(
    fresh_database_url: str,
) -> None:
    app = create_app(receiver_settings(fresh_database_url, max_body_bytes=MAX_BODY))
    async with serving(app) as url:

        def run() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:

                @SETTINGS
                @given(headers=unverifiable_headers, content_type=content_types, body=bodies)
                def unverifiable(headers: dict[str, str], content_type: str, body: bytes) -> None:
                    response = client.post(
                        WEBHOOK, content=body, headers={**headers, "content-type": content_type}
                    )
                    assert response.status_code in ANSWERS_UNVERIFIED, response.text

                unverifiable()

        await asyncio.to_thread(run)
    assert await count(fresh_database_url, "webhook_inbox") == 0
    assert await count(fresh_database_url, "webhook_nonces") == 0


async def test_no_5xx_for_any_body_that_is_properly_signed(fresh_database_url: str) -> None:
    app = create_app(receiver_settings(fresh_database_url, max_body_bytes=MAX_BODY))
    async with serving(app) as url:

        def run() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:

                @SETTINGS
                @given(body=bodies, content_type=content_types)
                def signed_fuzz(body: bytes, content_type: str) -> None:
                    headers = {**signed_headers(CREDENTIALS), "content-type": content_type}
                    response = client.post(WEBHOOK, content=body, headers=headers)
                    assert response.status_code in ANSWERS_SIGNED, response.text

                signed_fuzz()

        await asyncio.to_thread(run)
