"""The public evidence (docs/upstream.md#evidence), read: both spellings, both shapes, every status.

One test per evidence fixture (``tests/fixtures/{taobao,1688}/``, each with a sibling ``.md``
naming its source), the status tables and their sources, and the two client behaviours the
evidence asks for: the Taobao logistics call takes the sub-order id, and 1688's "not shipped
yet" error (``500_2``) is no parcels. The client runs against ``httpx.MockTransport`` and
against the sandbox in process (``httpx.ASGITransport``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from service.config import Settings, load_settings
from service.ledger.models import OrderStatus, Platform, RefundStatus
from service.pandapon import mapping
from service.pandapon.client import PandaPonClient, alibaba_not_shipped_yet
from service.pandapon.errors import MalformedResponse, UpstreamServerError
from service.pandapon.models import OrderSnapshot
from service.sandbox.app import create_sandbox_app
from service.sandbox.remote import SandboxRemote
from tests.support.servers import sandbox_test_settings

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CST = timezone(timedelta(hours=8))
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
SOURCES = ("[doc]", "[doc-v2]", "[TG]", "[DJ]", "[VN]", "[1688]", "[assumed]")
BASE = "https://pandapon.test"


def load(name: str) -> Any:
    return mapping.parse_json((FIXTURES / name).read_bytes())


def cst(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=CST)


# --- sources ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.json"))
)
def test_every_fixture_names_its_source(name: str) -> None:
    note = (FIXTURES / name).with_suffix(".md")
    assert note.is_file(), f"{name} has no sibling .md naming its source"
    text = note.read_text()
    assert text.startswith("Source: ")
    assert any(tag in text for tag in SOURCES), f"{note.name} names no source tag"


@pytest.mark.parametrize(
    "table",
    [
        mapping.TAOBAO_ORDER_STATUSES,
        mapping.ALIBABA_ORDER_STATUSES,
        mapping.TAOBAO_REFUND_STATUSES,
        mapping.ALIBABA_REFUND_STATUSES,
    ],
)
def test_every_status_says_where_it_comes_from(table: dict[str, tuple[Any, str]]) -> None:
    for raw, (_meaning, source) in table.items():
        tags = re.findall(r"\[[^\]]+\]", source)
        assert tags, raw
        assert set(tags) <= set(SOURCES), (raw, source)


def test_every_parcel_status_says_where_it_comes_from() -> None:
    for platform, table in mapping.PARCEL_STATUSES.items():
        for raw, known in table.items():
            assert raw == raw.upper()
            assert known.source in SOURCES, (platform, raw)
            assert mapping.parcel_status_known(platform, raw.lower())
    assert sorted(mapping.TAOBAO_DELIVERED_STATUSES) == ["SIGN", "SIGNED"]
    assert sorted(mapping.ALIBABA_DELIVERED_STATUSES) == ["SIGN"]
    assert not mapping.parcel_status_known(TB, "SOMETHING_NEW")
    assert mapping.parcel_status_known(AL, None)


def test_docs_upstream_lists_every_status_the_mapping_knows() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "upstream.md").read_text()
    tables = (
        mapping.TAOBAO_ORDER_STATUSES,
        mapping.ALIBABA_ORDER_STATUSES,
        mapping.TAOBAO_REFUND_STATUSES,
        mapping.ALIBABA_REFUND_STATUSES,
        *mapping.PARCEL_STATUSES.values(),
    )
    for table in tables:
        for raw in table:
            assert f"`{raw}`" in doc, raw


def test_the_sandbox_parcel_statuses_are_all_known() -> None:
    """Every parcel and trace status the sandbox renders, in either spelling, is placed."""
    from service.sandbox import render, scenario

    rendered = {"SIGN", "SIGNED", "DELIVERING", "ACCEPT", *render._TRACE_LABEL}
    rendered |= {status for status, _text, _where in scenario._TRACE}
    assert all(mapping.parcel_status_known(TB, s) for s in rendered)
    assert mapping.parcel_status_known(AL, "SIGN")
    assert mapping.parcel_status_known(AL, "SEND")


# --- statuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("BULIDING", OrderStatus.PENDING_PAYMENT),
        ("WAIT_BUYER_P", OrderStatus.PENDING_PAYMENT),
        ("WAIT_BUYER_PAY", OrderStatus.PENDING_PAYMENT),
        ("WAIT_SELLER_SEND_GOODS", OrderStatus.PAID),
        ("WAIT_BUYER_CONFIRM_GOODS", OrderStatus.SHIPPED),
        ("TRADE_CLOSED", OrderStatus.CANCELLED),
        ("TRADE_FINISHED", OrderStatus.COMPLETED),
        ("wait_buyer_p", OrderStatus.PENDING_PAYMENT),
    ],
)
def test_taobao_order_statuses_in_the_snake_shape(raw: str, expected: OrderStatus) -> None:
    data = load("taobao/order_detail__snake_wait_buyer_p.json")
    data["status"] = raw
    order = mapping.map_order(TB, data)
    assert (order.status, order.raw_status) == (expected, raw)


# [TG] consts/refund_status.go, as integers and as their text; the contract's strings.
TAOBAO_REFUND_CASES = [
    (0, RefundStatus.CANCELLED),  # "no refund applied for": never refunded
    (10, RefundStatus.REQUESTED),
    (20, RefundStatus.REQUESTED),
    (30, RefundStatus.REQUESTED),
    (100, RefundStatus.REFUNDED),
    (-10, RefundStatus.REJECTED),
    (-20, RefundStatus.CANCELLED),
    ("100", RefundStatus.REFUNDED),
    ("-20", RefundStatus.CANCELLED),
    (" 10 ", RefundStatus.REQUESTED),
    (40, RefundStatus.UNKNOWN),
    ("SUCCESS", RefundStatus.REFUNDED),
    ("SELLER_REFUSE_BUYER", RefundStatus.REJECTED),
]


@pytest.mark.parametrize(("raw", "expected"), TAOBAO_REFUND_CASES)
def test_taobao_refund_statuses_nested(raw: int | str, expected: RefundStatus) -> None:
    data = load("taobao/refund_detail__nested_status_100.json")
    data["refund_order_aggregate"]["refund_order"]["refund_status"] = raw
    refund = mapping.map_refund(TB, data)
    assert refund.status is expected
    assert refund.raw_status == str(raw).strip()
    assert refund.resolved_at is None  # the nested record has no time to tell


@pytest.mark.parametrize(("raw", "expected"), TAOBAO_REFUND_CASES)
def test_taobao_refund_statuses_flat(raw: int | str, expected: RefundStatus) -> None:
    data = load("taobao/refund_detail__flat_integer_status.json")
    data["refundStatus"] = raw
    refund = mapping.map_refund(TB, data)
    assert (refund.status, refund.raw_status) == (expected, str(raw).strip())
    final = expected in mapping.FINAL_REFUND_STATUSES
    assert refund.resolved_at == (cst(2026, 11, 22, 12, 0, 0) if final else None)


def test_a_status_0_record_is_no_refund_never_a_refunded_one() -> None:
    data = load("taobao/refund_detail__nested_status_100.json")
    data["refund_order_aggregate"]["refund_order"]["refund_status"] = 0
    refund = mapping.map_refund(TB, data)
    assert refund.status is not RefundStatus.REFUNDED
    assert refund.status is RefundStatus.CANCELLED  # the order's refund_state stays none


def test_1688_waitbuyermodify_is_still_open() -> None:
    refund = mapping.map_refund(AL, load("1688/refund_detail__waitbuyermodify.json"))
    assert refund.status is RefundStatus.REQUESTED
    assert refund.status not in mapping.FINAL_REFUND_STATUSES
    assert refund.raw_status == "waitbuyermodify"
    assert refund.amount == Decimal("10.00")
    assert refund.resolved_at is None


# --- Taobao orders --------------------------------------------------------------------------------


def test_taobao_order_detail__snake_wait_buyer_p_is_pending_payment() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__snake_wait_buyer_p.json"))
    assert order.order_id == "2041512345678901"  # purchase_id, a JSON integer
    assert (order.status, order.raw_status) == (OrderStatus.PENDING_PAYMENT, "WAIT_BUYER_P")
    assert order.currency == "CNY"
    assert (order.total_amount, order.product_amount, order.shipping_fee) == (
        Decimal("105.00"),
        Decimal("100.00"),
        Decimal("5.00"),
    )
    assert all(isinstance(a, Decimal) for a in (order.total_amount, order.shipping_fee))
    assert order.created_at == cst(2026, 11, 20, 10, 0, 0)  # epoch milliseconds
    assert order.modified_at == cst(2026, 11, 20, 10, 30, 0)
    assert order.paid_at is None  # pay_time 0: Go's zero value, not 1970
    (line,) = order.lines
    assert line.line_id == line.logistics_ref == "2041512345678902"
    assert (line.product_id, line.sku_id, line.title) == ("672991141190", "5012345", "加厚保温杯")
    assert (line.quantity, line.amount, line.raw_status) == (2, Decimal("100.00"), "WAIT_BUYER_P")
    assert (line.tracking_number, line.carrier, line.has_tracking) == (None, None, False)
    assert order.refund_ids == ()  # refund_id 0: none
    assert order.raw["outer_purchase_id"] == "isv-20261120-0001"


def test_taobao_order_detail__snake_shipped_in_two_parcels() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__snake_shipped.json"))
    assert (order.order_id, order.status) == ("2041512345678911", OrderStatus.SHIPPED)
    assert order.total_amount == Decimal("259.90")
    assert order.created_at == cst(2026, 11, 20, 10, 0, 0)  # 10-digit epoch seconds
    assert order.paid_at == cst(2026, 11, 20, 10, 5, 0)
    assert order.modified_at == cst(2026, 11, 21, 9, 30, 0)
    shipped, waiting = order.lines
    assert shipped.logistics_ref == "2041512345678912"
    # The latest of its parcels; the deprecated flat fields are empty.
    assert (shipped.tracking_number, shipped.carrier, shipped.has_tracking) == (
        "YT7000000000002",
        "圆通速递",
        True,
    )
    assert (waiting.has_tracking, waiting.tracking_number, waiting.sku_id) == (False, None, None)
    assert waiting.raw_status == "WAIT_SELLER_SEND_GOODS"
    assert order.refund_ids == ("150012345678907",)


def test_taobao_order_detail__camel_ids_snake_lines_reads_each_field_where_it_is() -> None:
    order = mapping.map_order(TB, load("taobao/order_detail__camel_ids_snake_lines.json"))
    assert (order.order_id, order.status) == ("3682557363260579501", OrderStatus.PAID)
    assert (order.total_amount, order.shipping_fee) == (Decimal("68.00"), Decimal("8.00"))
    assert order.paid_at == cst(2026, 11, 20, 10, 5, 0)
    (line,) = order.lines
    assert line.line_id == line.logistics_ref == "200033789501"
    assert (line.quantity, line.amount, line.has_tracking) == (3, Decimal("60.00"), False)
    assert order.refund_ids == ()


def test_taobao_order_page__snake() -> None:
    page = mapping.map_order_page(TB, load("taobao/order_page__snake.json"), 1, 50)
    assert (page.total, page.page_no, page.page_size, page.unreadable) == (2, 1, 50, ())
    pending, closed = page.orders
    assert (pending.order_id, pending.status) == ("2041512345678921", OrderStatus.PENDING_PAYMENT)
    assert pending.total_amount == Decimal("19.90")
    assert (closed.status, closed.refund_ids) == (OrderStatus.CANCELLED, ("150012345678931",))
    assert closed.modified_at == cst(2026, 11, 21, 10, 0, 0)


def test_an_unreadable_snake_record_keeps_its_id() -> None:
    data = load("taobao/order_page__snake.json")
    del data["records"][1]["status"]
    page = mapping.map_order_page(TB, data, 1, 50)
    assert [r.order_id for r in page.unreadable] == ["2041512345678931"]
    assert "records[1].status" in page.unreadable[0].error


# --- Taobao refunds -------------------------------------------------------------------------------


def test_taobao_refund_detail__nested_status_100_is_refunded_with_its_amount() -> None:
    data = load("taobao/refund_detail__nested_status_100.json")
    refund = mapping.map_refund(TB, data)
    assert refund.refund_id == "150012345678901"  # a JSON integer
    assert refund.order_id == "3701122334455667788"  # purchase_order_line.sales_order_id
    assert refund.line_id == "2041512345678913"  # purchase_order_line_id
    assert (refund.status, refund.raw_status) == (RefundStatus.REFUNDED, "100")
    assert refund.amount == Decimal("49.90")  # refund_fee, fen
    assert isinstance(refund.amount, Decimal)
    assert (refund.currency, refund.reason) == ("CNY", "不想要了")
    assert refund.requested_at is refund.resolved_at is refund.modified_at is None
    assert refund.raw == json.loads(
        (FIXTURES / "taobao/refund_detail__nested_status_100.json").read_text()
    )


def test_a_nested_refund_without_sales_order_id_uses_the_purchase_order() -> None:
    data = load("taobao/refund_detail__nested_status_100.json")
    del data["refund_order_aggregate"]["purchase_order_line"]["sales_order_id"]
    assert mapping.map_refund(TB, data).order_id == "2041512345678911"
    del data["refund_order_aggregate"]["purchase_order_line"]["purchase_order_id"]
    with pytest.raises(MalformedResponse) as caught:
        mapping.map_refund(TB, data)
    assert caught.value.field == "refund_order_aggregate.purchase_order_line.sales_order_id"


def test_taobao_refund_detail__flat_integer_status() -> None:
    refund = mapping.map_refund(TB, load("taobao/refund_detail__flat_integer_status.json"))
    assert (refund.refund_id, refund.order_id) == ("150012345678903", "3701122334455667788")
    assert (refund.status, refund.raw_status) == (RefundStatus.REQUESTED, "20")
    assert (refund.amount, refund.line_id) == (Decimal("15.00"), "2041512345678912")
    assert refund.requested_at == cst(2026, 11, 22, 10, 0, 0)
    assert refund.resolved_at is None


def test_a_flat_record_in_snake_case_is_read_too() -> None:
    record = {
        "refund_id": 150012345678909,
        "sales_order_id": "3701122334455667788",
        "refund_status": -10,
        "refund_fee": 990,
        "reason_desc": "不想要了",
        "sub_purchase_order_id": "2041512345678912",
    }
    refund = mapping.map_refund(TB, record)
    assert (refund.refund_id, refund.status, refund.amount) == (
        "150012345678909",
        RefundStatus.REJECTED,
        Decimal("9.90"),
    )
    assert (refund.line_id, refund.reason) == ("2041512345678912", "不想要了")


# --- Taobao logistics -----------------------------------------------------------------------------


def test_taobao_logistics__signed_snake() -> None:
    data = load("taobao/logistics__signed_snake.json")
    (shipment,) = mapping.map_shipments(TB, data, line_id="2041512345678912")
    assert shipment.tracking_number == "78753196186001"  # mail_no
    assert (shipment.carrier, shipment.carrier_code) == ("中通快递", None)  # logistics_partner
    assert (shipment.raw_status, shipment.delivered) == ("SIGNED", True)
    assert shipment.line_id == "2041512345678912"
    assert [e.status for e in shipment.events] == ["COLLECTED", "DELIVERING", "SIGNED"]
    assert [e.description for e in shipment.events] == [
        "【杭州市】 快件已揽收",
        "【广州市】 快件正在派送中",
        "【广州市】 已签收，签收人：本人",
    ]
    assert [e.location for e in shipment.events] == [
        "浙江省 杭州市",
        "天河营业部",
        "广东省 广州市 天河区",
    ]
    assert shipment.events[-1].event_at == cst(2026, 11, 21, 14, 2, 0)
    assert "logistics_traces" not in shipment.raw
    assert shipment.raw["logistics_desc"] == "已签收"
    assert all(mapping.parcel_status_known(TB, e.status) for e in shipment.events)


def test_a_snake_parcel_signed_only_in_its_status_is_delivered() -> None:
    data = load("taobao/logistics__signed_snake.json")
    data["pnm_logistics_details"][0]["logistics_traces"].pop()  # no SIGNED step left
    (shipment,) = mapping.map_shipments(TB, data)
    assert shipment.delivered is True
    data["pnm_logistics_details"][0]["logistics_status"] = "DELIVERING"
    (shipment,) = mapping.map_shipments(TB, data)
    assert shipment.delivered is False


def test_taobao_logistics__delivering_pandapon() -> None:
    (shipment,) = mapping.map_shipments(TB, load("taobao/logistics__delivering_pandapon.json"))
    assert (shipment.tracking_number, shipment.carrier) == ("YT7000000000123", "圆通速递")
    assert (shipment.raw_status, shipment.delivered) == ("DELIVERING", False)
    (event,) = shipment.events
    assert (event.status, event.description) == ("TRANSPORT", "【北京市】 快件已发往 广州中心")
    assert event.location == "北京市 朝阳区"
    assert "logisticsTraces" not in shipment.raw


# --- 1688 -----------------------------------------------------------------------------------------


def test_1688_logistics__signed_status_sign() -> None:
    (shipment,) = mapping.map_shipments(AL, load("1688/logistics__signed_status_sign.json"))
    assert (shipment.raw_status, shipment.delivered) == ("SIGN", True)
    assert not any("签收" in (e.description or "") for e in shipment.events)


# --- times --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [1795140000, "1795140000", 1795140000000, "1795140000000", "2026-11-20 10:00:00"]
)
def test_epoch_seconds_milliseconds_and_china_time_are_the_same_moment(value: int | str) -> None:
    assert mapping.parse_time(value) == cst(2026, 11, 20, 10, 0, 0)


# --- what the doctor sees missing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "taobao/order_detail__snake_wait_buyer_p.json",
        "taobao/order_detail__snake_shipped.json",
        "taobao/order_detail__camel_ids_snake_lines.json",
    ],
)
def test_a_field_found_in_any_spelling_is_not_missing(name: str) -> None:
    with mapping.record_missing() as missing:
        mapping.map_order(TB, load(name))
    assert missing == []


def test_a_field_in_no_spelling_is_missing_once_under_its_first_name() -> None:
    data = load("taobao/order_detail__snake_shipped.json")
    del data["created_time"]
    del data["sub_purchase_orders"][1]["sub_purchase_order_id"]
    with mapping.record_missing() as missing:
        order = mapping.map_order(TB, data)
    assert order.created_at is None
    assert missing.count("gmtCreate") == 1
    assert "created_time" not in missing
    # The line falls back to Taobao's own line number; the sub-order id is missing, once.
    assert missing.count("sub_purchase_orders[1].subPurchaseOrderId") == 1
    assert order.lines[1].line_id == "3701122334455667790"
    assert order.lines[1].logistics_ref is None


def test_nested_refunds_and_snake_parcels_miss_nothing_they_need() -> None:
    with mapping.record_missing() as missing:
        mapping.map_refund(TB, load("taobao/refund_detail__nested_status_100.json"))
        mapping.map_shipments(TB, load("taobao/logistics__signed_snake.json"))
    # [TG]'s parcels name no carrier code: the one optional field looked for in vain.
    assert missing == ["pnm_logistics_details[0].logisticsCompanyCode"]


# --- the client: which id the Taobao logistics call takes -----------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def settings() -> Settings:
    return load_settings(
        api_base_url=BASE,
        access_key="ak-test",
        access_secret="sk-evidence-0001",
        user_id="user-7",
        broker_url=None,
        endpoint_overrides={},
        timestamp_unit="ms",
    )


@asynccontextmanager
async def client_for(handler: Handler) -> AsyncIterator[PandaPonClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        yield PandaPonClient(settings(), http)


def envelope(data: Any, code: Any = 200, msg: str = "成功") -> httpx.Response:
    return httpx.Response(200, json={"requestId": "req-1", "code": code, "msg": msg, "data": data})


async def test_the_taobao_logistics_call_takes_the_sub_purchase_order_id() -> None:
    # A third line names only Taobao's own line number: no id the call takes, so not asked.
    data = load("taobao/order_detail__snake_shipped.json")
    outer_only = copy.deepcopy(data["sub_purchase_orders"][0])
    del outer_only["sub_purchase_order_id"]
    outer_only["purchase_order_line_outer_id"] = "3701122334455667799"
    data["sub_purchase_orders"].append(outer_only)
    order = mapping.map_order(TB, data)
    asked: list[dict[str, str]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        return envelope(load("taobao/logistics__signed_snake.json"))

    async with client_for(handle) as client:
        (shipment,) = await client.logistics(TB, order)
    # Only the shipped line is asked (the second says it has no parcel), by its sub-order id.
    assert asked == [{"subPurchaseOrderId": "2041512345678912"}]
    assert shipment.delivered is True


# --- the client: 1688's "not shipped yet" -------------------------------------------------------

ALIBABA_ORDER = OrderSnapshot(
    platform=AL, order_id="3350228510000445566", status=OrderStatus.PAID, raw_status="x"
)


def outcome_count(endpoint: str, outcome: str) -> float:
    labels = {"account": "default", "endpoint": endpoint, "outcome": outcome}
    return REGISTRY.get_sample_value("pandasync_upstream_requests_total", labels) or 0.0


@pytest.mark.parametrize(
    "name",
    ["logistics__not_shipped_500_2.json", "logistics__not_shipped_500_2_in_msg.json"],
)
async def test_1688_logistics_not_shipped_yet_is_no_parcels(name: str) -> None:
    body = json.loads((FIXTURES / "1688/envelopes" / name).read_text())
    assert alibaba_not_shipped_yet(body)
    before = outcome_count("alibaba_logistics", "ok")
    async with client_for(lambda r: httpx.Response(200, json=body)) as client:
        assert await client.logistics(AL, ALIBABA_ORDER) == []
    assert outcome_count("alibaba_logistics", "ok") == before + 1  # not a failure


async def test_1688_logistics_not_shipped_yet_on_http_500_is_no_parcels_too() -> None:
    body = json.loads((FIXTURES / "1688/envelopes/logistics__not_shipped_500_2.json").read_text())
    async with client_for(lambda r: httpx.Response(500, json=body)) as client:
        assert await client.logistics(AL, ALIBABA_ORDER) == []


async def test_500_2_is_no_parcels_only_on_the_1688_logistics_call() -> None:
    string_code = json.loads(
        (FIXTURES / "1688/envelopes/logistics__not_shipped_500_2.json").read_text()
    )
    in_msg = json.loads(
        (FIXTURES / "1688/envelopes/logistics__not_shipped_500_2_in_msg.json").read_text()
    )
    async with client_for(lambda r: httpx.Response(200, json=string_code)) as client:
        with pytest.raises(MalformedResponse):
            await client.order_detail(AL, ALIBABA_ORDER.order_id)
        taobao = mapping.map_order(TB, load("taobao/order_detail__snake_shipped.json"))
        with pytest.raises(MalformedResponse):
            await client.logistics(TB, taobao)
    async with client_for(lambda r: httpx.Response(200, json=in_msg)) as client:
        with pytest.raises(UpstreamServerError):
            await client.order_detail(AL, ALIBABA_ORDER.order_id)


async def test_other_1688_logistics_errors_are_still_errors() -> None:
    failing = {"requestId": None, "code": 500, "msg": "系统繁忙", "data": None}
    async with client_for(lambda r: httpx.Response(200, json=failing)) as client:
        with pytest.raises(UpstreamServerError):
            await client.logistics(AL, ALIBABA_ORDER)
    assert not alibaba_not_shipped_yet({"code": 200, "msg": "成功"})
    assert not alibaba_not_shipped_yet({"code": "500_3", "msg": "其他错误"})


# --- the same against the sandbox, in process ---------------------------------------------------


@asynccontextmanager
async def sandbox(payload_case: str) -> AsyncIterator[tuple[SandboxRemote, PandaPonClient]]:
    app = create_sandbox_app(sandbox_test_settings())
    transport = httpx.ASGITransport(app=app)
    url = "http://sandbox.test"
    async with httpx.AsyncClient(transport=transport, base_url=url) as http:
        remote = SandboxRemote(url, http)
        await remote.set_upstream(payload_case=payload_case)
        sandbox_settings = app.state.sandbox.settings
        client_settings = load_settings(
            api_base_url=url,
            access_key=sandbox_settings.access_key,
            access_secret=sandbox_settings.access_secret.get_secret_value(),
            user_id=sandbox_settings.user_id,
            timestamp_unit="ms",
            endpoint_overrides={},
            broker_url=None,
            upstream_rate_limit_rps=1000.0,
        )
        yield remote, PandaPonClient(client_settings, http)


@pytest.mark.parametrize(("payload_case", "answered"), [("snake", "not_shipped"), ("camel", "ok")])
async def test_the_sandbox_answers_500_2_for_a_1688_order_not_shipped_in_the_snake_variant(
    payload_case: str, answered: str
) -> None:
    async with sandbox(payload_case) as (remote, client):
        truth = await remote.create_order(AL)
        order = await client.order_detail(AL, truth["order_id"])
        assert await client.logistics(AL, order) == []
        assert (await remote.outcomes())["alibaba_logistics"] == {answered: 1}
        await remote.pay(AL, truth["order_id"])
        await remote.ship(AL, truth["order_id"])
        (parcel,) = await client.logistics(AL, order)  # shipped: parcels, in either variant
        assert (
            parcel.tracking_number
            == (await remote.order(AL, truth["order_id"]))["shipments"][0]["tracking_number"]
        )


async def test_a_snake_taobao_order_through_its_life_against_the_sandbox() -> None:
    async with sandbox("snake") as (remote, client):
        truth = await remote.create_order(
            TB, [{"title": "保温杯", "quantity": 2, "unit_price": "24.95"}], shipping_fee="5"
        )
        order_id = truth["order_id"]
        pending = await client.order_detail(TB, order_id)
        assert (pending.status, pending.raw_status) == (OrderStatus.PENDING_PAYMENT, "WAIT_BUYER_P")
        await remote.pay(TB, order_id)
        await remote.ship(TB, order_id)
        await remote.deliver(TB, order_id)
        refund = await remote.open_refund(TB, order_id, "10.00")
        await remote.resolve_refund(TB, refund["refund_id"], "refunded")
        truth = await remote.order(TB, order_id)
        await remote.reset_calls()

        order = await client.order_detail(TB, order_id)
        (shipment,) = await client.logistics(TB, order)
        refunded = await client.refund_detail(TB, refund["refund_id"])
        calls = await remote.calls()
    assert order.status is OrderStatus.SHIPPED
    assert (order.total_amount, order.paid_at) == (
        Decimal("54.90"),
        datetime.fromisoformat(truth["paid_at"]),
    )
    (line,) = order.lines
    assert line.logistics_ref == line.line_id == truth["lines"][0]["line_id"]
    assert (shipment.delivered, shipment.raw_status) == (True, "SIGNED")
    assert shipment.tracking_number == truth["shipments"][0]["tracking_number"]
    assert (refunded.status, refunded.amount) == (RefundStatus.REFUNDED, Decimal("10.00"))
    assert order.refund_ids == (refund["refund_id"],)
    assert calls["taobao_logistics"] == 1
