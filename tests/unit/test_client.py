"""The client against ``httpx.MockTransport``: what goes on the wire, and every failure typed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import REGISTRY

from service.config import ConfigError, Settings, load_settings
from service.ledger.models import OrderStatus, Platform
from service.pandapon.client import PandaPonClient, make_http_client, parse_retry_after, unwrap
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    PandaPonError,
    PermanentError,
    TransientError,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from service.pandapon.models import LineSnapshot, OrderSnapshot
from service.pandapon.ratelimit import LocalTokenBucket
from service.pandapon.signer import signature_matches

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SECRET = "sk-never-logged-0001"
BASE = "https://pandapon.test"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688

Handler = Callable[[httpx.Request], httpx.Response]


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def ok(data: Any, request_id: str = "req-1") -> httpx.Response:
    body = {"requestId": request_id, "code": 200, "developId": 1014533973088404335, "msg": "成功"}
    return httpx.Response(200, json={**body, "data": data})


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_base_url": BASE,
        "access_key": "ak-test",
        "access_secret": SECRET,
        "user_id": "user-7",
        "broker_url": None,
        "endpoint_overrides": {},
        "timestamp_unit": "ms",
    }
    return load_settings(**{**values, **overrides})


@asynccontextmanager
async def client_for(
    handler: Handler, *, limiter: LocalTokenBucket | None = None, **overrides: Any
) -> AsyncIterator[PandaPonClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        yield PandaPonClient(settings(**overrides), http, limiter=limiter)


class Recorder:
    """A MockTransport handler that records requests and answers with ``respond``."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


def assert_signed(request: httpx.Request) -> None:
    h = request.headers
    assert h["access-key"] == "ak-test"
    assert h["user-id"] == "user-7"
    assert len(h["nonce-str"]) == 32
    assert len(h["timestamp"]) == 13
    assert signature_matches(
        SECRET, h["access-key"], h["timestamp"], h["nonce-str"], h["signature"]
    )


# --- the 8 endpoints on the wire ------------------------------------------------------------------


async def test_taobao_order_detail_is_a_signed_get() -> None:
    recorder = Recorder(lambda r: ok(fixture("taobao/order_detail__paid.json")))
    async with client_for(recorder) as client:
        order = await client.order_detail(TB, "3682557363260579405")
    (request,) = recorder.requests
    assert request.method == "GET"
    assert request.url.path == "/open/order/detail/get"
    assert dict(request.url.params) == {"orderId": "3682557363260579405"}
    assert_signed(request)
    assert order.status is OrderStatus.PAID
    assert order.total_amount == Decimal("105.00")


async def test_1688_order_detail_is_a_signed_json_post() -> None:
    recorder = Recorder(lambda r: ok(fixture("1688/order_detail__waitsellersend.json")))
    async with client_for(recorder) as client:
        order = await client.order_detail(AL, "3350228510000112233")
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("POST", "/alibaba/order/detail")
    assert json.loads(request.content) == {"webSite": "1688", "orderId": "3350228510000112233"}
    assert request.headers["content-type"] == "application/json"
    assert_signed(request)
    assert order.total_amount == Decimal("105.5")


@pytest.mark.parametrize(
    ("platform", "fixture_name", "method", "path", "sent"),
    [
        (
            TB,
            "taobao/refund_detail__success.json",
            "GET",
            "/v2/taobao/order/refund/query",
            {"refundId": "R1"},
        ),
        (AL, "1688/refund_detail__refundsuccess.json", "POST", "/alibaba/refund/info", None),
    ],
)
async def test_refund_detail(
    platform: Platform, fixture_name: str, method: str, path: str, sent: dict[str, str] | None
) -> None:
    recorder = Recorder(lambda r: ok(fixture(fixture_name)))
    async with client_for(recorder) as client:
        refund = await client.refund_detail(platform, "R1")
    (request,) = recorder.requests
    assert (request.method, request.url.path) == (method, path)
    if sent is None:
        assert json.loads(request.content) == {"refundId": "R1"}
    else:
        assert dict(request.url.params) == sent
    assert refund.platform is platform
    assert_signed(request)


async def test_order_page_sends_china_times_and_numbers() -> None:
    recorder = Recorder(
        lambda r: ok(
            fixture(
                "taobao/order_page__first.json"
                if r.method == "GET"
                else "1688/order_page__first.json"
            )
        )
    )
    start = datetime(2026, 11, 20, 0, 0, 0, tzinfo=UTC)
    end = datetime(2026, 11, 21, 0, 0, 0, tzinfo=UTC)
    async with client_for(recorder) as client:
        taobao = await client.order_page(TB, 1, 2, start, end)
        alibaba = await client.order_page(AL, 3, 50, start, end)
    get, post = recorder.requests
    assert get.url.path == "/open/order/page"
    assert dict(get.url.params) == {
        "pageNo": "1",
        "pageSize": "2",
        "modifyStartTime": "2026-11-20 08:00:00",
        "modifyEndTime": "2026-11-21 08:00:00",
    }
    assert post.url.path == "/v2/alibaba/order/page"
    assert json.loads(post.content) == {
        "pageNo": 3,
        "pageSize": 50,
        "modifyStartTime": "2026-11-20 08:00:00",
        "modifyEndTime": "2026-11-21 08:00:00",
    }
    assert (taobao.total, len(taobao.orders)) == (3, 2)
    assert alibaba.orders[0].status is OrderStatus.CANCELLED


async def test_order_page_refuses_naive_times_and_page_zero() -> None:
    async with client_for(Recorder(lambda r: ok({}))) as client:
        with pytest.raises(ValueError, match="aware"):
            await client.order_page(TB, 1, 10, datetime(2026, 1, 1), datetime.now(UTC))
        with pytest.raises(ValueError, match="start at 1"):
            await client.order_page(TB, 0, 10, datetime.now(UTC), datetime.now(UTC))


def _line(line_id: str, tracking: str | None, has_tracking: bool | None) -> LineSnapshot:
    return LineSnapshot(
        line_id=line_id,
        logistics_ref=f"sub-{line_id}",
        tracking_number=tracking,
        has_tracking=has_tracking,
    )


def _parcel(mail_no: str, *traces: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "mailNo": mail_no,
        "logisticsTraces": [
            {"time": at, "status": status, "standerdDesc": text} for at, status, text in traces
        ],
    }


async def test_taobao_logistics_asks_per_sub_order_and_skips_lines_without_a_number() -> None:
    shared_a = _parcel("P-SHARED", ("2026-11-19 10:00:00", "ACCEPT", "揽收"))
    shared_b = _parcel(
        "P-SHARED",
        ("2026-11-19 10:00:00", "ACCEPT", "揽收"),
        ("2026-11-20 10:00:00", "SIGN", "已签收"),
    )
    answers = {
        "sub-L1": {"pnmLogisticsDetails": [shared_a]},
        "sub-L2": {"pnmLogisticsDetails": [shared_b, _parcel("P-OWN")]},
        "sub-L4": {"pnmLogisticsDetails": []},
    }
    recorder = Recorder(lambda r: ok(answers[r.url.params["subPurchaseOrderId"]]))
    order = OrderSnapshot(
        platform=TB,
        order_id="O1",
        status=OrderStatus.SHIPPED,
        raw_status="WAIT_BUYER_CONFIRM_GOODS",
        lines=(
            _line("L1", "P-SHARED", True),
            _line("L2", "P-SHARED", True),
            _line("L3", None, False),  # the detail says: no logistics number yet
            _line("L4", None, None),  # the detail does not say: ask
        ),
    )
    async with client_for(recorder) as client:
        shipments = await client.logistics(TB, order)
    assert [r.url.params["subPurchaseOrderId"] for r in recorder.requests] == [
        "sub-L1",
        "sub-L2",
        "sub-L4",
    ]
    shared, own = shipments
    assert shared.tracking_number == "P-SHARED"
    assert shared.line_id is None  # one parcel for two lines
    assert shared.delivered is True
    assert [e.status for e in shared.events] == ["ACCEPT", "SIGN"]
    assert (own.tracking_number, own.line_id) == ("P-OWN", "L2")


async def test_1688_logistics_is_one_call_per_order() -> None:
    recorder = Recorder(lambda r: ok(fixture("1688/logistics__trace.json")))
    order = OrderSnapshot(
        platform=AL, order_id="3350228510000445566", status=OrderStatus.SHIPPED, raw_status="x"
    )
    async with client_for(recorder) as client:
        (shipment,) = await client.logistics(AL, order)
        with pytest.raises(ValueError, match="1688 order"):
            await client.logistics(TB, order)
    (request,) = recorder.requests
    assert request.url.path == "/alibaba/order/logistics/trace"
    assert dict(request.url.params) == {"orderId": "3350228510000445566", "webSite": "1688"}
    assert shipment.delivered is True


async def test_overridden_endpoints_are_used_on_the_wire() -> None:
    recorder = Recorder(lambda r: ok(fixture("taobao/order_detail__paid.json")))
    overrides = {"taobao_order_detail": {"path": "/x/detail", "method": "POST", "order_id": "tid"}}
    async with client_for(recorder, endpoint_overrides=overrides) as client:
        await client.order_detail(TB, "3682557363260579405")
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("POST", "/x/detail")
    assert json.loads(request.content) == {"tid": "3682557363260579405"}


async def test_fetch_returns_the_envelope_unmapped() -> None:
    async with client_for(Recorder(lambda r: ok({"anything": 1}, "rq-9"))) as client:
        envelope = await client.fetch("alibaba_refund_detail", {"refund_id": "TQ1"})
    assert (envelope.data, envelope.request_id, envelope.http_status) == (
        {"anything": 1},
        "rq-9",
        200,
    )


# --- failures -------------------------------------------------------------------------------------


def _envelope(code: Any, msg: str = "失败", request_id: str | None = "req-e") -> dict[str, Any]:
    return {"requestId": request_id, "code": code, "msg": msg, "data": None}


def _raise(error: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    return handler


FAILURES: list[tuple[str, Handler, type[PandaPonError], dict[str, Any]]] = [
    (
        "429 with Retry-After seconds",
        lambda r: httpx.Response(429, headers={"Retry-After": "7"}, json=_envelope(429)),
        UpstreamRateLimited,
        {"retry_after": 7.0, "http_status": 429, "code": 429, "request_id": "req-e"},
    ),
    (
        "429 without Retry-After",
        lambda r: httpx.Response(429, text="slow down"),
        UpstreamRateLimited,
        {"retry_after": None, "http_status": 429, "code": None},
    ),
    (
        "envelope code 429",
        lambda r: httpx.Response(200, json=_envelope(429, "请求过于频繁")),
        UpstreamRateLimited,
        {"http_status": 200, "code": 429, "msg": "请求过于频繁"},
    ),
    (
        "HTTP 503 with an envelope",
        lambda r: httpx.Response(503, json=_envelope(503, "系统繁忙")),
        UpstreamServerError,
        {"http_status": 503, "code": 503, "msg": "系统繁忙", "request_id": "req-e"},
    ),
    (
        "HTTP 502 with an HTML body",
        lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"),
        UpstreamServerError,
        {"http_status": 502, "code": None, "request_id": None},
    ),
    (
        "envelope code 500",
        lambda r: httpx.Response(200, json=_envelope(500)),
        UpstreamServerError,
        {"http_status": 200, "code": 500},
    ),
    (
        "HTTP 401",
        lambda r: httpx.Response(401, json=_envelope(401, "signature mismatch")),
        AuthError,
        {"http_status": 401, "code": 401, "msg": "signature mismatch"},
    ),
    (
        "HTTP 403",
        lambda r: httpx.Response(403, text="forbidden"),
        AuthError,
        {"http_status": 403},
    ),
    (
        "envelope code 401 in an HTTP 200",
        lambda r: httpx.Response(200, json=_envelope("401", "invalid access-key")),
        AuthError,
        {"http_status": 200, "code": 401, "msg": "invalid access-key"},
    ),
    (
        "HTTP 404",
        lambda r: httpx.Response(404, text="no such path"),
        UpstreamClientError,
        {"http_status": 404},
    ),
    (
        "envelope code other than 200",
        lambda r: httpx.Response(200, json=_envelope(1001, "订单不存在", "req-404")),
        UpstreamRejected,
        {"http_status": 200, "code": 1001, "msg": "订单不存在", "request_id": "req-404"},
    ),
    (
        "body not JSON",
        lambda r: httpx.Response(200, text="<html>maintenance</html>"),
        MalformedResponse,
        {"http_status": 200, "field": None},
    ),
    (
        "body not an envelope",
        lambda r: httpx.Response(200, json=[1, 2]),
        MalformedResponse,
        {"field": None},
    ),
    (
        "envelope without code",
        lambda r: httpx.Response(200, json={"requestId": "r", "data": {}}),
        MalformedResponse,
        {"field": "code", "request_id": "r"},
    ),
    (
        "data null",
        lambda r: ok(None, "req-null"),
        MalformedResponse,
        {"field": "data", "request_id": "req-null", "code": 200},
    ),
    (
        "data without the order id",
        lambda r: ok({"status": "WAIT_BUYER_PAY"}, "req-bad"),
        MalformedResponse,
        {"field": "salesOrderId", "request_id": "req-bad"},
    ),
    ("read timeout", _raise(httpx.ReadTimeout("slow")), UpstreamTimeout, {"http_status": None}),
    ("pool timeout", _raise(httpx.PoolTimeout("busy")), UpstreamTimeout, {}),
    ("connection refused", _raise(httpx.ConnectError("refused")), UpstreamConnectError, {}),
    (
        "connection closed mid-response",
        _raise(httpx.RemoteProtocolError("peer closed")),
        UpstreamConnectError,
        {},
    ),
]


@pytest.mark.parametrize(
    ("handler", "error_type", "attributes"),
    [pytest.param(h, e, a, id=name) for name, h, e, a in FAILURES],
)
async def test_failures_are_typed_with_their_context(
    handler: Handler, error_type: type[PandaPonError], attributes: dict[str, Any]
) -> None:
    async with client_for(handler) as client:
        with pytest.raises(error_type) as caught:
            await client.order_detail(TB, "O1")
    error = caught.value
    assert type(error) is error_type
    assert error.endpoint == "taobao_order_detail"
    for name, value in attributes.items():
        assert getattr(error, name) == value, name
    # exactly one branch of the documented tree
    branches = [isinstance(error, b) for b in (TransientError, PermanentError, AuthError)]
    assert branches.count(True) == 1


def test_retry_after_as_seconds_or_http_date() -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 25 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 25 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


async def test_a_429_reports_retry_after_and_tells_the_limiter_what_was_limited() -> None:
    clock = [1000.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    noted: list[tuple[str, float | None]] = []

    class Noting(LocalTokenBucket):
        async def note_limited(self, subject: str, retry_after: float | None) -> float:
            noted.append((subject, retry_after))
            return await super().note_limited(subject, retry_after)

    limiter = Noting(100.0, clock=lambda: clock[0], sleep=fake_sleep)
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "7"}),
            ok(fixture("taobao/order_detail__paid.json")),
        ]
    )
    async with client_for(lambda r: next(answers), limiter=limiter) as client:
        with pytest.raises(UpstreamRateLimited) as caught:
            await client.order_detail(TB, "O1")
        await client.order_detail(TB, "O1")
    assert caught.value.retry_after == 7.0  # the worker delays this order by it
    assert noted == [("taobao order O1", 7.0)]
    assert slept == []  # one order's 429 pauses nobody (tests/unit/test_client_ratelimit.py)


async def test_every_call_takes_a_token() -> None:
    clock = [0.0]

    async def fake_sleep(seconds: float) -> None:
        clock[0] += seconds

    limiter = LocalTokenBucket(2.0, burst=1.0, clock=lambda: clock[0], sleep=fake_sleep)
    async with client_for(
        lambda r: ok(fixture("taobao/order_detail__paid.json")), limiter=limiter
    ) as c:
        for _ in range(5):
            await c.order_detail(TB, "O1")
    assert clock[0] == pytest.approx(2.0)  # 1 from the burst, then 4 at 2/s


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_calls_are_counted_by_endpoint_and_outcome() -> None:
    ok_labels = {"account": "default", "endpoint": "alibaba_refund_detail", "outcome": "ok"}
    limited = {"account": "default", "endpoint": "alibaba_refund_detail", "outcome": "rate_limited"}
    seconds = {"account": "default", "endpoint": "alibaba_refund_detail"}
    before = (
        _sample("pandasync_upstream_requests_total", ok_labels),
        _sample("pandasync_upstream_requests_total", limited),
        _sample("pandasync_upstream_request_seconds_count", seconds),
    )
    answers = iter([ok(fixture("1688/refund_detail__refundsuccess.json")), httpx.Response(429)])
    async with client_for(lambda r: next(answers)) as client:
        await client.refund_detail(AL, "TQ1")
        with pytest.raises(UpstreamRateLimited):
            await client.refund_detail(AL, "TQ1")
    after = (
        _sample("pandasync_upstream_requests_total", ok_labels),
        _sample("pandasync_upstream_requests_total", limited),
        _sample("pandasync_upstream_request_seconds_count", seconds),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1.0, 1.0, 2.0]


async def test_failures_are_logged_without_the_secret_or_the_signature() -> None:
    signatures: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        signatures.append(request.headers["signature"])
        return httpx.Response(200, json=_envelope(1001, "订单不存在", "req-log"))

    with structlog.testing.capture_logs() as logs:
        async with client_for(handler) as client:
            with pytest.raises(UpstreamRejected):
                await client.order_detail(TB, "O1")
    (entry,) = [e for e in logs if e["event"] == "pandapon call failed"]
    assert (entry["request_id"], entry["code"], entry["msg"]) == ("req-log", 1001, "订单不存在")
    assert entry["endpoint"] == "taobao_order_detail"
    text = repr(logs)
    assert SECRET not in text
    assert signatures[0] not in text


async def test_missing_credentials_are_a_clear_error_and_repr_hides_the_secret() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ConfigError, match="PANDASYNC_ACCESS_SECRET"):
            PandaPonClient(settings(access_secret=None), http)
        client = PandaPonClient(settings(), http)
        assert SECRET not in repr(client)
        assert "user-7" in repr(client)


async def test_make_http_client_has_explicit_timeouts() -> None:
    configured = settings(
        http_connect_timeout_s=1.5,
        http_read_timeout_s=7.0,
        http_write_timeout_s=2.5,
        http_pool_timeout_s=3.5,
        http_max_connections=4,
    )
    async with make_http_client(configured) as http:
        assert isinstance(http, httpx.AsyncClient)
        assert (http.timeout.connect, http.timeout.read) == (1.5, 7.0)
        assert (http.timeout.write, http.timeout.pool) == (2.5, 3.5)
        assert http.follow_redirects is False


@pytest.mark.parametrize("code", ["²", "፩", "9" * 5000])
def test_an_envelope_code_that_is_no_number_is_malformed_not_a_crash(code: str) -> None:
    response = httpx.Response(200, json={"code": code, "msg": "x", "data": None})
    with pytest.raises(MalformedResponse) as caught:
        unwrap("taobao_order_detail", response)
    assert caught.value.field == "code"
