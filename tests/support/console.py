"""The operator console under test: its settings, a small ledger to look at, logging in.

``seed`` writes, straight into the tables, an order with a status history and messages, a
stream of processed messages over the last hours (so the charts have data), a message whose
body and headers try to inject markup, and an open sync failure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from service.config import Settings
from service.db import asyncpg_dsn
from tests.support.webhook_requests import receiver_settings

ADMIN_TOKEN = "console-test-token-0123456789abcdef"
ACCOUNT = "acct-1"
ORDER_ID = "T1001"
FAILED_ORDER_ID = "T2002"
HOSTILE_BODY = b'{"note":"</pre><script>alert(1)</script><b>bold</b>"}'
HOSTILE_TYPE = "TAOBAO_<img src=x onerror=alert(2)>"
ACCESS_KEY_HEADER = "AKID-1234567890"
# Never stored by the receiver; the console hides it all the same.
SIGNATURE_HEADER = "c2lnbmF0dXJlLW5ldmVyLXNob3du"


def console_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "admin_token": ADMIN_TOKEN,
        # The relay would hand the seeded waiting messages to the broker: keep them still.
        "relay_grace_s": 3600,
        "requeue_after_s": 3600,
    }
    values.update(overrides)
    return receiver_settings(database_url, **values)


@dataclass(frozen=True)
class Seeded:
    order_pk: int
    hostile_inbox_id: int
    failure_id: int
    messages: int


async def seed(database_url: str) -> Seeded:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            order_pk = await conn.fetchval(
                """
                INSERT INTO orders (account_id, platform, order_id, status, raw_status,
                    total_amount, product_amount, shipping_fee, upstream_created_at, paid_at,
                    snapshot_at, first_seen_at, last_synced_at)
                VALUES ($1, 'taobao', $2, 'paid', 'WAIT_SELLER_SEND_GOODS', 99.50, 89.50, 10,
                    now() - interval '3 hours', now() - interval '1 hour', now(),
                    now() - interval '3 hours', now())
                RETURNING id
                """,
                ACCOUNT,
                ORDER_ID,
            )
            await conn.execute(
                """
                INSERT INTO order_status_history (account_id, order_pk, from_status, to_status,
                    from_raw_status, to_raw_status, observed_at, source)
                VALUES ($1, $2, NULL, 'pending_payment', NULL, 'WAIT_BUYER_PAY',
                        now() - interval '3 hours', 'webhook'),
                       ($1, $2, 'pending_payment', 'paid', 'WAIT_BUYER_PAY',
                        'WAIT_SELLER_SEND_GOODS', now() - interval '1 hour', 'webhook')
                """,
                ACCOUNT,
                order_pk,
            )
            # A message a minute over the last two hours, each processed a few seconds after
            # it came in (the lag rising and falling); every fifteenth names the order.
            messages = 120
            for i in range(messages):
                order_id = ORDER_ID if i % 15 == 0 else f"T9{i:03d}"
                body = json.dumps({"messageType": "TAOBAO_ORDER_STATUS", "orderId": order_id})
                await conn.execute(
                    """
                    INSERT INTO webhook_inbox (account_id, dedupe_key, received_at,
                        message_type, kind, platform, order_id, raw_body, headers, state,
                        queued_at, processed_at, signature_state)
                    VALUES ($1, $2, now() - make_interval(mins => $3), 'TAOBAO_ORDER_STATUS',
                        'status', 'taobao', $4, $5, $6::jsonb, 'processed',
                        now() - make_interval(mins => $3),
                        now() - make_interval(mins => $3) + make_interval(secs => $7),
                        'valid')
                    """,
                    ACCOUNT,
                    f"seed-{i}",
                    i,
                    order_id,
                    body.encode(),
                    json.dumps({"user-agent": "PandaPon-Callback/1.0"}),
                    2.5 + 1.5 * math.sin(i / 9) + (i % 4) * 0.4,
                )
            hostile_inbox_id = await conn.fetchval(
                """
                INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind,
                    platform, order_id, raw_body, headers, state)
                VALUES ($1, 'seed-hostile', $2, 'other', 'taobao', NULL, $3, $4::jsonb,
                    'received')
                RETURNING id
                """,
                ACCOUNT,
                HOSTILE_TYPE,
                HOSTILE_BODY,
                json.dumps(
                    {
                        "user-agent": "<svg onload=alert(3)>",
                        "access-key": ACCESS_KEY_HEADER,
                        "signature": SIGNATURE_HEADER,
                    }
                ),
            )
            failure_id = await conn.fetchval(
                """
                INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error,
                    endpoint, http_status, upstream_code, upstream_msg)
                VALUES ($1, 'taobao', $2, 'permanent', 'webhook',
                    'upstream refused the order query', 'order_detail', 200, '40004',
                    'order not visible to this user')
                RETURNING id
                """,
                ACCOUNT,
                FAILED_ORDER_ID,
            )
    finally:
        await conn.close()
    return Seeded(order_pk, hostile_inbox_id, failure_id, messages + 1)


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def log_in(client: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    """Log ``client`` in through the form; returns the login POST's answer."""
    form = await client.get("/console/login")
    assert form.status_code == 200
    return await client.post(
        "/console/login",
        data={"csrf": csrf_of(form.text), "token": token, "next": "/console/"},
    )
