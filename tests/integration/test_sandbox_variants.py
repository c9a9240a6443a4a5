"""The sandbox plays the PandaPon the contract does not rule out, over real sockets: another
timestamp unit, endpoints at other routes, Taobao payloads in [TG]'s snake_case, and callbacks
signed another way or not at all. Each variant is a setting and a runtime control call."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from service.config import ConfigError
from service.ledger.models import Platform
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.endpoints import ENDPOINT_NAMES
from service.pandapon.errors import AuthError, UpstreamClientError, UpstreamRejected
from service.pandapon.signer import (
    SIGNED_HEADERS,
    Credentials,
    signature_matches,
    signed_headers,
    timestamp_to_seconds,
)
from service.sandbox.app import create_sandbox_app
from service.sandbox.remote import SandboxControlError
from service.sandbox.settings import DeliverySettings, load_sandbox_settings
from tests.support.servers import (
    Received,
    RecordingReceiver,
    SandboxServer,
    sandbox_test_settings,
    serve_in_thread,
)

pytest_plugins = ["tests.support.sandbox"]

TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
CHINA = timezone(timedelta(hours=8))
AUTH_HEADERS = {*SIGNED_HEADERS, "authorization"}
DEFAULT_VARIANT = {"timestamp_unit": None, "endpoints": {}, "payload_case": "camel"}
TB_DETAIL_PATH = "/open/order/detail/get"
MOVED_PATH = "/open/order/get"
# [TG] (docs/upstream.md#evidence): the order and sub-order fields of the snake_case Taobao detail
SNAKE_ORDER_FIELDS = {
    "purchase_id",
    "status",
    "purchase_amount",
    "product_amount",
    "pay_amount",
    "domestic_post_fee",
    "purchase_currency",
    "pay_time",
    "created_time",
    "modify_time",
    "sub_purchase_orders",
}
SNAKE_SUB_ORDER_FIELDS = {
    "sub_purchase_order_id",
    "purchase_order_outer_id",
    "purchase_order_line_outer_id",
    "status",
    "quantity",
    "title",
    "item_id",
    "sku_id",
    "purchase_amount",
    "pay_amount",
    "product_amount",
    "refund_id",
    "refund_status",
    "logistic_orders",
}


@asynccontextmanager
async def upstream(server: SandboxServer, **overrides: Any) -> AsyncIterator[PandaPonClient]:
    settings = server.service_settings(**overrides)
    async with make_http_client(settings) as http:
        yield PandaPonClient(settings, http)


def fen(yuan: str) -> int:
    return int(Decimal(yuan) * 100)


def epoch_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def china(moment: datetime) -> str:
    return moment.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")


def signed(server: SandboxServer) -> dict[str, str]:
    settings = server.settings
    credentials = Credentials(
        settings.access_key, settings.access_secret.get_secret_value(), settings.user_id
    )
    return signed_headers(credentials, unit=settings.timestamp_unit)


async def control_get(server: SandboxServer, path: str) -> Any:
    """A control-API answer as it is on the wire (the index, the whole of /calls)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"{server.url}/_sandbox{path}")
    response.raise_for_status()
    return response.json()


def assert_gateway_error(response: httpx.Response, status: int, error: str, path: str) -> None:
    """The bare body of a Java gateway: no envelope, so no ``code`` to read as business."""
    body = response.json()
    assert response.status_code == status
    assert set(body) == {"timestamp", "status", "error", "path"}
    assert (body["status"], body["error"], body["path"]) == (status, error, path)
    datetime.fromisoformat(body["timestamp"])


# --- timestamp unit -------------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox_settings", [{"upstream": {"timestamp_unit": "s"}}], indirect=True)
async def test_a_sandbox_wanting_seconds_refuses_milliseconds(
    sandbox_server: SandboxServer,
) -> None:
    order_id = (await sandbox_server.remote.create_order(TB))["order_id"]
    async with upstream(sandbox_server, timestamp_unit="ms") as client:
        with pytest.raises(AuthError) as caught:
            await client.order_detail(TB, order_id)
    assert (caught.value.http_status, caught.value.code) == (401, 401)
    assert "timestamp" in (caught.value.msg or "")
    async with upstream(sandbox_server, timestamp_unit="s") as client:
        assert (await client.order_detail(TB, order_id)).order_id == order_id
    outcomes = (await sandbox_server.remote.outcomes())["taobao_order_detail"]
    assert outcomes == {"auth_rejected": 1, "ok": 1}


async def test_the_timestamp_unit_switches_at_runtime(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    order_id = (await remote.create_order(AL))["order_id"]
    assert (await remote.set_upstream(timestamp_unit="s"))["timestamp_unit"] == "s"
    index = await control_get(sandbox_server, "")
    assert (index["timestamp_unit"], index["upstream"]["timestamp_unit"]) == ("s", "s")
    async with upstream(sandbox_server, timestamp_unit="ms") as client:
        with pytest.raises(AuthError):
            await client.order_detail(AL, order_id)
    async with upstream(sandbox_server, timestamp_unit="s") as client:
        await client.order_detail(AL, order_id)
    await remote.set_upstream(timestamp_unit="ms")
    async with upstream(sandbox_server, timestamp_unit="s") as client:
        with pytest.raises(AuthError):
            await client.order_detail(AL, order_id)
    await remote.set_upstream(timestamp_unit=None)  # back to PANDASYNC_TIMESTAMP_UNIT (ms)
    async with upstream(sandbox_server, timestamp_unit="ms") as client:
        await client.order_detail(AL, order_id)


# --- routes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sandbox_settings",
    [{"upstream": {"endpoints": {"taobao_order_detail": {"path": MOVED_PATH}}}}],
    indirect=True,
)
async def test_a_moved_endpoint_answers_only_at_its_new_path(
    sandbox_server: SandboxServer,
) -> None:
    remote = sandbox_server.remote
    order_id = (await remote.create_order(TB))["order_id"]
    async with upstream(sandbox_server) as client:
        with pytest.raises(UpstreamClientError) as caught:
            await client.order_detail(TB, order_id)
    assert (caught.value.http_status, caught.value.code) == (404, None)

    moved = {"taobao_order_detail": {"path": MOVED_PATH}}
    async with upstream(sandbox_server, endpoint_overrides=moved) as client:
        assert (await client.order_detail(TB, order_id)).order_id == order_id
        # a business "not found" on the served route stays HTTP 200 with envelope code 404
        with pytest.raises(UpstreamRejected) as rejected:
            await client.order_detail(TB, "1234567890123456789")
    assert (rejected.value.http_status, rejected.value.code) == (200, 404)

    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(
            sandbox_server.url + TB_DETAIL_PATH,
            params={"orderId": order_id},
            headers=signed(sandbox_server),
        )
    assert_gateway_error(response, 404, "Not Found", TB_DETAIL_PATH)

    calls = await control_get(sandbox_server, "/calls")
    assert set(calls["calls"]) == set(ENDPOINT_NAMES)
    assert calls["outcomes"]["unrouted"] == {"not_found": 2}
    assert calls["outcomes"]["taobao_order_detail"] == {"ok": 1, "not_found": 1}
    index = await control_get(sandbox_server, "")
    (served,) = [e for e in index["endpoints"] if e["name"] == "taobao_order_detail"]
    assert (served["method"], served["path"]) == ("GET", MOVED_PATH)
    assert index["upstream"]["endpoints"] == {
        "taobao_order_detail": {"path": MOVED_PATH, "method": None}
    }


async def test_a_moved_method_answers_405_to_the_old_one(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    order_id = (await remote.create_order(AL))["order_id"]
    await remote.set_upstream(endpoints={"alibaba_order_detail": {"method": "get"}})
    async with upstream(sandbox_server) as client:
        with pytest.raises(UpstreamClientError) as caught:
            await client.order_detail(AL, order_id)
    assert caught.value.http_status == 405
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(
            sandbox_server.url + "/alibaba/order/detail",
            json={"webSite": "1688", "orderId": order_id},
            headers=signed(sandbox_server),
        )
    assert_gateway_error(response, 405, "Method Not Allowed", "/alibaba/order/detail")
    assert response.headers["allow"] == "GET"

    moved = {"alibaba_order_detail": {"method": "GET"}}
    async with upstream(sandbox_server, endpoint_overrides=moved) as client:
        assert (await client.order_detail(AL, order_id)).order_id == order_id
    outcomes = await remote.outcomes()
    assert outcomes["unrouted"] == {"method_not_allowed": 2}
    assert outcomes["alibaba_order_detail"] == {"ok": 1}

    await remote.set_upstream(endpoints=None)  # every endpoint back where the table has it
    async with upstream(sandbox_server) as client:
        assert (await client.order_detail(AL, order_id)).order_id == order_id


async def test_unrouted_paths_and_the_control_api(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    assert "unrouted" not in await remote.outcomes()  # the usual shape until a request misses
    async with httpx.AsyncClient(base_url=sandbox_server.url, trust_env=False) as http:
        assert_gateway_error(await http.get("/open/nothing"), 404, "Not Found", "/open/nothing")
        # a GET endpoint asked with POST
        response = await http.post("/open/order/page", json={})
        assert_gateway_error(response, 405, "Method Not Allowed", "/open/order/page")
        # the control API keeps its own answers
        missing = await http.get("/_sandbox/nothing")
        assert missing.status_code == 404
        assert "error" in missing.json()
        assert (await http.put("/_sandbox/health")).status_code == 405
        assert (await http.get("/_sandbox/health")).json()["status"] == "ok"
    assert await remote.outcomes() == {
        **{name: {} for name in ENDPOINT_NAMES},
        "unrouted": {"not_found": 1, "method_not_allowed": 1},
    }
    await remote.reset_calls()
    assert "unrouted" not in await remote.outcomes()


async def test_moves_are_merged_and_removed(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    await remote.set_upstream(endpoints={"taobao_logistics": {"path": "/tb/logistics"}})
    await remote.set_upstream(endpoints={"taobao_logistics": {"method": "POST"}})
    variant = await remote.set_upstream(endpoints={"alibaba_logistics": {"path": "/al/trace"}})
    assert variant["endpoints"] == {
        "taobao_logistics": {"path": "/tb/logistics", "method": "POST"},
        "alibaba_logistics": {"path": "/al/trace", "method": None},
    }
    variant = await remote.set_upstream(endpoints={"taobao_logistics": None})
    assert variant["endpoints"] == {"alibaba_logistics": {"path": "/al/trace", "method": None}}
    assert await remote.upstream() == variant


# --- snake_case payloads --------------------------------------------------------------------------


async def test_snake_payloads_have_the_evidence_field_names(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    truth = await remote.create_order(
        TB,
        [
            {"title": "加厚保温杯", "quantity": 3, "unit_price": "12.34"},
            {"title": "纯棉T恤", "quantity": 1, "unit_price": "50"},
        ],
        shipping_fee="8.00",
    )
    order_id = truth["order_id"]
    first, second = (line["line_id"] for line in truth["lines"])
    assert (await remote.set_upstream(payload_case="snake"))["payload_case"] == "snake"

    async with upstream(sandbox_server) as client:
        pending = (await client.fetch("taobao_order_detail", {"order_id": order_id})).data
        assert pending["status"] == "WAIT_BUYER_P"
        assert pending["pay_amount"] is None
        assert pending["pay_time"] is None

        await remote.pay(TB, order_id)
        tracking = await remote.ship(TB, order_id, line_ids=[first])
        await remote.deliver(TB, order_id)
        refund = await remote.open_refund(TB, order_id, "20.00", line_id=second, reason="不要了")
        truth = await remote.order(TB, order_id)

        detail = (await client.fetch("taobao_order_detail", {"order_id": order_id})).data
        logistics = (await client.fetch("taobao_logistics", {"sub_order_id": first})).data
        refund_data = (
            await client.fetch("taobao_refund_detail", {"refund_id": refund["refund_id"]})
        ).data
        now = datetime.now(UTC)
        page = (
            await client.fetch(
                "taobao_order_list",
                {
                    "page_no": 1,
                    "page_size": 10,
                    "modified_start": china(now - timedelta(hours=1)),
                    "modified_end": china(now + timedelta(hours=1)),
                },
            )
        ).data
        alibaba_id = (await remote.create_order(AL))["order_id"]
        alibaba = (await client.fetch("alibaba_order_detail", {"order_id": alibaba_id})).data

    assert set(detail) == SNAKE_ORDER_FIELDS
    assert detail["purchase_id"] == order_id
    assert detail["status"] == "WAIT_BUYER_CONFIRM_GOODS"
    assert detail["purchase_amount"] == fen(truth["total_amount"]) == 9502
    assert detail["product_amount"] == fen(truth["product_amount"]) == 8702
    assert detail["pay_amount"] == 9502
    assert detail["domestic_post_fee"] == 800
    assert detail["purchase_currency"] == "CNY"
    assert detail["pay_time"] == epoch_ms(truth["paid_at"])
    assert detail["created_time"] == epoch_ms(truth["created_at"])
    assert detail["modify_time"] == epoch_ms(truth["modified_at"])
    shipped, refunded = detail["sub_purchase_orders"]
    assert set(shipped) == SNAKE_SUB_ORDER_FIELDS
    assert (shipped["sub_purchase_order_id"], shipped["purchase_order_outer_id"]) == (
        first,
        order_id,
    )
    assert (shipped["quantity"], shipped["title"], shipped["product_amount"]) == (
        3,
        "加厚保温杯",
        3702,
    )
    assert (shipped["refund_id"], shipped["refund_status"]) == (None, 0)
    (parcel_line,) = shipped["logistic_orders"]
    assert parcel_line["logistic_number"] == tracking
    assert parcel_line["rts_time"] == epoch_ms(truth["shipments"][0]["shipped_at"])
    assert (refunded["refund_id"], refunded["refund_status"]) == (refund["refund_id"], 10)
    assert refunded["logistic_orders"] == []

    aggregate = refund_data["refund_order_aggregate"]
    assert aggregate["refund_order"] == {
        "refund_id": refund["refund_id"],
        "refund_fee": 2000,
        "refund_status": 10,
        "refund_type": 1,
        "reason_desc": "不要了",
    }
    assert aggregate["purchase_order_line"] == {
        "sales_order_id": order_id,
        "purchase_order_id": order_id,
        "purchase_order_line_id": second,
        "total_price": 5000,
    }

    assert logistics["purchaseOrderOuterId"] == order_id
    (parcel,) = logistics["pnmLogisticsDetails"]
    assert parcel["mailNo"] == tracking
    assert (parcel["logistics_status"], parcel["goods_number"]) == ("SIGNED", 3)
    assert parcel["logistics_partner"][0]["company"] == truth["shipments"][0]["carrier"]
    assert parcel["logistics_desc"]
    events = truth["shipments"][0]["events"]
    assert [t["standerdDesc"] for t in parcel["logisticsTraces"]] == [
        e["description"] for e in events
    ]

    assert set(page) == {"total", "pageNo", "pageSize", "records"}
    assert [r["purchase_id"] for r in page["records"]] == [order_id]
    assert page["records"][0] == detail
    assert "baseInfo" in alibaba  # 1688 keeps its one shape

    await remote.reset()
    order_id = (await remote.create_order(TB))["order_id"]
    async with upstream(sandbox_server) as client:
        camel = (await client.fetch("taobao_order_detail", {"order_id": order_id})).data
    assert (camel["salesOrderId"], camel["status"]) == (order_id, "WAIT_BUYER_PAY")


async def test_a_snake_parcel_on_its_way_is_delivering(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    await remote.set_upstream(payload_case="snake")
    truth = await remote.create_order(TB)
    order_id, line_id = truth["order_id"], truth["lines"][0]["line_id"]
    await remote.pay(TB, order_id)
    await remote.ship(TB, order_id)
    refund = await remote.open_refund(TB, order_id, "1.00")
    await remote.resolve_refund(TB, refund["refund_id"], "rejected")
    async with upstream(sandbox_server) as client:
        logistics = (await client.fetch("taobao_logistics", {"sub_order_id": line_id})).data
        detail = (await client.fetch("taobao_order_detail", {"order_id": order_id})).data
        record = await client.fetch("taobao_refund_detail", {"refund_id": refund["refund_id"]})
    assert logistics["pnmLogisticsDetails"][0]["logistics_status"] == "DELIVERING"
    assert detail["sub_purchase_orders"][0]["refund_status"] == -10
    assert record.data["refund_order_aggregate"]["refund_order"]["refund_status"] == -10


# --- validation and reset -------------------------------------------------------------------------


async def test_bad_upstream_patches_are_refused_with_a_reason(
    sandbox_server: SandboxServer,
) -> None:
    remote = sandbox_server.remote
    cases: list[tuple[dict[str, Any], str]] = [
        ({"timestamp_unit": "minutes"}, "timestamp_unit"),
        ({"payload_case": "kebab"}, "payload_case"),
        ({"endpoints": {"taobao_orders": {"path": "/x"}}}, "unknown endpoint"),
        ({"endpoints": {"taobao_order_detail": {"path": "x"}}}, "must start with '/'"),
        ({"endpoints": {"taobao_order_detail": {"path": "/_sandbox/x"}}}, "control API"),
        ({"endpoints": {"taobao_order_detail": {"method": "PUT"}}}, "method"),
        ({"endpoints": {"taobao_order_detail": {"verb": "GET"}}}, "verb"),
        ({"endpoints": {"taobao_order_detail": {"path": "/open/order/page"}}}, "both be served"),
        ({"colour": "red"}, "colour"),
    ]
    for patch, reason in cases:
        with pytest.raises(SandboxControlError) as caught:
            await remote.set_upstream(**patch)
        assert caught.value.status == 400, patch
        assert reason in caught.value.reason, (patch, caught.value.reason)
    async with httpx.AsyncClient(base_url=sandbox_server.url, trust_env=False) as http:
        not_json = await http.patch("/_sandbox/upstream", content=b"{")
        not_object = await http.patch("/_sandbox/upstream", json=[1])
    assert (not_json.status_code, not_json.json()["error"]) == (400, "the body is not JSON")
    assert not_object.status_code == 400
    assert "JSON object" in not_object.json()["error"]
    assert await remote.upstream() == DEFAULT_VARIANT  # nothing changed on a refusal

    for changes, reason in [
        ({"signing": "rsa"}, "signing"),
        ({"timestamp_unit": "us"}, "timestamp_unit"),
        ({"timestamp_skew_s": "soon"}, "timestamp_skew_s"),
    ]:
        with pytest.raises(SandboxControlError) as caught:
            await remote.configure_delivery(**changes)
        assert caught.value.status == 400
        assert reason in caught.value.reason


@pytest.mark.parametrize(
    "sandbox_settings",
    [{"upstream": {"payload_case": "snake", "timestamp_unit": "ms"}}],
    indirect=True,
)
async def test_reset_restores_the_upstream_of_the_settings(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    started = {"timestamp_unit": "ms", "endpoints": {}, "payload_case": "snake"}
    assert await remote.upstream() == started
    await remote.set_upstream(
        timestamp_unit="s",
        payload_case="camel",
        endpoints={"taobao_order_detail": {"path": MOVED_PATH, "method": "POST"}},
    )
    assert (await remote.upstream())["endpoints"]["taobao_order_detail"]["method"] == "POST"
    await remote.reset()
    assert await remote.upstream() == started
    order_id = (await remote.create_order(TB))["order_id"]
    async with upstream(sandbox_server) as client:
        data = (await client.fetch("taobao_order_detail", {"order_id": order_id})).data
    assert data["purchase_id"] == order_id


def test_variants_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_SANDBOX_UPSTREAM__TIMESTAMP_UNIT", "s")
    monkeypatch.setenv(
        "PANDASYNC_SANDBOX_UPSTREAM__ENDPOINTS", json.dumps({"taobao_logistics": {"path": "/x"}})
    )
    monkeypatch.setenv("PANDASYNC_SANDBOX_DELIVERY__SIGNING", "hmac_sha256")
    monkeypatch.setenv("PANDASYNC_SANDBOX_DELIVERY__TIMESTAMP_SKEW_S", "-3600")
    settings = load_sandbox_settings()
    assert settings.upstream.timestamp_unit == "s"
    assert settings.upstream.endpoints["taobao_logistics"].path == "/x"
    assert (settings.delivery.signing, settings.delivery.timestamp_skew_s) == ("hmac_sha256", -3600)
    monkeypatch.setenv("PANDASYNC_SANDBOX_UPSTREAM", '{"payload_case": "snake"}')
    monkeypatch.delenv("PANDASYNC_SANDBOX_UPSTREAM__TIMESTAMP_UNIT")
    monkeypatch.delenv("PANDASYNC_SANDBOX_UPSTREAM__ENDPOINTS")
    assert load_sandbox_settings().upstream.payload_case == "snake"
    monkeypatch.setenv("PANDASYNC_SANDBOX_UPSTREAM", '{"endpoints": {"nope": {}}}')
    with pytest.raises(ConfigError, match="PANDASYNC_SANDBOX_UPSTREAM__ENDPOINTS: unknown"):
        load_sandbox_settings()


def test_a_move_onto_a_taken_route_stops_the_start() -> None:
    settings = sandbox_test_settings(
        upstream={"endpoints": {"alibaba_refund_detail": {"path": "/alibaba/order/detail"}}}
    )
    with pytest.raises(ConfigError, match="alibaba_order_detail and alibaba_refund_detail"):
        create_sandbox_app(settings)


# --- callback signing -----------------------------------------------------------------------------


@pytest.fixture
def hook() -> Iterator[tuple[RecordingReceiver, str]]:
    receiver = RecordingReceiver()
    with serve_in_thread(receiver.app()) as base:
        yield receiver, f"{base}/webhooks/pandapon"


async def one_callback(
    server: SandboxServer, hook: tuple[RecordingReceiver, str], **delivery: Any
) -> Received:
    """Configure delivery, make one change, and return the one callback that arrived."""
    receiver, url = hook
    await server.remote.configure_delivery(webhook_url=url, **delivery)
    await server.remote.create_order(TB)
    assert (await server.remote.drain())["drained"] is True
    (received,) = receiver.snapshot()
    assert received.headers["content-type"] == "application/json"
    assert json.loads(received.body)["messageType"].startswith("TAOBAO_")
    return received


def auth_headers(received: Received) -> set[str]:
    return set(received.headers) & AUTH_HEADERS


def secret_of(server: SandboxServer) -> str:
    return server.settings.access_secret.get_secret_value()


async def test_md5_signing_sends_the_five_headers(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    received = await one_callback(sandbox_server, hook, signing="md5")
    headers = received.headers
    assert auth_headers(received) == set(SIGNED_HEADERS)
    assert headers["access-key"] == sandbox_server.settings.access_key
    assert headers["user-id"] == sandbox_server.settings.user_id
    assert signature_matches(
        secret_of(sandbox_server),
        headers["access-key"],
        headers["timestamp"],
        headers["nonce-str"],
        headers["signature"],
    )
    assert abs(timestamp_to_seconds(headers["timestamp"], "ms") - time.time()) < 60


@pytest.mark.parametrize(
    "sandbox_settings",
    [{"delivery": DeliverySettings(signing="none", retry_interval_s=0.05)}],
    indirect=True,
)
async def test_unsigned_callbacks_carry_none_of_the_headers(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    assert (await sandbox_server.remote.configure_delivery())["signing"] == "none"
    received = await one_callback(sandbox_server, hook)
    assert auth_headers(received) == set()


async def test_callbacks_signed_with_another_secret_do_not_verify(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    received = await one_callback(sandbox_server, hook, signing="other_secret")
    headers = received.headers
    assert auth_headers(received) == set(SIGNED_HEADERS)
    assert headers["access-key"] == sandbox_server.settings.access_key
    assert len(headers["signature"]) == 32
    assert headers["signature"].isupper()
    assert not signature_matches(
        secret_of(sandbox_server),
        headers["access-key"],
        headers["timestamp"],
        headers["nonce-str"],
        headers["signature"],
    )


async def test_hmac_sha256_callbacks_sign_the_body_in_authorization(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    received = await one_callback(sandbox_server, hook, signing="hmac_sha256")
    assert auth_headers(received) == {"authorization", "timestamp"}
    key = sandbox_server.settings.access_key.encode()
    digest = hmac.new(secret_of(sandbox_server).encode(), key + received.body, hashlib.sha256)
    assert received.headers["authorization"] == base64.b64encode(digest.digest()).decode()
    assert abs(timestamp_to_seconds(received.headers["timestamp"], "ms") - time.time()) < 60


async def test_a_stale_callback_timestamp_in_seconds(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    received = await one_callback(sandbox_server, hook, timestamp_unit="s", timestamp_skew_s=-3600)
    stamp = received.headers["timestamp"]
    assert len(stamp) == 10
    assert abs(timestamp_to_seconds(stamp, "s") - (time.time() - 3600)) < 60
    headers = received.headers
    secret = secret_of(sandbox_server)
    nonce, signature = headers["nonce-str"], headers["signature"]
    assert signature_matches(secret, headers["access-key"], stamp, nonce, signature)  # only stale


async def test_callbacks_follow_the_upstream_unit_unless_told(
    sandbox_server: SandboxServer, hook: tuple[RecordingReceiver, str]
) -> None:
    await sandbox_server.remote.set_upstream(timestamp_unit="s")
    received = await one_callback(sandbox_server, hook)
    assert len(received.headers["timestamp"]) == 10
    receiver, _ = hook
    receiver.received.clear()
    received = await one_callback(sandbox_server, hook, timestamp_unit="ms")
    assert len(received.headers["timestamp"]) == 13


# --- poisoned upstream ----------------------------------------------------------------------------


@pytest.mark.parametrize("platform", [TB, AL])
async def test_the_sandbox_poisons_order_details_as_asked(
    sandbox_server: SandboxServer, platform: Platform
) -> None:
    order_id = (await sandbox_server.remote.create_order(platform))["order_id"]
    async with upstream(sandbox_server) as client:
        await sandbox_server.remote.set_faults({"*": {"far_future": 1.0}})
        modified = (await client.order_detail(platform, order_id)).modified_at
        assert modified is not None
        assert modified.year == 9999
        await sandbox_server.remote.set_faults({"*": {"negative_amount": 1.0}})
        total = (await client.order_detail(platform, order_id)).total_amount
        assert total is not None
        assert total < 0
        await sandbox_server.remote.clear_faults()
        sane = await client.order_detail(platform, order_id)
    assert sane.modified_at is not None
    assert sane.modified_at.year == datetime.now(UTC).year
    assert sane.total_amount is not None
    assert sane.total_amount > 0


async def test_the_sandbox_sends_poisoned_errors_as_asked(sandbox_server: SandboxServer) -> None:
    order_id = (await sandbox_server.remote.create_order(TB))["order_id"]
    detail = sandbox_server.url + TB_DETAIL_PATH
    async with httpx.AsyncClient(trust_env=False) as http:
        await sandbox_server.remote.set_faults({"*": {"huge_retry_after": 1.0}})
        limited = await http.get(detail, params={"purchaseOrderId": order_id})
        await sandbox_server.remote.set_faults({"*": {"unstorable_error": 1.0}})
        failed = await http.get(detail, params={"purchaseOrderId": order_id})
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "86400")
    assert failed.status_code == 503
    assert "\x00" in failed.json()["msg"]
    assert len(failed.json()["requestId"]) == 300
