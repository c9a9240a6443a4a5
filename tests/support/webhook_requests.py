"""Signed callback requests, settings for the receiver, and message bodies, for tests.

One helper builds what PandaPon would send (``signed``); tests then spoil one thing at a time.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from service.config import Settings, load_settings
from service.pandapon.signer import Credentials, signed_headers

ACCESS_KEY = "ak-test-0001"
ACCESS_SECRET = "secret-test-0123456789abcdef"
USER_ID = "acct-test"
TOKEN = "tok-0123456789abcdef-xyz"
CREDENTIALS = Credentials(ACCESS_KEY, ACCESS_SECRET, USER_ID)
WEBHOOK = "/webhooks/pandapon"
JSON_TYPE = {"content-type": "application/json"}


def receiver_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings of a receiver in signature mode with the test credentials."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "broker_url": None,
        "access_key": ACCESS_KEY,
        "access_secret": ACCESS_SECRET,
        "user_id": USER_ID,
        "webhook_auth": "signature",
        "relay_interval_s": 0.2,
        "relay_grace_s": 0.5,
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(**values)


def taobao_status(order_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A Taobao status-change envelope for a fresh order (or ``order_id``)."""
    return {
        "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        "messagePlatform": 0,
        "timestamp": "1764000000000",
        "messageBody": {"salesOrderId": order_id or uuid.uuid4().hex[:20], "subOrders": []},
        **extra,
    }


def encode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope).encode()


def signed(
    *,
    now: float | None = None,
    nonce: str | None = None,
    credentials: Credentials = CREDENTIALS,
) -> dict[str, str]:
    """The five headers plus a JSON content type, as PandaPon would send them."""
    return {**signed_headers(credentials, now=now, nonce=nonce), **JSON_TYPE}
