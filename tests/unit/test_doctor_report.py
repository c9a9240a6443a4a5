"""``pandasync doctor`` without a network: the results, their rendering and each verdict.

The upstream checks run here against ``httpx.MockTransport`` (a fake PandaPon that answers from
the fixtures and records every request); the callback side is pure functions of headers and
body. The same command against the sandbox over sockets is tests/integration/test_doctor.py.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import ConfigError, Settings, load_settings
from service.doctor.checks import (
    MADE_UP_IDS,
    OrderRef,
    check_upstream,
    endpoint_check,
    made_up_params,
    order_gaps,
    shape_check,
    shown_paths,
)
from service.doctor.listen import (
    CallbackReport,
    callbacks_check,
    inspect_callback,
    render_callback,
    webhook_check,
    webhook_url,
)
from service.doctor.report import (
    Check,
    Fix,
    Mark,
    OverrideFix,
    exit_code,
    render_check,
    render_summary,
    settings_lines,
)
from service.ledger.models import MessageKind, OrderStatus, Platform, SignatureState
from service.pandapon import mapping
from service.pandapon.endpoints import DEFAULT_ENDPOINTS, EndpointTable
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    UpstreamClientError,
    UpstreamRejected,
    UpstreamTimeout,
)
from service.pandapon.signer import Credentials, signed_headers
from service.webhooks.verify import Verifier

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE = "https://pandapon.test"
KEY, SECRET, USER = "ak-doctor", "sk-doctor-never-shown", "user-9"
TOKEN = "doctor-token-0123456789"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_base_url": BASE,
        "access_key": KEY,
        "access_secret": SECRET,
        "user_id": USER,
        "timestamp_unit": "ms",
        "endpoint_overrides": {},
        "webhook_auth": "auto",
        "webhook_token": TOKEN,
        "public_url": None,
        "broker_url": None,
        "upstream_rate_limit_rps": 1000.0,
    }
    values.update(overrides)
    return load_settings(**values)


# --- report -------------------------------------------------------------------------------------


def test_exit_status_0_all_passed_1_any_failed_2_only_unknowns() -> None:
    ok, bad, unknown = (Check(m, "x", "y") for m in (Mark.OK, Mark.FAIL, Mark.UNKNOWN))
    assert exit_code([ok, ok]) == 0
    assert exit_code([ok, unknown, bad]) == 1
    assert exit_code([ok, unknown]) == 2


def test_a_check_renders_as_mark_name_detail_then_its_notes() -> None:
    check = Check(Mark.FAIL, "credentials", "refused", notes=("look here",))
    assert render_check(check) == ["✗ credentials: refused", "    look here"]


def test_settings_lines_merge_overrides_into_the_current_ones_and_say_each_setting_once() -> None:
    checks = [
        Check(Mark.FAIL, "a", "", (Fix("PANDASYNC_TIMESTAMP_UNIT", "s"),)),
        Check(Mark.FAIL, "b", "", (OverrideFix("taobao_order_detail", "path", "/x"),)),
        Check(Mark.FAIL, "c", "", (Fix("PANDASYNC_TIMESTAMP_UNIT", "s"),)),
    ]
    current = {"alibaba_order_list": {"method": "GET"}}
    lines = settings_lines(checks, current)
    assert lines[0] == "PANDASYNC_TIMESTAMP_UNIT=s"
    name, _, value = lines[1].partition("=")
    assert name == "PANDASYNC_ENDPOINT_OVERRIDES"
    assert json.loads(shlex.split(value)[0]) == {
        "alibaba_order_list": {"method": "GET"},
        "taobao_order_detail": {"path": "/x"},
    }
    assert len(lines) == 2


def test_the_summary_says_what_to_replace_by_hand() -> None:
    fix = OverrideFix("taobao_order_detail", "path", "/…")
    lines = render_summary([Check(Mark.FAIL, "taobao_order_detail", "", (fix,))], {})
    assert "1 failed, 0 not checked, of 1 checks" in lines
    assert any("replace /…" in line for line in lines)
    assert render_summary([Check(Mark.OK, "x", "y")], {})[-1] == "all 1 checks passed"


def test_order_ref_parses_platform_and_id() -> None:
    assert OrderRef.parse("taobao:123") == OrderRef(TB, "123")
    assert OrderRef.parse("1688:TQ1") == OrderRef(AL, "TQ1")
    for bad in ("taobao", "ebay:1", "1688:"):
        with pytest.raises(ValueError, match=r"PLATFORM:ID|unknown platform"):
            OrderRef.parse(bad)


# --- endpoint verdicts --------------------------------------------------------------------------

DETAIL = DEFAULT_ENDPOINTS["taobao_order_detail"]


def verdict(error: Any, *, made_up: bool = True, **overrides: Any) -> Check:
    return endpoint_check(DETAIL, error, overrides=overrides, made_up=made_up)


def test_http_404_asks_for_a_path_override_naming_the_endpoint() -> None:
    check = verdict(UpstreamClientError("x", http_status=404))
    assert check.mark is Mark.FAIL
    assert 'PANDASYNC_ENDPOINT_OVERRIDES=\'{"taobao_order_detail": {"path": "/…"}}\'' in (
        check.detail
    )
    assert check.fixes == (OverrideFix("taobao_order_detail", "path", "/…"),)


def test_http_405_asks_for_the_other_method() -> None:
    check = verdict(UpstreamClientError("x", http_status=405))
    assert check.fixes == (OverrideFix("taobao_order_detail", "method", "POST"),)


def test_not_found_for_a_made_up_id_proves_the_request() -> None:
    check = verdict(UpstreamRejected("x", http_status=200, code=404, msg="no such order"))
    assert check.mark is Mark.OK
    assert verdict(UpstreamRejected("x", code=400, msg="订单不存在")).mark is Mark.OK


def test_a_message_naming_a_parameter_asks_for_its_override_key() -> None:
    error = UpstreamRejected("x", code=400, msg="orderId is required")
    check = verdict(error)
    assert check.mark is Mark.FAIL
    assert check.fixes == (OverrideFix("taobao_order_detail", "order_id", "<upstream name>"),)


def test_a_real_id_not_found_fails_and_a_made_up_one_otherwise_refused_is_unknown() -> None:
    error = UpstreamRejected("x", code=404, msg="no order")
    assert verdict(error, made_up=False).mark is Mark.FAIL
    assert verdict(UpstreamRejected("x", code=400, msg="bad id"), made_up=True).mark is Mark.UNKNOWN


def test_transient_errors_are_unknown_and_auth_errors_fail() -> None:
    assert verdict(UpstreamTimeout("no answer in time")).mark is Mark.UNKNOWN
    assert verdict(AuthError("x", http_status=403, code=403)).mark is Mark.FAIL


def test_a_mapping_failure_after_a_200_envelope_means_the_request_was_accepted() -> None:
    assert verdict(MalformedResponse("x", code=200, field="status")).mark is Mark.OK
    not_an_envelope = verdict(MalformedResponse("the body is not JSON", http_status=200))
    assert not_an_envelope.mark is Mark.FAIL
    assert "PANDASYNC_API_BASE_URL" in not_an_envelope.detail


def test_an_overridden_endpoint_says_so() -> None:
    check = verdict(None, taobao_order_detail={"path": "/open/order/get"})
    assert check.mark is Mark.OK
    assert "(overridden: path)" in check.detail


def test_made_up_params_look_real_and_leave_fixed_ones_to_the_table() -> None:
    endpoint = DEFAULT_ENDPOINTS["alibaba_order_detail"]
    assert made_up_params(endpoint) == {"order_id": MADE_UP_IDS[(AL, "order_id")]}
    assert all(v.isdigit() or v.startswith("TQ") for v in MADE_UP_IDS.values())


# --- shapes -------------------------------------------------------------------------------------


def test_order_gaps_name_what_the_ledger_needs() -> None:
    data = mapping.parse_json((FIXTURES / "taobao/order_detail__paid.json").read_bytes())
    data["status"] = "SELLER_CONSIGNED_PART"
    del data["gmtCreate"]
    del data["subOrders"][0]["product_amount"]
    order = mapping.map_order(TB, data)
    assert order.status is OrderStatus.UNKNOWN
    assert order_gaps(order) == [
        "status 'SELLER_CONSIGNED_PART' unknown",
        "created_at",
        "lines[].amount",
    ]


def test_a_shape_check_fails_on_gaps_and_lists_the_missing_paths() -> None:
    missing = ["records[0].gmtCreate", "records[1].gmtCreate", "records[1].subOrders[2].quantity"]
    assert shown_paths(missing) == "records[].gmtCreate, records[].subOrders[].quantity"
    failed = shape_check("shapes taobao order", "order 1", ["created_at"], missing)
    assert failed.mark is Mark.FAIL
    assert "missing created_at" in failed.detail
    assert "records[].gmtCreate" in failed.detail
    passed = shape_check("shapes taobao order", "order 1", [], ["payTime"])
    assert passed.mark is Mark.OK
    assert passed.notes == ("optional fields not in the payload: payTime",)


# --- the webhook URL ----------------------------------------------------------------------------


def test_the_url_carries_the_token_in_the_token_modes() -> None:
    public = "https://sync.example.com"
    assert webhook_url(settings(public_url=public + "/")) == f"{public}/webhooks/pandapon/{TOKEN}"
    assert webhook_url(settings(webhook_auth="signature")) == (
        "http://127.0.0.1:8000/webhooks/pandapon"
    )
    assert webhook_url(settings(webhook_token=None)) == "http://127.0.0.1:8000/webhooks/pandapon"


def test_the_webhook_check_notes_an_unset_public_url_and_the_recommended_mode() -> None:
    check = webhook_check(settings(webhook_auth="signature"))
    assert check.mark is Mark.OK
    assert any("PANDASYNC_PUBLIC_URL" in note for note in check.notes)
    assert any("PANDASYNC_WEBHOOK_AUTH=auto" in note for note in check.notes)
    assert webhook_check(settings(public_url="https://sync.example.com")).notes == ()


def test_public_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_PUBLIC_URL"):
        settings(public_url="sync.example.com")


# --- callbacks ----------------------------------------------------------------------------------

ENVELOPE = {
    "messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
    "messageBody": {"salesOrderId": "3682557363260579405"},
    "messagePlatform": 0,
    "timestamp": "1715669977082",
}
JSON_TYPE = {"content-type": "application/json"}


def signed(unit: str = "ms", *, now: float | None = None, secret: str = SECRET) -> dict[str, str]:
    credentials = Credentials(access_key=KEY, access_secret=secret, user_id=USER)
    return {**JSON_TYPE, **signed_headers(credentials, unit=unit, now=now)}  # type: ignore[arg-type]


def inspect(
    headers: dict[str, str], body: Any = ENVELOPE, token: str | None = TOKEN, **overrides: Any
) -> CallbackReport:
    config = settings(**overrides)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return inspect_callback(headers, raw, token, settings=config, verifier=Verifier(config))


def test_a_callback_signed_as_we_sign_is_valid_and_classified() -> None:
    report = inspect(signed())
    assert report.signature is SignatureState.VALID
    assert report.signing == "ours"
    assert report.shape == "envelope, messageBody an object"
    assert (report.kind, report.known_type, report.platform) == (MessageKind.STATUS, True, TB)
    assert report.order_id == "3682557363260579405"
    assert report.token == "right"
    assert report.refused is None
    assert report.headers == ("access-key", "timestamp", "nonce-str", "user-id", "signature")


def test_the_other_timestamp_unit_is_found() -> None:
    report = inspect(signed("s"))
    assert report.signature is SignatureState.STALE
    assert report.unit_fix == "s"
    check = callbacks_check([report], settings(), 5)
    assert check.mark is Mark.FAIL
    assert Fix("PANDASYNC_TIMESTAMP_UNIT", "s") in check.fixes


def test_unsigned_other_and_stale_callbacks() -> None:
    assert inspect(JSON_TYPE).signing == "unsigned"
    other = inspect({**JSON_TYPE, "authorization": "c2VjcmV0IGhtYWM=", "timestamp": "1"})
    assert (other.signature, other.signing) == (SignatureState.ABSENT, "other")
    assert other.headers == ("timestamp", "authorization")
    mismatch = inspect(signed(secret="not-our-secret"))
    assert (mismatch.signature, mismatch.signing) == (SignatureState.MISMATCH, "other")
    stale = inspect(signed(now=time.time() - 3600))
    assert (stale.signature, stale.signing, stale.unit_fix) == (SignatureState.STALE, "stale", None)
    assert "3600 s old" in stale.signing_detail


def test_body_shapes_and_probes() -> None:
    assert inspect(JSON_TYPE, b"").probe
    assert inspect(JSON_TYPE, {}).shape == "probe: no messageType"
    assert inspect(JSON_TYPE, b"<xml/>").shape.startswith("not JSON")
    as_string = {**ENVELOPE, "messageBody": json.dumps(ENVELOPE["messageBody"])}
    report = inspect(JSON_TYPE, as_string)
    assert report.shape == "envelope, messageBody a JSON string"
    assert report.order_id == "3682557363260579405"
    flat = inspect(JSON_TYPE, {"messageType": "ORDER_CREATE", "orderId": "1"})
    assert flat.shape == "flat body (no messageBody)"
    assert flat.order_id is None
    unknown = inspect(JSON_TYPE, {**ENVELOPE, "messageType": "SOMETHING_NEW"})
    assert unknown.known_type is False


def test_token_states_and_what_the_receiver_would_refuse() -> None:
    assert inspect(JSON_TYPE, token="wrong-token-00000000").token == "wrong"
    bare = inspect(JSON_TYPE, token=None)
    assert (bare.token, bare.refused) == ("none", "missing_header")


def test_secret_header_values_are_never_shown() -> None:
    headers = {**signed(), "authorization": "Bearer top-secret-value"}
    line = render_callback(1, inspect(headers))
    assert headers["signature"] not in line
    assert "top-secret-value" not in line
    assert "signature" in line
    assert "authorization" in line


def test_callbacks_summary() -> None:
    config = settings()
    assert callbacks_check([], config, 30).mark is Mark.UNKNOWN
    probe = inspect(JSON_TYPE, b"")
    assert callbacks_check([probe], config, 30).mark is Mark.UNKNOWN
    assert callbacks_check([inspect(JSON_TYPE)], config, 30).mark is Mark.OK
    refused = callbacks_check([inspect(JSON_TYPE, token=None)], config, 30)
    assert refused.mark is Mark.FAIL
    assert Fix("PANDASYNC_WEBHOOK_AUTH", "auto") in refused.fixes
    no_token = settings(webhook_token=None)
    bare = inspect_callback(
        JSON_TYPE,
        json.dumps(ENVELOPE).encode(),
        None,
        settings=no_token,
        verifier=Verifier(no_token),
    )
    fixes = callbacks_check([bare], no_token, 30).fixes
    assert [f.setting for f in fixes if isinstance(f, Fix)] == [
        "PANDASYNC_WEBHOOK_AUTH",
        "PANDASYNC_WEBHOOK_TOKEN",
    ]


# --- the upstream checks against a fake PandaPon ------------------------------------------------


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


ANSWERS = {
    "taobao_order_list": "taobao/order_page__first.json",
    "taobao_order_detail": "taobao/order_detail__shipped.json",
    "taobao_logistics": "taobao/logistics__transport.json",
    "taobao_refund_detail": "taobao/refund_detail__success.json",
    "alibaba_order_list": "1688/order_page__first.json",
    "alibaba_order_detail": "1688/order_detail__waitbuyerreceive.json",
    "alibaba_logistics": "1688/logistics__trace.json",
    "alibaba_refund_detail": "1688/refund_detail__waitselleragree.json",
    "taobao_refund_list": "taobao/refund_page__first.json",
    "alibaba_refund_list": "1688/refund_page__first.json",
}


def fake_pandapon(
    seen: list[tuple[str, str]],
    accept: Callable[[httpx.Request], bool] = lambda r: True,
    data: dict[str, Any] | None = None,
) -> httpx.MockTransport:
    """Answers each endpoint of the default table from a fixture (or ``data`` by endpoint
    name); anything else is 404."""
    routes = {(e.method, e.path): name for name, e in DEFAULT_ENDPOINTS.items()}
    answers = {name: fixture(path) for name, path in ANSWERS.items()} | (data or {})

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        name = routes.get((request.method, request.url.path))
        if name is None:
            return httpx.Response(404, text="Not Found")
        if not accept(request):
            body = {"code": 401, "msg": "timestamp outside the allowed window", "data": None}
            return httpx.Response(401, json=body)
        return httpx.Response(200, json={"code": 200, "msg": "成功", "data": answers[name]})

    return httpx.MockTransport(handle)


async def run(config: Settings, transport: httpx.MockTransport) -> list[Check]:
    async with httpx.AsyncClient(transport=transport) as http:
        return [check async for check in check_upstream(config, http, now=NOW)]


async def test_only_the_query_endpoints_of_the_table_are_ever_requested() -> None:
    seen: list[tuple[str, str]] = []
    checks = await run(settings(), fake_pandapon(seen))
    table = {(e.method, e.path) for e in EndpointTable().all()}
    assert set(seen) <= table
    assert set(seen) == table  # and every one of them was checked
    assert all(path != "/alibaba/order/pay/url" for _, path in seen)
    names = [c.name for c in checks]
    assert names[0] == "credentials"
    assert set(DEFAULT_ENDPOINTS) <= set(names)


async def test_the_other_timestamp_unit_is_tried_and_kept() -> None:
    seen: list[tuple[str, str]] = []

    def seconds(request: httpx.Request) -> bool:
        return len(request.headers["timestamp"]) == 10

    checks = await run(settings(), fake_pandapon(seen, seconds))
    credentials = checks[0]
    assert credentials.mark is Mark.FAIL
    assert credentials.fixes == (Fix("PANDASYNC_TIMESTAMP_UNIT", "s"),)
    assert "set PANDASYNC_TIMESTAMP_UNIT=s" in credentials.detail
    by_name = {c.name: c for c in checks}
    assert by_name["taobao_order_detail"].mark is Mark.OK  # the rest ran with seconds


async def test_refused_credentials_stop_with_what_to_check() -> None:
    checks = await run(settings(), fake_pandapon([], lambda r: False))
    assert [c.name for c in checks] == ["credentials"]
    assert checks[0].mark is Mark.FAIL
    assert "PANDASYNC_ACCESS_SECRET" in checks[0].detail


async def test_an_unreachable_host_is_one_failed_line() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    checks = await run(settings(), httpx.MockTransport(refuse))
    assert len(checks) == 1
    assert checks[0].mark is Mark.FAIL
    assert "cannot reach https://pandapon.test" in checks[0].detail


async def test_a_shape_nobody_knows_fails_listing_each_field_under_its_first_name() -> None:
    """An order detail in neither spelling (nor anything else the mapping reads): the check
    fails, and each field it looked for is listed once, under the contract's name."""
    unknown = {"orderInfo": {"tid": "3701122334455667788", "orderState": "PAID", "items": []}}
    checks = await run(settings(), fake_pandapon([], data={"taobao_order_detail": unknown}))
    by_name = {c.name: c for c in checks}
    failed = by_name["shapes taobao order"]
    assert failed.mark is Mark.FAIL
    assert "cannot understand status: missing" in failed.detail
    absent = failed.detail.split("not in the payload: ")[1]
    for name in ("purchaseOrderPriceDTO", "subOrders", "status"):
        assert name in absent
    for other in ("sub_purchase_orders", "purchase_amount", "purchase_id", "created_time"):
        assert other not in absent
    assert by_name["taobao_order_detail"].mark is Mark.OK  # the request itself was accepted
    assert by_name["shapes 1688 order"].mark is Mark.OK


async def test_snake_payloads_miss_nothing() -> None:
    """The evidence's spellings (docs/upstream.md#evidence) are read: no field is listed missing."""
    snake = {
        "taobao_order_list": fixture("taobao/order_page__snake.json"),
        "taobao_order_detail": fixture("taobao/order_detail__snake_shipped.json"),
        "taobao_logistics": fixture("taobao/logistics__signed_snake.json"),
        "taobao_refund_detail": fixture("taobao/refund_detail__nested_status_100.json"),
    }
    checks = await run(settings(), fake_pandapon([], data=snake))
    by_name = {c.name: c for c in checks}
    order = by_name["shapes taobao order"]
    assert (order.mark, order.notes) == (Mark.OK, ())
    assert by_name["shapes taobao refund"].mark is Mark.OK
    logistics = by_name["shapes taobao logistics"]
    assert logistics.mark is Mark.OK
    # [TG]'s parcels carry no carrier code: the one optional field not found.
    assert logistics.notes == (
        "optional fields not in the payload: pnm_logistics_details[].logisticsCompanyCode",
    )
