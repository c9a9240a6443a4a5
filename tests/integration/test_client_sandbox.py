"""The real client against the sandbox over real sockets: all 8 endpoints, faults and auth."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.errors import (
    AuthError,
    UpstreamClientError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from service.pandapon.models import OrderSnapshot
from service.pandapon.ratelimit import LocalTokenBucket
from service.pandapon.signer import Credentials, signed_headers
from tests.support.servers import SandboxServer

pytest_plugins = ["tests.support.sandbox"]

TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688


@asynccontextmanager
async def upstream(
    server: SandboxServer, limiter: LocalTokenBucket | None = None, **overrides: Any
) -> AsyncIterator[PandaPonClient]:
    settings = server.service_settings(**overrides)
    async with make_http_client(settings) as http:
        yield PandaPonClient(settings, http, limiter=limiter)


def at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def money(value: str | None) -> Decimal | None:
    return Decimal(value) if value is not None else None


def assert_matches_truth(order: OrderSnapshot, truth: dict[str, Any]) -> None:
    """The snapshot says what the sandbox's neutral truth says (as far as the platform shows)."""
    assert order.order_id == truth["order_id"]
    assert order.status == truth["status"]
    assert order.total_amount == money(truth["total_amount"])
    assert order.product_amount == money(truth["product_amount"])
    assert order.shipping_fee == money(truth["shipping_fee"])
    assert order.discount_amount == money(truth["discount_amount"])
    assert order.created_at == at(truth["created_at"])
    assert order.modified_at == at(truth["modified_at"])
    assert order.paid_at == at(truth["paid_at"])
    assert [line.line_id for line in order.lines] == [x["line_id"] for x in truth["lines"]]
    for line, expected in zip(order.lines, truth["lines"], strict=True):
        assert line.amount == money(expected["amount"])
        assert line.quantity == expected["quantity"]
        assert line.title == expected["title"]


def window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(hours=1)


# --- the 8 endpoints ------------------------------------------------------------------------------


async def test_taobao_endpoints_against_the_truth(sandbox_server: SandboxServer) -> None:
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
    await remote.change_price(TB, order_id, total_amount="90.00")
    await remote.pay(TB, order_id)
    tracking = await remote.ship(TB, order_id, line_ids=[first])
    await remote.add_event(TB, order_id, tracking, "【广州市】 快件已到达", status="TRANSPORT")
    await remote.deliver(TB, order_id)
    refund = await remote.open_refund(TB, order_id, "20.00", line_id=second, reason="不要了")
    truth = await remote.order(TB, order_id)

    async with upstream(sandbox_server) as client:
        order = await client.order_detail(TB, order_id)
        shipments = await client.logistics(TB, order)
        refund_snapshot = await client.refund_detail(TB, refund["refund_id"])
        page = await client.order_page(TB, 1, 20, *window())

    assert_matches_truth(order, truth)
    assert order.status is OrderStatus.SHIPPED
    assert order.total_amount == Decimal("90.00")
    assert order.lines[0].tracking_number == tracking
    assert order.lines[1].has_tracking is False
    (shipment,) = shipments
    assert (shipment.tracking_number, shipment.line_id, shipment.delivered) == (
        tracking,
        first,
        True,
    )
    parcel = truth["shipments"][0]
    assert [(e.event_at, e.status, e.description) for e in shipment.events] == [
        (at(e["at"]), e["status"], e["description"]) for e in parcel["events"]
    ]
    assert refund_snapshot.status is RefundStatus.REQUESTED
    assert refund_snapshot.amount == Decimal("20.00")
    assert (refund_snapshot.order_id, refund_snapshot.line_id) == (order_id, second)
    assert [o.order_id for o in page.orders] == [order_id]
    # line 2 has no logistics number, so it was not asked about
    calls = await remote.calls()
    assert calls["taobao_order_detail"] == 1
    assert calls["taobao_logistics"] == 1
    assert calls["taobao_refund_detail"] == 1
    assert calls["taobao_order_list"] == 1
    assert sum(v for k, v in calls.items() if k.startswith("alibaba")) == 0


async def test_1688_endpoints_against_the_truth(sandbox_server: SandboxServer) -> None:
    remote = sandbox_server.remote
    truth = await remote.create_order(
        AL, [{"title": "收纳箱 大号", "quantity": 2, "unit_price": "45.50"}], shipping_fee="12"
    )
    order_id = truth["order_id"]
    line_id = truth["lines"][0]["line_id"]
    await remote.change_price(AL, order_id, total_amount="100.00")
    await remote.pay(AL, order_id)
    tracking = await remote.ship(
        AL, order_id, tracking_number="YT9000000000001", carrier="圆通速递"
    )
    await remote.deliver(AL, order_id)
    await remote.confirm(AL, order_id)
    refund = await remote.open_refund(AL, order_id, "10.50", line_id=line_id)
    await remote.resolve_refund(AL, refund["refund_id"], "refunded")
    truth = await remote.order(AL, order_id)

    async with upstream(sandbox_server) as client:
        order = await client.order_detail(AL, order_id)
        shipments = await client.logistics(AL, order)
        refund_snapshot = await client.refund_detail(AL, refund["refund_id"])
        page = await client.order_page(AL, 1, 20, *window())

    assert_matches_truth(order, truth)
    assert order.status is OrderStatus.COMPLETED
    assert order.discount_amount == Decimal("3.00")  # 91.00 + 12.00 - 100.00
    assert order.shipped_at == at(truth["shipped_at"])
    assert order.completed_at == at(truth["completed_at"])
    assert order.lines[0].unit_price == Decimal("45.50")
    assert order.refund_ids == (refund["refund_id"],)
    (shipment,) = shipments
    assert (shipment.tracking_number, shipment.carrier, shipment.delivered) == (
        tracking,
        "圆通速递",
        True,
    )
    assert refund_snapshot.refund_id.startswith("TQ")
    assert refund_snapshot.status is RefundStatus.REFUNDED
    assert refund_snapshot.amount == Decimal("10.50")
    assert refund_snapshot.resolved_at == at(truth["refunds"][0]["resolved_at"])
    assert [o.order_id for o in page.orders] == [order_id]
    calls = await remote.calls()
    assert {k: v for k, v in calls.items() if k.startswith("alibaba")} == {
        "alibaba_order_detail": 1,
        "alibaba_logistics": 1,
        "alibaba_refund_detail": 1,
        "alibaba_order_list": 1,
        "alibaba_refund_list": 0,
    }


async def test_order_pages_cover_the_window_once(sandbox_server: SandboxServer) -> None:
    created = {(await sandbox_server.remote.create_order(TB))["order_id"] for _ in range(5)}
    await sandbox_server.remote.create_order(AL)  # the other platform is not listed
    seen: list[str] = []
    async with upstream(sandbox_server) as client:
        for page_no in (1, 2, 3):
            page = await client.order_page(TB, page_no, 2, *window())
            assert (page.total, page.page_no, page.page_size) == (5, page_no, 2)
            seen.extend(o.order_id for o in page.orders)
        empty = await client.order_page(TB, 1, 2, *[t - timedelta(days=2) for t in window()])
    assert sorted(seen) == sorted(created)
    assert empty.total == 0
    assert empty.orders == ()


async def test_an_unknown_order_is_a_permanent_rejection(sandbox_server: SandboxServer) -> None:
    async with upstream(sandbox_server) as client:
        with pytest.raises(UpstreamRejected) as caught:
            await client.order_detail(AL, "1234567890123456789")
    assert caught.value.code == 404
    assert caught.value.request_id
    assert (await sandbox_server.remote.outcomes())["alibaba_order_detail"] == {"not_found": 1}


async def test_a_seeded_scenario_is_served_consistently(sandbox_server: SandboxServer) -> None:
    result = await sandbox_server.remote.scenario(orders=12, steps=5, seed=3)
    truths = {(o["platform"], o["order_id"]): o for o in await sandbox_server.remote.orders()}
    assert len(truths) == 12
    async with upstream(sandbox_server) as client:
        for item in result["created"]:
            platform = Platform(item["platform"])
            order = await client.order_detail(platform, item["order_id"])
            assert_matches_truth(order, truths[(platform.value, item["order_id"])])


# --- faults ---------------------------------------------------------------------------------------


async def test_server_errors_for_one_endpoint_only(sandbox_server: SandboxServer) -> None:
    order_id = (await sandbox_server.remote.create_order(TB))["order_id"]
    await sandbox_server.remote.set_faults({"taobao_order_detail": {"server_error": 1.0}})
    async with upstream(sandbox_server) as client:
        with pytest.raises(UpstreamServerError) as caught:
            await client.order_detail(TB, order_id)
        assert caught.value.http_status == 503
        assert caught.value.code == 503
        await client.order_page(TB, 1, 10, *window())  # other endpoints are unaffected
        await sandbox_server.remote.clear_faults()
        assert (await client.order_detail(TB, order_id)).order_id == order_id
    outcomes = await sandbox_server.remote.outcomes()
    assert outcomes["taobao_order_detail"] == {"server_error": 1, "ok": 1}


async def test_429_reports_retry_after_without_pausing_other_calls(
    sandbox_server: SandboxServer,
) -> None:
    await sandbox_server.remote.set_faults({"*": {"rate_limit": 1.0, "retry_after_s": 3}})
    limiter = LocalTokenBucket(1000.0)
    async with upstream(sandbox_server, limiter) as client:
        with pytest.raises(UpstreamRateLimited) as caught:
            await client.refund_detail(AL, "TQ1")
    assert caught.value.retry_after == 3.0
    assert caught.value.http_status == 429
    # One limited call delays its own order only; the fleet pauses when several orders are
    # limited at once (tests/unit/test_client_ratelimit.py).
    assert limiter.try_take() == 0.0


@pytest.mark.timeout(20)
async def test_a_hanging_upstream_is_cut_off_by_the_read_timeout(
    sandbox_server: SandboxServer,
) -> None:
    await sandbox_server.remote.set_faults(
        {"alibaba_logistics": {"timeout": 1.0, "timeout_s": 60.0}}
    )
    order = OrderSnapshot(platform=AL, order_id="1", status=OrderStatus.SHIPPED, raw_status="x")
    async with upstream(sandbox_server, http_read_timeout_s=0.3) as client:
        with pytest.raises(UpstreamTimeout) as caught:
            await client.logistics(AL, order)
    assert caught.value.endpoint == "alibaba_logistics"
    assert (await sandbox_server.remote.outcomes())["alibaba_logistics"] == {"timeout": 1}


async def test_added_latency_still_answers(sandbox_server: SandboxServer) -> None:
    order_id = (await sandbox_server.remote.create_order(AL))["order_id"]
    await sandbox_server.remote.set_faults({"*": {"latency_s": 0.05}})
    async with upstream(sandbox_server) as client:
        assert (await client.order_detail(AL, order_id)).status is OrderStatus.PENDING_PAYMENT
    assert (await sandbox_server.remote.outcomes())["alibaba_order_detail"] == {"ok": 1}


@pytest.mark.parametrize(
    "sandbox_settings",
    [{"faults": {"*": {"server_error": 0.5, "server_error_status": 502}}}],
    indirect=True,
)
async def test_faults_set_at_start_hit_a_seeded_share(sandbox_server: SandboxServer) -> None:
    order_id = (await sandbox_server.remote.create_order(TB))["order_id"]
    errors: list[UpstreamServerError] = []
    async with upstream(sandbox_server) as client:
        for _ in range(40):
            try:
                await client.order_detail(TB, order_id)
            except UpstreamServerError as error:
                errors.append(error)
    outcomes = (await sandbox_server.remote.outcomes())["taobao_order_detail"]
    assert outcomes == {"server_error": len(errors), "ok": 40 - len(errors)}
    assert 0 < len(errors) < 40
    assert {e.http_status for e in errors} == {502}


# --- auth -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "status", "reason"),
    [
        ({"access_secret": "not-the-secret"}, 401, "signature mismatch"),
        ({"access_key": "someone-else"}, 401, "invalid access-key"),
        ({"timestamp_unit": "s"}, 401, "timestamp outside the allowed window"),
        ({"user_id": "another-user"}, 403, "user-id has no permission"),
    ],
)
async def test_wrong_credentials_are_an_auth_error(
    sandbox_server: SandboxServer, overrides: dict[str, str], status: int, reason: str
) -> None:
    async with upstream(sandbox_server, **overrides) as client:
        with pytest.raises(AuthError) as caught:
            await client.order_detail(TB, "1")
    assert (caught.value.http_status, caught.value.code, caught.value.msg) == (
        status,
        status,
        reason,
    )
    assert (await sandbox_server.remote.outcomes())["taobao_order_detail"] == {"auth_rejected": 1}


async def test_a_replayed_nonce_is_refused(sandbox_server: SandboxServer) -> None:
    settings = sandbox_server.settings
    credentials = Credentials(
        settings.access_key, settings.access_secret.get_secret_value(), settings.user_id
    )
    headers = signed_headers(credentials, nonce=uuid.uuid4().hex)
    url = f"{sandbox_server.url}/v2/taobao/order/refund/query"
    async with httpx.AsyncClient() as http:
        first = await http.get(url, params={"refundId": "1"}, headers=headers)
        again = await http.get(url, params={"refundId": "1"}, headers=headers)
    assert first.json()["code"] == 404  # authenticated: the refund just does not exist
    assert again.status_code == 401
    assert again.json()["msg"] == "nonce already used"


@pytest.mark.parametrize(
    "sandbox_settings",
    [
        {
            "endpoint_overrides": {
                "taobao_order_detail": {"path": "/open/v3/order", "order_id": "tid"}
            }
        }
    ],
    indirect=True,
)
async def test_endpoint_overrides_apply_to_client_and_sandbox_alike(
    sandbox_server: SandboxServer,
) -> None:
    order_id = (await sandbox_server.remote.create_order(TB))["order_id"]
    async with upstream(sandbox_server) as client:
        assert (await client.order_detail(TB, order_id)).order_id == order_id
    async with upstream(sandbox_server, endpoint_overrides={}) as client:
        with pytest.raises(UpstreamClientError) as caught:
            await client.order_detail(TB, order_id)
    assert caught.value.http_status == 404
