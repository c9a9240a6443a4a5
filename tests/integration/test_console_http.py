"""The console over real HTTP, without a browser: off without a token, the login and its
cookie, sessions and CSRF, escaping of what callers sent, replay and dismiss, bad input."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from dramatiq.brokers.stub import StubBroker

from service.app import create_app
from service.broker import RECONCILE_QUEUE
from service.db import asyncpg_dsn
from tests.support.console import (
    ACCESS_KEY_HEADER,
    ADMIN_TOKEN,
    FAILED_ORDER_ID,
    HOSTILE_TYPE,
    ORDER_ID,
    SIGNATURE_HEADER,
    Seeded,
    console_settings,
    csrf_of,
    log_in,
    seed,
)
from tests.support.webhook_server import serving


@dataclass
class Console:
    client: httpx.AsyncClient
    broker: StubBroker
    database_url: str
    seeded: Seeded

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record:
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            row = await conn.fetchrow(sql, *args)
        finally:
            await conn.close()
        assert row is not None
        return row

    def sent(self) -> int:
        queue = self.broker.queues.get(RECONCILE_QUEUE)
        return 0 if queue is None else queue.qsize()


@asynccontextmanager
async def started(database_url: str, **overrides: Any) -> AsyncIterator[Console]:
    seeded = await seed(database_url)
    broker = StubBroker()
    app = create_app(console_settings(database_url, **overrides), broker=broker)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Console(client, broker, database_url, seeded)


@pytest.fixture
async def console(fresh_database_url: str) -> AsyncIterator[Console]:
    async with started(fresh_database_url) as running:
        yield running


async def logged_in(console: Console) -> str:
    """Log in; the session's CSRF token."""
    done = await log_in(console.client)
    assert done.status_code == 303
    page = await console.client.get("/console/failures")
    return csrf_of(page.text)


# --- off ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "says"),
    [(None, "PANDASYNC_ADMIN_TOKEN is not set"), ("short-token", "shorter than 16")],
)
async def test_without_a_usable_token_the_console_is_off_and_says_how_to_turn_it_on(
    fresh_database_url: str, token: str | None, says: str
) -> None:
    async with started(fresh_database_url, admin_token=token) as c:
        for method, path in [
            ("GET", "/console"),
            ("GET", "/console/"),
            ("GET", "/console/orders"),
            ("POST", "/console/login"),
            ("POST", "/console/failures/replay"),
        ]:
            answer = await c.client.request(method, path, data={"token": "short-token"})
            assert answer.status_code == 404, (method, path)
            assert "The console is off" in answer.text
            assert says in answer.text
            assert "PANDASYNC_ADMIN_TOKEN=" in answer.text  # how to turn it on
            assert "set-cookie" not in answer.headers
        assert c.sent() == 0


# --- sessions -------------------------------------------------------------------------------


async def test_a_page_without_a_session_redirects_to_the_login(console: Console) -> None:
    answer = await console.client.get("/console/orders?status=paid")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=%2Fconsole%2Forders%3Fstatus%3Dpaid"
    login = await console.client.get(answer.headers["location"])
    assert login.status_code == 200
    assert 'name="next" value="/console/orders?status=paid"' in login.text


async def test_a_post_without_a_session_is_401_and_changes_nothing(console: Console) -> None:
    answer = await console.client.post("/console/failures/replay", data={"csrf": "x"})
    assert answer.status_code == 401
    row = await console.fetchrow("SELECT replay_count FROM sync_failures")
    assert row["replay_count"] == 0
    assert console.sent() == 0


async def test_login_sets_a_strict_httponly_session_cookie_scoped_to_the_console(
    console: Console,
) -> None:
    answer = await log_in(console.client)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/"
    cookies = answer.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("pandasync_console="))
    flags = {part.strip().lower() for part in session.split(";")[1:]}
    assert "httponly" in flags
    assert "samesite=strict" in flags
    assert "path=/console" in flags
    assert "secure" not in flags  # plain http here
    assert ADMIN_TOKEN not in session
    overview = await console.client.get("/console/")
    assert overview.status_code == 200
    assert "Overview" in overview.text


async def test_over_https_the_session_cookie_is_secure(console: Console) -> None:
    # uvicorn takes the scheme from X-Forwarded-Proto of a trusted proxy (127.0.0.1).
    https = {"x-forwarded-proto": "https"}
    form = await console.client.get("/console/login", headers=https)
    login_cookie = form.headers["set-cookie"]
    assert "secure" in {part.strip().lower() for part in login_cookie.split(";")[1:]}
    # The client keeps a Secure cookie from going over http: hand it over as a browser would.
    console.client.cookies.clear()
    answer = await console.client.post(
        "/console/login",
        data={"csrf": csrf_of(form.text), "token": ADMIN_TOKEN},
        headers={**https, "cookie": login_cookie.split(";")[0]},
    )
    assert answer.status_code == 303
    session = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("pandasync_console=")
    )
    assert "secure" in {part.strip().lower() for part in session.split(";")[1:]}


async def test_a_wrong_token_is_refused(console: Console) -> None:
    answer = await log_in(console.client, token="not-the-token-at-all-0000")
    assert answer.status_code == 401
    assert "That is not the admin token" in answer.text
    assert not any(
        c.startswith("pandasync_console=") for c in answer.headers.get_list("set-cookie")
    )
    assert (await console.client.get("/console/")).status_code == 303


async def test_a_login_without_its_csrf_token_is_refused(console: Console) -> None:
    await console.client.get("/console/login")
    answer = await console.client.post("/console/login", data={"token": ADMIN_TOKEN})
    assert answer.status_code == 403
    assert (await console.client.get("/console/")).status_code == 303


async def test_a_forged_session_cookie_is_no_session(console: Console) -> None:
    await log_in(console.client)
    cookie = console.client.cookies.get("pandasync_console", path="/console")
    assert cookie
    console.client.cookies.clear()
    console.client.cookies.set("pandasync_console", cookie[:-2] + "xx", path="/console")
    assert (await console.client.get("/console/")).status_code == 303


async def test_logout_ends_the_session(console: Console) -> None:
    csrf = await logged_in(console)
    answer = await console.client.post("/console/logout", data={"csrf": csrf})
    assert answer.status_code == 303
    assert (await console.client.get("/console/")).status_code == 303


# --- CSRF -----------------------------------------------------------------------------------


async def test_a_post_without_the_csrf_token_is_403_and_changes_nothing(console: Console) -> None:
    await logged_in(console)
    failure = console.seeded.failure_id
    for data in ({}, {"csrf": "forged"}):
        for path in ("/console/failures/replay", f"/console/failures/{failure}/replay"):
            answer = await console.client.post(path, data=data)
            assert answer.status_code == 403, (path, data)
        answer = await console.client.post(
            f"/console/failures/{failure}/dismiss", data={**data, "reason": "gone"}
        )
        assert answer.status_code == 403
    row = await console.fetchrow(
        "SELECT replay_count, resolved_at FROM sync_failures WHERE id = $1", failure
    )
    assert row["replay_count"] == 0
    assert row["resolved_at"] is None
    assert console.sent() == 0


async def test_a_post_from_another_origin_is_403_even_with_the_token(console: Console) -> None:
    csrf = await logged_in(console)
    answer = await console.client.post(
        "/console/failures/replay",
        data={"csrf": csrf},
        headers={"origin": "https://evil.example"},
    )
    assert answer.status_code == 403
    assert console.sent() == 0


# --- what the pages show --------------------------------------------------------------------


async def test_a_hostile_raw_body_and_headers_are_shown_escaped(console: Console) -> None:
    await logged_in(console)
    page = await console.client.get(f"/console/messages/{console.seeded.hostile_inbox_id}")
    assert page.status_code == 200
    html = page.text
    assert "<script>" not in html
    assert "<img src=x" not in html
    assert "<svg onload" not in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;svg onload=alert(3)&gt;" in html
    assert ACCESS_KEY_HEADER not in html  # cut short
    assert ACCESS_KEY_HEADER[:4] + "…" in html
    assert SIGNATURE_HEADER not in html
    assert "default-src 'none'" in page.headers["content-security-policy"]
    listing = await console.client.get("/console/messages")
    assert "<img src=x" not in listing.text
    assert "TAOBAO_&lt;img src=x onerror=alert(2)&gt;" in listing.text
    assert HOSTILE_TYPE not in listing.text


async def test_the_overview_draws_charts_from_the_inbox(console: Console) -> None:
    await logged_in(console)
    page = await console.client.get("/console/?hours=3")
    assert page.status_code == 200
    assert page.text.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == 2
    assert "<rect " in page.text  # bars of received messages
    assert 'class="line-p50"' in page.text  # the lag: lines, or dots between empty minutes
    assert 'class="line-max"' in page.text
    # A message a minute over the last two hours, and the hostile one just now.
    assert f"{console.seeded.messages} messages in the last 3 h" in page.text
    assert "awaiting payment" in page.text


async def test_orders_search_and_the_order_timeline(console: Console) -> None:
    await logged_in(console)
    found = await console.client.get(f"/console/orders?q={ORDER_ID}")
    assert found.status_code == 303
    assert found.headers["location"] == f"/console/orders/taobao/{ORDER_ID}?account=acct-1"
    page = await console.client.get(found.headers["location"])
    assert page.status_code == 200
    assert "status pending_payment → paid (WAIT_BUYER_PAY → WAIT_SELLER_SEND_GOODS)" in page.text
    assert page.text.count('class="event-inbox_message"') == 8
    listing = await console.client.get("/console/orders?status=paid&platform=taobao")
    assert ORDER_ID in listing.text
    none = await console.client.get("/console/orders?status=cancelled")
    assert ORDER_ID not in none.text
    missing = await console.client.get("/console/orders?q=NOPE")
    assert "No order NOPE in the ledger" in missing.text


async def test_messages_filter_and_page_by_keyset(console: Console) -> None:
    await logged_in(console)
    link = 'href="/console/messages/'
    first = await console.client.get("/console/messages")
    assert first.status_code == 200
    assert first.text.count(link) == 50
    assert f'{link}{console.seeded.hostile_inbox_id}"' in first.text  # the newest
    seen = first.text.count(link)
    older = re.search(r'href="(/console/messages\?before=\d+)" id="older"', first.text)
    while older:
        page = await console.client.get(older.group(1))
        seen += page.text.count(link)
        older = re.search(r'href="(/console/messages\?before=\d+)" id="older"', page.text)
    assert seen == console.seeded.messages
    waiting = await console.client.get("/console/messages?state=received")
    assert waiting.text.count('class="state-received"') == 1
    unchecked = await console.client.get("/console/messages?signature=unchecked")
    assert unchecked.text.count(link) == 1
    valid = await console.client.get("/console/messages?signature=valid&state=received")
    assert valid.text.count(link) == 0
    assert "No message." in valid.text


@pytest.mark.parametrize(
    "path",
    [
        "/console/orders?status=bogus",
        "/console/orders?platform=ebay",
        "/console/orders?before=-3",
        "/console/messages?signature=forged",
        "/console/?hours=5",
    ],
)
async def test_bad_filters_are_400_naming_the_parameter(console: Console, path: str) -> None:
    await logged_in(console)
    answer = await console.client.get(path)
    assert answer.status_code == 400
    name = path.split("?")[1].split("=")[0]
    assert name in answer.text


# --- actions --------------------------------------------------------------------------------


async def test_replay_one_enqueues_a_replay_reconcile_and_marks_it(console: Console) -> None:
    csrf = await logged_in(console)
    failure = console.seeded.failure_id
    answer = await console.client.post(f"/console/failures/{failure}/replay", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/failures?replayed=1"
    assert console.sent() == 1
    message = console.broker.queues[RECONCILE_QUEUE].get_nowait()
    assert b'"replay"' in message
    assert FAILED_ORDER_ID.encode() in message
    row = await console.fetchrow(
        "SELECT replay_count, replayed_at FROM sync_failures WHERE id = $1", failure
    )
    assert row["replay_count"] == 1
    assert row["replayed_at"] is not None
    page = await console.client.get(answer.headers["location"])
    assert "Queued 1 failed order(s)" in page.text
    assert "replayed 1×" in page.text


async def test_replay_all_and_replay_of_a_closed_failure(console: Console) -> None:
    csrf = await logged_in(console)
    answer = await console.client.post("/console/failures/replay", data={"csrf": csrf})
    assert answer.headers["location"] == "/console/failures?replayed=1"
    assert console.sent() == 1
    gone = await console.client.post("/console/failures/999999/replay", data={"csrf": csrf})
    assert gone.status_code == 409
    assert console.sent() == 1


async def test_dismiss_needs_a_reason_and_closes_the_failure(console: Console) -> None:
    csrf = await logged_in(console)
    failure = console.seeded.failure_id
    path = f"/console/failures/{failure}/dismiss"
    empty = await console.client.post(path, data={"csrf": csrf, "reason": "   "})
    assert empty.status_code == 400
    assert "reason is empty" in empty.text
    row = await console.fetchrow("SELECT resolved_at FROM sync_failures WHERE id = $1", failure)
    assert row["resolved_at"] is None
    done = await console.client.post(
        path, data={"csrf": csrf, "reason": "order deleted upstream", "by": "ana"}
    )
    assert done.status_code == 303
    row = await console.fetchrow(
        "SELECT dismissed_by, dismissed_reason, resolved_at FROM sync_failures WHERE id = $1",
        failure,
    )
    assert (row["dismissed_by"], row["dismissed_reason"]) == ("ana", "order deleted upstream")
    assert row["resolved_at"] is not None
    again = await console.client.post(path, data={"csrf": csrf, "reason": "again"})
    assert again.status_code == 409
    page = await console.client.get("/console/failures")
    assert "No open failure." in page.text


async def test_the_webhook_path_is_untouched_by_the_console(console: Console) -> None:
    """No console cookie or header reaches the webhook route's answers."""
    await logged_in(console)
    answer = await console.client.post("/webhooks/pandapon", content=b"{}")
    assert "content-security-policy" not in answer.headers
    assert "set-cookie" not in answer.headers


async def test_a_database_failure_is_a_503_in_one_line(
    console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.console import queries

    async def broken(*args: object, **kwargs: object) -> None:
        raise OSError("connection refused")

    await logged_in(console)
    monkeypatch.setattr(queries, "overview", broken)
    answer = await console.client.get("/console/")
    assert answer.status_code == 503
    assert "The database did not answer (OSError)" in answer.text
    assert "Traceback" not in answer.text


# --- outbound webhooks ----------------------------------------------------------------------


async def test_the_webhooks_page_lists_endpoints_and_their_deliveries(console: Console) -> None:
    await logged_in(console)
    empty = await console.client.get("/console/deliveries")
    assert empty.status_code == 200
    assert 'id="no-endpoints"' in empty.text

    conn = await asyncpg.connect(asyncpg_dsn(console.database_url))
    try:
        endpoint = await conn.fetchval(
            "INSERT INTO outbound_endpoints (url, secret) VALUES ($1, 'whsec_x') RETURNING id",
            "https://erp.example/hooks?a=<b>",
        )
        change = await conn.fetchval(
            "INSERT INTO ledger_changes (account_id, platform, order_id, kind, payload) "
            "VALUES ('acct-1', 'taobao', $1, 'order.shipped', '{}') RETURNING id",
            ORDER_ID,
        )
        ok, failing = [
            await conn.fetchval(
                "INSERT INTO outbound_deliveries (endpoint_id, change_id, account_id, platform, "
                "order_id, state, attempts, last_status_code, last_error, delivered_at) "
                "VALUES ($1, $2, 'acct-1', 'taobao', $3, $4, $5, $6, $7, $8) RETURNING id",
                endpoint,
                change_id,
                ORDER_ID,
                state,
                attempts,
                code,
                error,
                delivered,
            )
            for change_id, state, attempts, code, error, delivered in (
                (change, "delivered", 1, 200, None, dt.datetime.now(dt.UTC)),
                (
                    await conn.fetchval(
                        "INSERT INTO ledger_changes (account_id, platform, order_id, kind, "
                        "payload) VALUES ('acct-1', 'taobao', $1, 'order.delivered', '{}') "
                        "RETURNING id",
                        ORDER_ID,
                    ),
                    "pending",
                    3,
                    500,
                    "HTTP 500 <script>",
                    None,
                ),
            )
        ]
    finally:
        await conn.close()

    page = await console.client.get("/console/deliveries")
    assert page.status_code == 200
    assert f'id="endpoint-{endpoint}" class="here"' in page.text
    assert "https://erp.example/hooks?a=&lt;b&gt;" in page.text  # escaped
    assert f'id="delivery-{ok}" class="delivery-delivered"' in page.text
    assert f'id="delivery-{failing}" class="delivery-pending"' in page.text
    assert "HTTP 500 &lt;script&gt;" in page.text

    failed_only = await console.client.get(f"/console/deliveries?endpoint={endpoint}&failed=1")
    assert f'id="delivery-{failing}"' in failed_only.text
    assert f'id="delivery-{ok}"' not in failed_only.text

    missing = await console.client.get(f"/console/deliveries?endpoint={endpoint + 1}")
    assert missing.status_code == 404
    bad = await console.client.get("/console/deliveries?failed=yes")
    assert bad.status_code == 400
    assert "failed" in bad.text
