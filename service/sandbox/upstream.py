"""The upstream side of the sandbox: PandaPon's query APIs as the gateway answers them (see
``service.sandbox.app`` for the order of checks), and its two payment actions
(``handle_payment``: they pay orders of the world, as ``PaymentBehaviour`` says).

Each request is for the account its ``access-key`` header names (``SandboxState.
account_of_request``): that account's faults, counts, keys and world answer it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from service.domain import OrderStatus, Platform
from service.pandapon.endpoints import TAOBAO_PAY_MAX_IDS, Endpoint
from service.sandbox import render
from service.sandbox.settings import (
    CONTROL_PREFIX,
    PayloadCase,
)
from service.sandbox.state import (
    FAR_FUTURE,
    HUGE_RETRY_AFTER_S,
    MAX_PAGE_SIZE,
    AccountWorld,
    BadRequest,
    PayMode,
    Poison,
    SandboxState,
    UpstreamAnswer,
    json_error,
    state_of,
)
from service.sandbox.world import (
    World,
    WorldError,
    WorldOrder,
)

log = structlog.get_logger(__name__)


# --- the upstream side ----------------------------------------------------------------------------


def _envelope_response(
    data: Any,
    *,
    code: int | str = 200,
    msg: str = "成功",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        render.envelope(data, uuid.uuid4().hex, code=code, msg=msg),
        status_code=status,
        headers=headers,
    )


async def _hang(request: Request, seconds: float) -> None:
    """Answer nothing for ``seconds``, or until the client gives up and disconnects."""
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        pass


def _gateway_error(
    status: int, error: str, path: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A route the gateway does not have: a Java gateway's bare error body, no envelope."""
    body = {
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "status": status,
        "error": error,
        "path": path,
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _is_control(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Every request no control route takes (the router's default), routed per request."""
    if scope["type"] != "http":
        await WebSocketClose()(scope, receive, send)
        return
    request = Request(scope, receive)
    response = await dispatch(request)
    await response(scope, receive, send)


async def dispatch(request: Request) -> Response:
    state = state_of(request)
    path: str = request.scope["path"]
    if _is_control(path):
        return json_error(404, f"no control endpoint {request.method} {path}")
    by_method = state.routes.get(path)
    if not by_method:
        state.unrouted["not_found"] += 1
        return _gateway_error(404, "Not Found", path)
    method = "GET" if request.method == "HEAD" else request.method
    endpoint = by_method.get(method)
    if endpoint is None:
        state.unrouted["method_not_allowed"] += 1
        allow = ", ".join(sorted(by_method))
        return _gateway_error(405, "Method Not Allowed", path, headers={"allow": allow})
    return await handle_upstream(request, state, endpoint)


async def handle_upstream(request: Request, state: SandboxState, endpoint: Endpoint) -> Response:
    """One query-API request, as PandaPon would answer it (see the module docstring)."""
    account = state.account_of_request(request)
    if endpoint.action:
        return await handle_payment(request, state, account, endpoint)
    count = account.calls.setdefault(endpoint.name, Counter())
    spec = account.fault_for(endpoint.name)
    if spec.latency_s:
        await asyncio.sleep(spec.latency_s)
    fault = account.draw_fault(spec)
    if fault == "timeout":
        count["timeout"] += 1
        await _hang(request, spec.timeout_s)
        return _envelope_response(None, code=504, msg="gateway timeout", status=504)
    if fault == "rate_limit":
        count["rate_limited"] += 1
        return _envelope_response(
            None,
            code=429,
            msg="请求过于频繁",
            status=429,
            headers={"retry-after": str(spec.retry_after_s)},
        )
    if fault == "server_error":
        count["server_error"] += 1
        status = spec.server_error_status
        return _envelope_response(None, code=status, msg="系统繁忙", status=status)
    if fault == "huge_retry_after":
        count["huge_retry_after"] += 1
        return _envelope_response(
            None,
            code=429,
            msg="请求过于频繁",
            status=429,
            headers={"retry-after": str(HUGE_RETRY_AFTER_S)},
        )
    if fault == "unstorable_error":
        count["unstorable_error"] += 1
        return JSONResponse(
            render.envelope(None, "r" * 300, code=503, msg="系统\x00繁忙 " + "x" * 10_000),
            status_code=503,
        )
    refusal = state.verify(request, account)
    if refusal is not None:
        count["auth_rejected"] += 1
        log.info("sandbox refused a request", endpoint=endpoint.name, reason=refusal.msg)
        return _envelope_response(None, code=refusal.status, msg=refusal.msg, status=refusal.status)
    poison = account.draw_poison(spec) if endpoint.kind == "order_detail" else None
    try:
        params = await _read_params(request, endpoint)
        data = serve(account.world, endpoint, params, state.upstream.payload_case, poison)
    except BadRequest as error:
        count["bad_request"] += 1
        return _envelope_response(None, code=400, msg=str(error))
    except WorldError as error:
        count["not_found" if error.status == 404 else "bad_request"] += 1
        return _envelope_response(None, code=error.status, msg=str(error))
    except UpstreamAnswer as error:
        count["not_shipped"] += 1
        return _envelope_response(None, code=error.code, msg=error.msg)
    count["ok"] += 1
    if poison is not None:
        count[poison] += 1  # answered, but poisoned
    return _envelope_response(data)


# --- the payment actions --------------------------------------------------------------------------

PAY_URL = "https://sandbox.pandapon.invalid/pay?orderId={order_id}"


async def handle_payment(
    request: Request, state: SandboxState, account: AccountWorld, endpoint: Endpoint
) -> Response:
    """A payment call: signed like any request, then each order it names is paid (or not) as
    ``account.payments`` says. No generic fault applies here; the behaviour has its own delay
    and hang. Calls are counted per order (``payment_calls``) once they pass the gateway."""
    outcomes = account.payment_outcomes.setdefault(endpoint.name, Counter())
    refusal = state.verify(request, account)
    if refusal is not None:
        outcomes["auth_rejected"] += 1
        return _envelope_response(None, code=refusal.status, msg=refusal.msg, status=refusal.status)
    try:
        order_ids = await _payment_ids(request, endpoint)
    except BadRequest as error:
        outcomes["bad_request"] += 1
        return _envelope_response(None, code=400, msg=str(error))
    calls = account.payment_calls.setdefault(endpoint.name, Counter())
    for order_id in order_ids:
        calls[order_id] += 1
    behaviour = account.payments
    if behaviour.delay_s:
        await asyncio.sleep(behaviour.delay_s)
    modes = {order_id: behaviour.mode_for(order_id) for order_id in order_ids}
    if any(mode == "fail" for mode in modes.values()):
        outcomes["refused"] += 1
        return _envelope_response(None, code=400, msg="支付失败：账户余额不足")
    try:
        orders = [account.world.order(endpoint.platform, order_id) for order_id in order_ids]
    except WorldError as error:
        outcomes["not_found"] += 1
        return _envelope_response(None, code=error.status, msg=str(error))
    not_payable = [o.order_id for o in orders if o.status is not OrderStatus.PENDING_PAYMENT]
    if not_payable and endpoint.platform is Platform.ALIBABA_1688:
        outcomes["not_payable"] += 1
        msg = f"订单状态不允许支付: {', '.join(not_payable)}"
        return _envelope_response(None, code=400, msg=msg)
    paid: list[str] = []
    failed: dict[str, str] = {}
    held: list[str] = []
    urls: dict[str, str] = {}
    hang = False
    for order in orders:
        mode: PayMode = modes[order.order_id]
        if order.order_id in not_payable:
            failed[order.order_id] = "订单状态不允许支付"
            continue
        quota_used = behaviour.quota is not None and account.protocol_paid >= behaviour.quota
        if mode in ("succeed", "hang_after_paying") and quota_used:
            mode = "held_back"
        if mode in ("succeed", "hang_after_paying"):
            _pay(account, order)
            paid.append(order.order_id)
            hang = hang or mode == "hang_after_paying"
        elif mode == "hang":
            hang = True
        elif mode == "pay_url":
            urls[order.order_id] = PAY_URL.format(order_id=order.order_id)
            failed[order.order_id] = "免密支付失败，请手动支付"
        else:
            held.append(order.order_id)
            failed[order.order_id] = "额度不足或风控拦截"
    if hang:
        outcomes["timeout"] += 1
        await _hang(request, behaviour.hang_s)
        return _envelope_response(None, code=504, msg="gateway timeout", status=504)
    outcomes["paid"] += len(paid)
    outcomes["pay_url"] += len(urls)
    outcomes["held_back"] += len(held)
    if endpoint.platform is Platform.ALIBABA_1688:
        (order_id,) = order_ids
        return _envelope_response(
            {
                "orderId": int(order_id),
                "protocolPaySuccess": order_id in paid,
                "payUrl": urls.get(order_id),
                "cantPayOrderList": [int(i) for i in held],
            }
        )
    return _envelope_response(
        {
            "willPayPurchaseOrderIds": paid,
            "payFailurePurchaseOrderIds": list(failed),
            "payFailedResults": [
                {"purchaseOrderId": order_id, "reason": reason}
                for order_id, reason in failed.items()
            ],
        }
    )


def _pay(account: AccountWorld, order: WorldOrder) -> None:
    """Pay the order in the world: its status callback follows, as for any change."""
    account.world.pay(order)
    account.protocol_paid += 1


async def _payment_ids(request: Request, endpoint: Endpoint) -> list[str]:
    """The order ids a payment call names: 1688 one ``orderId`` in the query, Taobao a list of
    at most 10 purchase ids in the JSON body (under the table's parameter names)."""
    if endpoint.platform is Platform.ALIBABA_1688:
        params = await _read_params(request, endpoint)
        order_id = params["order_id"]
        if not order_id.isdigit():
            raise BadRequest(f"{endpoint.params['order_id']} must be an order id")
        return [order_id]
    wire = endpoint.params["order_ids"]
    source: Any
    if endpoint.method == "GET":
        source = request.query_params.getlist(wire)
    else:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        source = body.get(wire) if isinstance(body, dict) else None
    if (
        not isinstance(source, list)
        or not 1 <= len(source) <= TAOBAO_PAY_MAX_IDS
        or not all(isinstance(i, str | int) and str(i).isdigit() for i in source)
    ):
        raise BadRequest(f"{wire} must list 1 to {TAOBAO_PAY_MAX_IDS} purchase ids")
    ids = [str(i) for i in source]
    if len(set(ids)) != len(ids):
        raise BadRequest(f"{wire} names an order twice")
    return ids


async def _read_params(request: Request, endpoint: Endpoint) -> dict[str, str]:
    """The parameters by logical name, from the query (GET) or the JSON body (POST)."""
    source: dict[str, Any]
    if endpoint.method == "GET":
        source = dict(request.query_params)
    else:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body is not a JSON object")
        source = body
    params: dict[str, str] = {}
    for logical, wire in endpoint.params.items():
        value = source.get(wire)
        if value is None or value == "":
            raise BadRequest(f"{wire} is required")
        params[logical] = str(value)
        if logical in endpoint.fixed and params[logical] != endpoint.fixed[logical]:
            raise BadRequest(f"{wire} must be {endpoint.fixed[logical]}")
    return params


def serve(
    world: World,
    endpoint: Endpoint,
    params: dict[str, str],
    case: PayloadCase = "camel",
    poison: Poison | None = None,
) -> Any:
    """The ``data`` PandaPon would return for this request, Taobao payloads spelled in ``case``;
    an order detail ``poison``ed as asked (the world itself stays true)."""
    platform = endpoint.platform
    if endpoint.kind == "order_detail":
        order = world.order(platform, params["order_id"])
        if poison == "far_future":
            order = replace(order, modified_at=FAR_FUTURE)
        elif poison == "negative_amount":
            order = replace(order, product_amount=-order.product_amount - Decimal(1))
        return render.order_data(order, case)
    if endpoint.kind == "refund_detail":
        refund = world.refund(platform, params["refund_id"])
        return render.refund_data(refund, case, world.order(platform, refund.order_id))
    if endpoint.kind == "logistics":
        if platform is Platform.TAOBAO:
            order, line = world.taobao_line(params["sub_order_id"])
            return render.logistics_data(order, line, case)
        order = world.order(platform, params["order_id"])
        not_yet = render.logistics_error(order, case)
        if not_yet is not None:
            raise UpstreamAnswer(*not_yet)
        return render.logistics_data(order)
    page_no = _positive_int(params["page_no"], "pageNo")
    page_size = _positive_int(params["page_size"], "pageSize")
    if page_size > MAX_PAGE_SIZE:
        raise BadRequest(f"pageSize must be at most {MAX_PAGE_SIZE}")
    start = _china_time(params["modified_start"], "modifyStartTime")
    end = _china_time(params["modified_end"], "modifyEndTime")
    first = (page_no - 1) * page_size
    if endpoint.kind == "refund_list":
        refunds = world.refunds_modified_between(platform, start, end)
        with_orders = [
            (r, world.order(platform, r.order_id)) for r in refunds[first : first + page_size]
        ]
        return render.refund_page(with_orders, len(refunds), page_no, page_size, case)
    found = world.modified_between(platform, start, end)
    page = found[first : first + page_size]
    return render.order_page(page, len(found), page_no, page_size, case)


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise BadRequest(f"{name} must be a positive integer")
    return int(value)


def _china_time(value: str, name: str) -> datetime:
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=render.CHINA)
    except ValueError:
        raise BadRequest(f"{name} must be yyyy-MM-dd HH:mm:ss") from None
