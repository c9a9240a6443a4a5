"""The webhook endpoint over real HTTP (uvicorn on a socket) on a real database of its own.

One test per status code of the contract and per way verification can fail; each checks the
answer, the reason, and what did (or did not) reach webhook_inbox and webhook_nonces.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from starlette.applications import Starlette

from service.app import create_app
from service.config import ConfigError
from service.db import asyncpg_dsn
from service.pandapon.signer import Credentials, signed_headers
from tests.support.tcp_proxy import TcpProxy
from tests.support.webhook_checks import (
    count,
    eventually,
    fetch,
    postgres_address,
    sample,
    via_port,
)
from tests.support.webhook_requests import (
    ACCESS_SECRET,
    CREDENTIALS,
    JSON_TYPE,
    TOKEN,
    USER_ID,
    WEBHOOK,
    encode,
    receiver_settings,
    signed,
    taobao_status,
)
from tests.support.webhook_server import serving


@dataclass
class Running:
    app: Starlette
    client: httpx.AsyncClient
    database_url: str

    async def post(
        self, body: bytes, headers: dict[str, str] | None = None, path: str = WEBHOOK
    ) -> httpx.Response:
        return await self.client.post(
            path, content=body, headers=signed() if headers is None else headers
        )

    async def rows(self) -> list[asyncpg.Record]:
        return await fetch(self.database_url, "SELECT * FROM webhook_inbox ORDER BY id")

    async def nothing_stored(self) -> bool:
        inbox = await count(self.database_url, "webhook_inbox")
        nonces = await count(self.database_url, "webhook_nonces")
        return inbox == 0 and nonces == 0


@asynccontextmanager
async def started(database_url: str, **overrides: Any) -> AsyncIterator[Running]:
    app = create_app(receiver_settings(database_url, **overrides))
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Running(app, client, database_url)


@pytest.fixture
async def server(fresh_database_url: str) -> AsyncIterator[Running]:
    async with started(fresh_database_url) as running:
        yield running


def reason(response: httpx.Response) -> str:
    return str(response.json()["error"])


# --- 200: stored, duplicate, probe ---------------------------------------------------------


async def test_stored_message_is_answered_200_and_kept_byte_exact(server: Running) -> None:
    body = (
        b'{"messageType":"TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY" ,"messagePlatform":0,'
        b'"timestamp":"1715669977082","messageBody":{"salesOrderId":"3682557363260579405"}}'
    )
    headers = {**signed(), "x-request-id": "req-abc.123"}
    response = await server.post(body, headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc.123"
    [row] = await server.rows()
    assert row["raw_body"] == body
    assert (row["account_id"], row["platform"], row["kind"], row["order_id"]) == (
        USER_ID,
        "taobao",
        "price",
        "3682557363260579405",
    )
    assert row["message_type"] == "TAOBAO_ORDER_BUYER_VIEW_ORDER_PRICE_MODIFY"
    assert row["request_id"] == "req-abc.123"
    assert row["state"] in ("received", "queued")
    assert len(row["dedupe_key"]) == 64
    stored_headers = json.loads(row["headers"])
    assert "signature" not in stored_headers
    assert stored_headers["nonce-str"] == headers["nonce-str"]
    assert stored_headers["access-key"] == headers["access-key"]
    [nonce] = await fetch(server.database_url, "SELECT nonce FROM webhook_nonces")
    assert nonce["nonce"] == headers["nonce-str"]
    assert row["signature_state"] == "valid"


async def test_request_id_is_made_when_missing_or_unusable(server: Running) -> None:
    first = await server.post(encode(taobao_status()))
    second = await server.post(encode(taobao_status()), {**signed(), "x-request-id": "bad id!"})
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2
    assert "bad id!" not in ids
    assert {r["request_id"] for r in await server.rows()} == ids


async def test_redelivery_is_a_duplicate_answered_200(server: Running) -> None:
    envelope = taobao_status()
    assert (await server.post(encode(envelope))).status_code == 200
    before = sample("pandasync_webhook_duplicates_total", account="default")
    # PandaPon's retry: new nonce, timestamp and signature; the JSON re-serialized.
    again = json.dumps(dict(reversed(list(envelope.items()))), indent=1).encode()
    response = await server.post(again)
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'
    assert len(await server.rows()) == 1
    assert sample("pandasync_webhook_duplicates_total", account="default") == before + 1
    # Its nonce was recorded all the same: it cannot be replayed either.
    assert await count(server.database_url, "webhook_nonces") == 2


async def test_body_as_json_string_dedupes_with_the_object_form(server: Running) -> None:
    envelope = taobao_status()
    as_string = {**envelope, "messageBody": json.dumps(envelope["messageBody"])}
    assert (await server.post(encode(envelope))).status_code == 200
    assert (await server.post(encode(as_string))).status_code == 200
    assert len(await server.rows()) == 1


async def test_concurrent_deliveries_of_one_message_store_one_row(server: Running) -> None:
    body = encode(taobao_status())
    responses = await asyncio.gather(*(server.post(body) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert len(await server.rows()) == 1


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"", {}),
        (b"", JSON_TYPE),
        (b"  \n", JSON_TYPE),
        (b"{}", JSON_TYPE),
        (b'{"messageType": null, "hello": 1}', JSON_TYPE),
    ],
    ids=["empty-no-type", "empty-json", "whitespace", "empty-object", "no-message-type"],
)
async def test_probe_is_answered_200_and_stores_nothing(
    server: Running, body: bytes, headers: dict[str, str]
) -> None:
    before = sample("pandasync_webhook_probes_total")
    response = await server.post(body, headers)
    assert response.status_code == 200
    assert await server.nothing_stored()
    assert sample("pandasync_webhook_probes_total") == before + 1


async def test_unknown_type_is_stored_and_counted(server: Running) -> None:
    before = sample("pandasync_webhook_unknown_type_total", account="default")
    envelope = {"messageType": "TAOBAO_ORDER_SOMETHING_NEW", "messageBody": {"salesOrderId": "5"}}
    assert (await server.post(encode(envelope))).status_code == 200
    [row] = await server.rows()
    assert (row["kind"], row["platform"], row["order_id"]) == ("status", "taobao", "5")
    assert sample("pandasync_webhook_unknown_type_total", account="default") == before + 1


async def test_message_without_order_id_is_stored_as_ignored(server: Running) -> None:
    envelope = {"messageType": "ACCOUNT_NOTICE", "messagePlatform": 1, "messageBody": {"x": 1}}
    assert (await server.post(encode(envelope))).status_code == 200
    [row] = await server.rows()
    assert (row["kind"], row["order_id"], row["state"]) == ("other", None, "ignored")


async def test_stored_message_is_handed_to_the_workers(server: Running) -> None:
    envelope = {
        "messageType": "1688_ORDER_BUYER_VIEW_ORDER_BUYER_REFUND",
        "messagePlatform": 1,
        "messageBody": {"baseInfo": {"idOfStr": "20012233"}, "refundId": "TQ1"},
    }
    response = await server.post(encode(envelope))
    assert response.status_code == 200

    async def queued() -> bool:
        return [r["state"] for r in await server.rows()] == ["queued"]

    await eventually(queued, "the row is marked queued")
    broker = server.app.state.pandasync.broker
    assert isinstance(broker, StubBroker)
    [encoded] = list(broker.queues["reconcile"].queue)
    message = Message.decode(encoded)
    [row] = await server.rows()
    assert message.actor_name == "reconcile"
    assert message.args == (USER_ID, "1688", "20012233")
    assert message.kwargs["source"] == "webhook"
    assert message.kwargs["inbox_id"] == row["id"]
    assert message.kwargs["request_id"] == response.headers["x-request-id"]
    assert row["refund_id"] == "TQ1"


# --- account id -----------------------------------------------------------------------------


async def test_account_is_the_user_id_header_when_the_setting_is_unset(
    fresh_database_url: str,
) -> None:
    async with started(fresh_database_url, user_id=None) as running:
        other = Credentials(CREDENTIALS.access_key, ACCESS_SECRET, "sub-account-7")
        headers = {**signed_headers(other), **JSON_TYPE}
        assert (await running.post(encode(taobao_status()), headers)).status_code == 200
        no_user = signed()
        del no_user["user-id"]
        assert (await running.post(encode(taobao_status()), no_user)).status_code == 200
        assert [r["account_id"] for r in await running.rows()] == ["sub-account-7", "default"]


# --- 401: one test per way to fail verification --------------------------------------------


async def assert_refused(server: Running, response: httpx.Response, why: str) -> None:
    assert response.status_code == 401
    assert reason(response) == why
    assert await server.nothing_stored()


@pytest.mark.parametrize("name", ["access-key", "timestamp", "nonce-str", "signature"])
async def test_missing_header_is_401(server: Running, name: str) -> None:
    headers = signed()
    del headers[name]
    await assert_refused(
        server, await server.post(encode(taobao_status()), headers), "missing_header"
    )


async def test_wrong_access_key_is_401(server: Running) -> None:
    other = Credentials("ak-not-ours", ACCESS_SECRET, USER_ID)
    headers = {**signed_headers(other), **JSON_TYPE}
    response = await server.post(encode(taobao_status()), headers)
    await assert_refused(server, response, "wrong_access_key")


async def test_stale_timestamp_is_401(server: Running) -> None:
    headers = signed(now=time.time() - 601)
    await assert_refused(
        server, await server.post(encode(taobao_status()), headers), "stale_timestamp"
    )


async def test_future_timestamp_is_401(server: Running) -> None:
    headers = signed(now=time.time() + 601)
    response = await server.post(encode(taobao_status()), headers)
    await assert_refused(server, response, "future_timestamp")


async def test_wrong_signature_is_401(server: Running) -> None:
    headers = {**signed(), "signature": "B7F83FE2ADC8D8F044F2E01F0FFE8C80"}
    await assert_refused(
        server, await server.post(encode(taobao_status()), headers), "bad_signature"
    )


async def test_replayed_nonce_is_401_and_stores_nothing_more(server: Running) -> None:
    headers = signed()
    assert (await server.post(encode(taobao_status()), headers)).status_code == 200
    before = sample("pandasync_webhook_rejected_total", reason="replayed_nonce")
    # The same signed headers on another body (the signature does not cover the body) ...
    replay = await server.post(encode(taobao_status()), headers)
    assert replay.status_code == 401
    assert reason(replay) == "replayed_nonce"
    # ... or on the very same request.
    assert (await server.post(encode(taobao_status()), headers)).status_code == 401
    assert len(await server.rows()) == 1
    assert await count(server.database_url, "webhook_nonces") == 1
    assert sample("pandasync_webhook_rejected_total", reason="replayed_nonce") == before + 2


async def test_concurrent_replays_of_one_nonce_store_one_row(server: Running) -> None:
    headers = signed()
    responses = await asyncio.gather(
        *(server.post(encode(taobao_status()), headers) for _ in range(20))
    )
    assert sorted(r.status_code for r in responses) == [200] + [401] * 19
    assert len(await server.rows()) == 1


async def test_wrong_token_is_401(fresh_database_url: str) -> None:
    async with started(
        fresh_database_url, webhook_auth="signature+token", webhook_token=TOKEN
    ) as running:
        response = await running.post(encode(taobao_status()), path=f"{WEBHOOK}/{TOKEN}x")
        await assert_refused(running, response, "wrong_token")
        response = await running.post(encode(taobao_status()))
        await assert_refused(running, response, "missing_token")
        assert (
            await running.post(encode(taobao_status()), path=f"{WEBHOOK}/{TOKEN}")
        ).status_code == 200


async def test_token_mode_accepts_unsigned_requests_on_the_token_path(
    fresh_database_url: str,
) -> None:
    async with started(
        fresh_database_url,
        webhook_auth="token",
        webhook_token=TOKEN,
        access_key=None,
        access_secret=None,
    ) as running:
        ok = await running.post(encode(taobao_status()), JSON_TYPE, path=f"{WEBHOOK}/{TOKEN}")
        assert ok.status_code == 200
        refused = await running.post(encode(taobao_status()), JSON_TYPE, path=f"{WEBHOOK}/nope")
        assert (refused.status_code, reason(refused)) == (401, "wrong_token")
        assert len(await running.rows()) == 1
        assert await count(fresh_database_url, "webhook_nonces") == 0


# --- auto (the default): the token URL authenticates; signatures recorded, never refused ---


@pytest.fixture
async def auto(fresh_database_url: str) -> AsyncIterator[Running]:
    async with started(fresh_database_url, webhook_auth="auto", webhook_token=TOKEN) as running:
        yield running


async def stored_signature_state(running: Running, response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    [row] = await running.rows()
    return str(row["signature_state"])


async def test_auto_unsigned_callback_on_the_token_url_is_stored_as_absent(auto: Running) -> None:
    response = await auto.post(encode(taobao_status()), JSON_TYPE, path=f"{WEBHOOK}/{TOKEN}")
    assert await stored_signature_state(auto, response) == "absent"
    assert await count(auto.database_url, "webhook_nonces") == 0


async def test_auto_wrong_secret_on_the_token_url_is_stored_as_mismatch(auto: Running) -> None:
    other = Credentials(CREDENTIALS.access_key, "some-other-secret-entirely", USER_ID)
    headers = signed(credentials=other)
    response = await auto.post(encode(taobao_status()), headers, path=f"{WEBHOOK}/{TOKEN}")
    assert await stored_signature_state(auto, response) == "mismatch"


async def test_auto_stale_signature_on_the_token_url_is_stored_as_stale(auto: Running) -> None:
    headers = signed(now=time.time() - 3600)
    response = await auto.post(encode(taobao_status()), headers, path=f"{WEBHOOK}/{TOKEN}")
    assert await stored_signature_state(auto, response) == "stale"


async def test_auto_valid_signature_on_the_token_url_is_stored_as_valid_and_may_repeat(
    auto: Running,
) -> None:
    # The token authenticates, so the nonce is not claimed: a redelivery with the same headers
    # is a duplicate (200), not a replay (401).
    headers = signed()
    body = encode(taobao_status())
    response = await auto.post(body, headers, path=f"{WEBHOOK}/{TOKEN}")
    assert await stored_signature_state(auto, response) == "valid"
    again = await auto.post(body, headers, path=f"{WEBHOOK}/{TOKEN}")
    assert again.status_code == 200
    assert len(await auto.rows()) == 1


async def test_auto_unsigned_callback_without_the_token_is_401(auto: Running) -> None:
    response = await auto.post(encode(taobao_status()), JSON_TYPE)
    await assert_refused(auto, response, "missing_header")


async def test_auto_signed_callback_without_the_token_is_stored_as_valid(auto: Running) -> None:
    response = await auto.post(encode(taobao_status()))
    assert await stored_signature_state(auto, response) == "valid"
    assert await count(auto.database_url, "webhook_nonces") == 1


async def test_auto_wrong_token_is_401_even_when_signed(auto: Running) -> None:
    response = await auto.post(encode(taobao_status()), path=f"{WEBHOOK}/{TOKEN}x")
    await assert_refused(auto, response, "wrong_token")


async def test_auto_counts_each_signature_state(auto: Running) -> None:
    path = f"{WEBHOOK}/{TOKEN}"
    await auto.post(encode(taobao_status()), JSON_TYPE, path=path)
    await auto.post(encode(taobao_status()), signed(now=time.time() - 3600), path=path)
    text = (await auto.client.get("/metrics")).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        # Other tests of this process count other accounts: this one's is `default`.
        if line.startswith('pandasync_webhook_signature_total{account="default",')
    }
    # The registry is the process's: compare with what this test sent, not with zero.
    assert values['pandasync_webhook_signature_total{account="default",state="absent"}'] >= 1
    assert values['pandasync_webhook_signature_total{account="default",state="stale"}'] >= 1
    assert set(values) == {
        f'pandasync_webhook_signature_total{{account="default",state="{state}"}}'
        for state in ("valid", "absent", "stale", "mismatch")
    }


def test_signature_mode_without_credentials_fails_app_startup() -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_ACCESS_KEY and PANDASYNC_ACCESS_SECRET"):
        create_app(receiver_settings("postgresql+asyncpg://u@h/db", access_secret=None))


# --- 400, 413, 415 --------------------------------------------------------------------------


async def test_malformed_json_is_400_with_a_reason(server: Running) -> None:
    response = await server.post(b'{"messageType": "ORDER_CREATE",')
    assert (response.status_code, reason(response)) == (400, "malformed_json")
    assert await server.nothing_stored()


async def test_malformed_envelope_is_400_with_a_reason(server: Running) -> None:
    envelope = {**taobao_status(), "messagePlatform": 7}
    response = await server.post(encode(envelope))
    assert (response.status_code, reason(response)) == (400, "malformed_envelope")
    assert await server.nothing_stored()


async def test_json_that_is_not_an_object_is_400(server: Running) -> None:
    response = await server.post(b'["messageType"]')
    assert (response.status_code, reason(response)) == (400, "malformed_envelope")


async def test_unverified_envelope_errors_are_401_not_400(server: Running) -> None:
    headers = {**signed(), "signature": "0" * 32}
    response = await server.post(encode({**taobao_status(), "messagePlatform": 7}), headers)
    assert (response.status_code, reason(response)) == (401, "bad_signature")


async def raw_exchange(base_url: str, head: bytes, body_part: bytes) -> bytes:
    """Send a request head and part of a body, never the rest; return the status line.

    The server can only answer if it decides without waiting for the body's end.
    """
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body_part)
        await writer.drain()
        async with asyncio.timeout(20):  # a bound on a hang, not a timing assertion
            return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


def request_head(extra: str) -> bytes:
    fields = "".join(f"{name}: {value}\r\n" for name, value in signed().items())
    return f"POST {WEBHOOK} HTTP/1.1\r\nhost: test\r\n{fields}{extra}\r\n".encode()


async def test_declared_body_over_the_limit_is_413_before_the_body(
    fresh_database_url: str,
) -> None:
    async with started(fresh_database_url, max_body_bytes=1024) as running:
        base_url = str(running.client.base_url)
        status = await raw_exchange(base_url, request_head("content-length: 4096\r\n"), b"{")
        assert status.startswith(b"HTTP/1.1 413")
        response = await running.post(encode(taobao_status(padding="x" * 2000)))
        assert (response.status_code, reason(response)) == (413, "payload_too_large")
        assert await running.nothing_stored()


async def test_streamed_body_over_the_limit_is_413_without_reading_the_rest(
    fresh_database_url: str,
) -> None:
    async with started(fresh_database_url, max_body_bytes=4096) as running:
        base_url = str(running.client.base_url)
        # Chunked, no length declared: 5 KiB sent, and the body never ends.
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
        status = await raw_exchange(
            base_url, request_head("transfer-encoding: chunked\r\n"), chunk * 5
        )
        assert status.startswith(b"HTTP/1.1 413")
        assert await running.nothing_stored()


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/evil+json",
        "application/vnd.pandapon+json",
        "text/json",
        "application/jsonp",
        "application/json; charset=utf-16",
        "application/json; charset=iso-8859-1",
    ],
)
async def test_body_that_is_not_json_is_415(server: Running, content_type: str | None) -> None:
    headers = {k: v for k, v in signed().items() if k != "content-type"}
    if content_type:
        headers["content-type"] = content_type
    response = await server.post(encode(taobao_status()), headers)
    assert (response.status_code, reason(response)) == (415, "unsupported_media_type")
    assert await server.nothing_stored()


async def test_json_in_any_case_with_parameters_is_accepted(server: Running) -> None:
    accepted = (
        "application/json; charset=utf-8",
        "Application/JSON",
        'application/json;charset="UTF-8"',
        "application/json; charset=utf8; version=1",
    )
    for content_type in accepted:
        response = await server.post(
            encode(taobao_status()), {**signed(), "content-type": content_type}
        )
        assert response.status_code == 200, content_type
    assert len(await server.rows()) == len(accepted)


async def test_body_that_is_not_utf8_is_400(server: Running) -> None:
    for body in (
        json.dumps(taobao_status()).encode("utf-16"),
        json.dumps(taobao_status()).encode("utf-16-le"),
        json.dumps(taobao_status()).encode("utf-32"),
    ):
        response = await server.post(body)
        assert (response.status_code, reason(response)) == (400, "malformed_json")
    assert await server.nothing_stored()


@pytest.mark.parametrize("timestamp", ["²³", "፩", "-1", "1715669977082.5", "9" * 40])
async def test_invalid_envelope_timestamp_is_400_not_503(server: Running, timestamp: str) -> None:
    response = await server.post(encode(taobao_status(timestamp=timestamp)))
    assert (response.status_code, reason(response)) == (400, "malformed_envelope")
    assert await server.nothing_stored()


async def test_body_not_sent_within_the_body_timeout_is_408(fresh_database_url: str) -> None:
    async with started(fresh_database_url, body_timeout_s=0.5) as running:
        body = encode(taobao_status())
        head = request_head(f"content-length: {len(body)}\r\n")
        host, port = str(running.client.base_url).removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head + body[:10])  # and the rest never comes
            await writer.drain()
            async with asyncio.timeout(5):  # a bound on a hang; the limit is 0.5 s
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert answer.endswith(b'{"error": "body_timeout"}')
        assert await running.nothing_stored()


# --- what is kept of the headers ------------------------------------------------------------


async def test_only_the_headers_we_read_are_stored_each_cut_short(server: Running) -> None:
    headers = {
        **signed(),
        "x-request-id": "req-1",
        "user-agent": "PandaPon/1.0 " + "u" * 2000,
        "x-padding": "p" * 4000,
        "cookie": "session=secret",
        "authorization": "Bearer secret",
        "x-forwarded-for": "203.0.113.7",
    }
    assert (await server.post(encode(taobao_status()), headers)).status_code == 200
    [row] = await server.rows()
    stored = json.loads(row["headers"])
    assert set(stored) == {
        "access-key",
        "timestamp",
        "nonce-str",
        "user-id",
        "content-type",
        "content-length",
        "user-agent",
        "x-request-id",
        "x-forwarded-for",
    }
    assert stored["user-agent"].startswith("PandaPon/1.0 u")
    assert all(len(value) <= 256 for value in stored.values())


# --- paths ----------------------------------------------------------------------------------


async def test_trailing_slash_is_refused_without_a_redirect_or_the_token(auto: Running) -> None:
    for path in (f"{WEBHOOK}/{TOKEN}/", f"{WEBHOOK}/", f"{WEBHOOK}/{TOKEN}//"):
        response = await auto.post(encode(taobao_status()), JSON_TYPE, path=path)
        assert response.status_code == 404, path
        assert "location" not in response.headers
        assert TOKEN not in response.text
        assert all(TOKEN not in value for value in response.headers.values())
    assert await auto.nothing_stored()


# --- 503 ------------------------------------------------------------------------------------


async def test_database_slower_than_the_bound_is_503_and_a_retry_is_stored(
    server: Running,
) -> None:
    envelope = taobao_status()
    blocker = await asyncpg.connect(asyncpg_dsn(server.database_url))
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE webhook_inbox IN ACCESS EXCLUSIVE MODE")
        response = await server.post(encode(envelope))
        assert (response.status_code, reason(response)) == (503, "store_timeout")
        await transaction.rollback()
    finally:
        await blocker.close()
    retry = await server.post(encode(envelope))
    assert retry.status_code == 200
    assert len(await server.rows()) == 1


async def test_database_down_is_503_and_up_again_is_200(fresh_database_url: str) -> None:
    with TcpProxy(postgres_address(fresh_database_url)) as proxy:
        url = via_port(fresh_database_url, proxy.port)
        async with started(url) as running:
            assert (await running.post(encode(taobao_status()))).status_code == 200
            proxy.cut()
            down = await running.post(encode(taobao_status()))
            assert down.status_code == 503
            assert reason(down) in ("store_failed", "store_timeout")
            proxy.restore()
            up = await running.post(encode(taobao_status()))
            assert up.status_code == 200
    assert await count(fresh_database_url, "webhook_inbox") == 2


# --- health, readiness, metrics -------------------------------------------------------------


async def test_healthz_and_readyz(server: Running) -> None:
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    ready = await server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "broker": "ok"}}


async def test_readyz_is_503_when_the_database_is_down(fresh_database_url: str) -> None:
    with TcpProxy(postgres_address(fresh_database_url)) as proxy:
        async with started(via_port(fresh_database_url, proxy.port)) as running:
            proxy.cut()
            ready = await running.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"].startswith("unavailable")


async def test_readyz_checks_the_redis_broker(fresh_database_url: str, clean_redis: str) -> None:
    async with started(fresh_database_url, broker_url=clean_redis) as running:
        assert (await running.client.get("/readyz")).json()["checks"]["broker"] == "ok"


async def test_metrics_expose_the_receiver_series(server: Running) -> None:
    await server.post(encode(taobao_status()))
    await server.post(b"{", signed())
    text = (await server.client.get("/metrics")).text
    for series in (
        "pandasync_webhook_received_total",
        'pandasync_webhook_accepted_total{account="default",kind="status"}',
        'pandasync_webhook_duplicates_total{account="default"}',
        'pandasync_webhook_rejected_total{reason="malformed_json"}',
        "pandasync_webhook_store_seconds_bucket",
        "pandasync_relay_backlog",
    ):
        assert series in text, series
