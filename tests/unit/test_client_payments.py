"""The payment actions of the client: on the wire, each answer read, made once, never by a look.

Against ``httpx.MockTransport``; the answers are the fixtures under ``fixtures/*/payments/``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import ConfigError
from service.domain import PaymentState, Platform
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.endpoints import (
    ENDPOINT_NAMES,
    PAYMENT_ENDPOINT_NAMES,
    EndpointTable,
)
from service.pandapon.errors import (
    MalformedResponse,
    UpstreamConnectError,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from tests.unit.test_client import Recorder, assert_signed, client_for, ok, settings
from tests.unit.test_doctor_report import fake_pandapon, run
from tests.unit.test_doctor_report import settings as doctor_settings
from workers.payments import outcome_of_error

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
AL_ORDER = "3350228510000112233"
TB_ORDER = "3682557363260579405"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# --- the table --------------------------------------------------------------------------------


def test_the_payment_actions_are_in_the_table_but_not_among_the_queries() -> None:
    table = EndpointTable()
    assert PAYMENT_ENDPOINT_NAMES == ("taobao_order_pay", "alibaba_order_pay")
    assert not set(PAYMENT_ENDPOINT_NAMES) & set(ENDPOINT_NAMES)
    assert all(not e.action for e in table.all())
    pays = {(e.name, e.method, e.path, tuple(e.params.values())) for e in table.payments()}
    assert pays == {
        ("alibaba_order_pay", "GET", "/alibaba/order/pay/url", ("orderId",)),
        ("taobao_order_pay", "POST", "/open/order/pay", ("purchaseOrderIdList",)),
    }
    assert table.payment(AL).documented
    assert not table.payment(TB).documented  # path and body are assumed


def test_a_payment_path_is_overridable_like_any_other() -> None:
    table = EndpointTable(
        {"taobao_order_pay": {"path": "/open/order/batch/pay", "order_ids": "ids"}}
    )
    assert table.payment(TB).path == "/open/order/batch/pay"
    assert dict(table.payment(TB).params) == {"order_ids": "ids"}
    with pytest.raises(ConfigError, match=r"taobao_order_pay\.method: must be GET or POST"):
        EndpointTable({"taobao_order_pay": {"method": "PUT"}})


# --- on the wire --------------------------------------------------------------------------------


async def test_1688_payment_is_one_signed_get_of_the_seed_page() -> None:
    recorder = Recorder(lambda r: ok(fixture("1688/payments/order_pay__protocol_paid.json")))
    async with client_for(recorder) as client:
        answer = await client.pay_orders(AL, [AL_ORDER])
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("GET", "/alibaba/order/pay/url")
    assert dict(request.url.params) == {"orderId": AL_ORDER}
    assert_signed(request)
    assert answer.for_order(AL_ORDER).state is PaymentState.PAID
    assert answer.request_id == "req-1"


async def test_taobao_payment_is_one_signed_post_of_the_purchase_ids() -> None:
    recorder = Recorder(lambda r: ok(fixture("taobao/payments/order_pay__will_pay.json")))
    async with client_for(recorder) as client:
        answer = await client.pay_orders(TB, [TB_ORDER])
    (request,) = recorder.requests
    assert (request.method, request.url.path) == ("POST", "/open/order/pay")
    assert json.loads(request.content) == {"purchaseOrderIdList": [TB_ORDER]}
    assert_signed(request)
    assert answer.for_order(TB_ORDER).state is PaymentState.PAID


async def test_the_overridden_path_is_where_the_payment_goes() -> None:
    recorder = Recorder(lambda r: ok(fixture("taobao/payments/order_pay__will_pay.json")))
    moved = {"taobao_order_pay": {"path": "/open/order/batch/pay"}}
    async with client_for(recorder, endpoint_overrides=moved) as client:
        await client.pay_orders(TB, [TB_ORDER])
    assert [r.url.path for r in recorder.requests] == ["/open/order/batch/pay"]


@pytest.mark.parametrize(
    ("name", "state", "pay_url"),
    [
        ("order_pay__protocol_paid", PaymentState.PAID, None),
        (
            "order_pay__pay_url",
            PaymentState.PAY_BY_HAND,
            f"https://trade.1688.com/order/cashier.htm?orderId={AL_ORDER}",
        ),
        ("order_pay__held_back", PaymentState.HELD_BACK, None),
        ("order_pay__silent", PaymentState.UNKNOWN, None),
    ],
)
async def test_each_1688_answer_is_read(
    name: str, state: PaymentState, pay_url: str | None
) -> None:
    recorder = Recorder(lambda r: ok(fixture(f"1688/payments/{name}.json")))
    async with client_for(recorder) as client:
        result = (await client.pay_orders(AL, [AL_ORDER])).for_order(AL_ORDER)
    assert (result.state, result.pay_url) == (state, pay_url)
    assert (result.reason is None) == (state is PaymentState.PAID)


async def test_a_1688_refusal_without_a_link_is_a_failure() -> None:
    data = {"orderId": int(AL_ORDER), "protocolPaySuccess": False, "cantPayOrderList": []}
    async with client_for(Recorder(lambda r: ok(data))) as client:
        result = (await client.pay_orders(AL, [AL_ORDER])).for_order(AL_ORDER)
    assert result.state is PaymentState.FAILED


async def test_a_taobao_answer_is_read_per_id_in_either_spelling() -> None:
    other = "3682557363260579406"
    answer_data = fixture("taobao/payments/order_pay__mixed_snake.json")
    async with client_for(Recorder(lambda r: ok(answer_data))) as client:
        answer = await client.pay_orders(TB, [TB_ORDER, other, "3682557363260579407"])
    assert answer.for_order(TB_ORDER).state is PaymentState.PAID
    failed = answer.for_order(other)
    assert (failed.state, failed.reason) == (PaymentState.FAILED, "ALIPAY_BALANCE_NOT_ENOUGH")
    assert answer.for_order("3682557363260579407").state is PaymentState.UNKNOWN


async def test_an_answer_that_is_not_an_object_is_malformed() -> None:
    async with client_for(Recorder(lambda r: ok(["paid"]))) as client:
        with pytest.raises(MalformedResponse):
            await client.pay_orders(AL, [AL_ORDER])


async def test_bad_requests_are_refused_before_any_call() -> None:
    recorder = Recorder(lambda r: ok({}))
    async with client_for(recorder) as client:
        with pytest.raises(ValueError, match="one order per call"):
            await client.pay_orders(AL, [AL_ORDER, "3350228510000112234"])
        with pytest.raises(ValueError, match="at most 10"):
            await client.pay_orders(TB, [str(n) for n in range(11)])
        with pytest.raises(ValueError, match="distinct"):
            await client.pay_orders(TB, [TB_ORDER, TB_ORDER])
        with pytest.raises(ValueError, match="payment action"):
            await client.fetch("alibaba_order_pay", {"order_id": AL_ORDER})
    assert recorder.requests == []


# --- made once ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (lambda r: httpx.Response(502, text="bad gateway"), UpstreamServerError),
        (lambda r: httpx.Response(200, json={"code": 400, "msg": "余额不足"}), UpstreamRejected),
    ],
)
async def test_a_failed_payment_call_is_never_repeated_by_the_client(
    answer: Any, raised: type[Exception]
) -> None:
    recorder = Recorder(answer)
    async with client_for(recorder) as client:
        with pytest.raises(raised):
            await client.pay_orders(AL, [AL_ORDER])
    assert len(recorder.requests) == 1


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: a connect is refused


async def test_the_paying_client_makes_no_connect_retry() -> None:
    """A refused connection raises at once: the transport does not try again (with the
    default client it would, once), and it is read as nothing sent."""
    config = settings(api_base_url=f"http://127.0.0.1:{closed_port()}")
    async with make_http_client(config, connect_retries=0) as http:
        assert http._transport._pool._retries == 0  # type: ignore[attr-defined]
        with pytest.raises(UpstreamConnectError) as raised:
            await PandaPonClient(config, http).pay_orders(AL, [AL_ORDER])
    state, why = outcome_of_error(raised.value)
    assert (state, why) == (PaymentState.FAILED, "could not connect: nothing was sent")


@pytest.mark.parametrize(
    ("error", "state"),
    [
        (UpstreamTimeout("x"), PaymentState.UNKNOWN),
        (UpstreamServerError("x", http_status=504), PaymentState.UNKNOWN),
        (MalformedResponse("x"), PaymentState.UNKNOWN),
        (UpstreamConnectError("x"), PaymentState.UNKNOWN),  # broke after sending
        (UpstreamRejected("x", code=400), PaymentState.FAILED),
    ],
)
def test_what_a_failed_call_means_for_the_money(error: Exception, state: PaymentState) -> None:
    assert outcome_of_error(error)[0] is state  # type: ignore[arg-type]


def test_a_timeout_before_any_connection_is_a_failure_not_an_unknown() -> None:
    error = UpstreamTimeout("x")
    error.__cause__ = httpx.ConnectTimeout("no connection")
    assert outcome_of_error(error)[0] is PaymentState.FAILED
    error.__cause__ = httpx.ReadTimeout("sent, no answer")
    assert outcome_of_error(error)[0] is PaymentState.UNKNOWN


# --- never by a look ------------------------------------------------------------------------------


async def test_doctor_never_requests_a_payment_action() -> None:
    seen: list[tuple[str, str]] = []
    await run(doctor_settings(), fake_pandapon(seen))
    paths = {e.path for e in EndpointTable().payments()}
    assert seen, "the doctor asked nothing"
    assert not [path for _, path in seen if path in paths]
