"""The sandbox as a Starlette app: PandaPon's query endpoints (the table's) plus a control API.

Upstream side (paths, methods and parameter names from the same endpoint table as the client,
overrides included, then moved where the upstream variant says): every request is checked like
PandaPon would check it. Missing headers, a wrong access key, a timestamp outside
±``signature_tolerance_s`` (in the upstream variant's unit), a wrong signature or a nonce seen
before get **HTTP 401** with an envelope whose ``code`` is 401; a user-id other than the
configured one gets HTTP 403 / code 403. Unknown ids and bad parameters get HTTP 200 with an
envelope code 404 / 400 (a business error, as the envelope design suggests). In the ``snake``
variant, the 1688 logistics of an order with no parcel answers 1688's own code ``"500_2"``
(not shipped yet, ``render.logistics_error``).

Order of checks: added latency, then the fault draw (timeout, 429, 5xx), then auth, then the
request itself — so faults hit signed and unsigned requests alike, like a gateway in front.

Routing is looked up per request (a runtime move takes effect at once): a path the sandbox does
not serve gets HTTP 404 and a served path asked with another method HTTP 405, both with the
bare error body of a Java gateway rather than an envelope, so they cannot be mistaken for a
business "not found" (HTTP 200, envelope code 404).

Control side, under ``/_sandbox/``: drive the world, set faults, delivery and the upstream
variant, read the call counts, the callbacks sent and the ground truth. Documented in
docs/sandbox.md.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from service.config import ConfigError, TimestampUnit
from service.domain import Platform, RefundStatus
from service.pandapon.endpoints import ENDPOINT_NAMES, Endpoint, EndpointTable
from service.pandapon.signer import (
    HEADER_NONCE,
    HEADER_USER_ID,
    SIGNED_HEADERS,
    Credentials,
    check_signature,
)
from service.sandbox import render, scenario
from service.sandbox.delivery import CallbackDeliverer
from service.sandbox.settings import (
    ALL_ENDPOINTS,
    CONTROL_PREFIX,
    DeliverySettings,
    EndpointMove,
    FaultSpec,
    PayloadCase,
    SandboxSettings,
    UpstreamVariant,
    check_fault_keys,
    load_sandbox_settings,
)
from service.sandbox.world import (
    Change,
    NewEvent,
    NewLine,
    World,
    WorldError,
    WorldOrder,
    refund_truth,
)

log = structlog.get_logger(__name__)

MAX_PAGE_SIZE = 200
NONCE_MEMORY = 100_000

Fault = Literal["timeout", "rate_limit", "server_error", "huge_retry_after", "unstorable_error"]
Poison = Literal["far_future", "negative_amount"]
HUGE_RETRY_AFTER_S = 86_400
FAR_FUTURE = datetime(9999, 12, 30, tzinfo=UTC)  # a day short of the end: +08:00 must fit
M = TypeVar("M", bound=BaseModel)
D = TypeVar("D", bound=str)
# path -> method -> the endpoint served there
Routes = dict[str, dict[str, Endpoint]]
# The sandbox's words for each reason a signature check fails (what PandaPon's gateway says).
REFUSALS = {
    "wrong_access_key": "invalid access-key",
    "bad_timestamp": "invalid timestamp",
    "bad_nonce": "invalid nonce",
    "bad_signature": "signature mismatch",
    "stale_timestamp": "timestamp outside the allowed window",
    "future_timestamp": "timestamp outside the allowed window",
}
UNROUTED = "unrouted"  # the outcomes key of requests no endpoint takes


def served_endpoints(table: EndpointTable, moves: Mapping[str, EndpointMove]) -> list[Endpoint]:
    """The table's endpoints where the sandbox serves them: each move applied."""
    served = []
    for endpoint in table.all():
        move = moves.get(endpoint.name)
        if move is not None:
            endpoint = replace(
                endpoint, path=move.path or endpoint.path, method=move.method or endpoint.method
            )
        served.append(endpoint)
    return served


def build_routes(endpoints: list[Endpoint], moved: Collection[str]) -> Routes:
    """The routing table; ValueError when a move lands on a route another endpoint has.

    Two endpoints the overrides alone put on one route keep the old rule: the first is served.
    """
    routes: Routes = {}
    for endpoint in endpoints:
        by_method = routes.setdefault(endpoint.path, {})
        taken = by_method.setdefault(endpoint.method, endpoint)
        if taken is not endpoint and (endpoint.name in moved or taken.name in moved):
            raise ValueError(
                f"endpoints: {taken.name} and {endpoint.name} would both be served at "
                f"{endpoint.method} {endpoint.path}"
            )
    return routes


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    msg: str


@dataclass
class SandboxState:
    """Everything the handlers share; lives on ``app.state.sandbox``."""

    settings: SandboxSettings
    endpoints: EndpointTable
    credentials: Credentials
    world: World
    deliverer: CallbackDeliverer
    faults: dict[str, FaultSpec]
    fault_rng: random.Random
    scenario_rng: random.Random
    upstream: UpstreamVariant = field(default_factory=UpstreamVariant)
    served: list[Endpoint] = field(default_factory=list)
    routes: Routes = field(default_factory=dict)
    calls: dict[str, Counter[str]] = field(default_factory=dict)
    unrouted: Counter[str] = field(default_factory=Counter)
    nonces: OrderedDict[str, float] = field(default_factory=OrderedDict)

    @classmethod
    def build(cls, settings: SandboxSettings) -> SandboxState:
        credentials = Credentials(
            access_key=settings.access_key,
            access_secret=settings.access_secret.get_secret_value(),
            user_id=settings.user_id,
        )
        state = cls(
            settings=settings,
            endpoints=EndpointTable(settings.endpoint_overrides),
            credentials=credentials,
            world=World(seed=settings.seed),
            deliverer=CallbackDeliverer(
                settings.delivery,
                credentials,
                unit=settings.timestamp_unit,
                seed=settings.seed,
            ),
            faults=dict(settings.faults),
            fault_rng=random.Random(f"{settings.seed}:faults"),
            scenario_rng=random.Random(f"{settings.seed}:scenario"),
        )
        try:
            state.set_upstream(settings.upstream)
        except ValueError as error:
            raise ConfigError(f"PANDASYNC_SANDBOX_UPSTREAM: {error}") from None
        state.reset_calls()
        state.world.subscribe(state.on_change)
        return state

    @property
    def timestamp_unit(self) -> TimestampUnit:
        """The unit the upstream side accepts in a request's ``timestamp`` header."""
        return self.upstream.timestamp_unit or self.settings.timestamp_unit

    def set_upstream(self, variant: UpstreamVariant) -> None:
        """Switch to ``variant``; ValueError (nothing changed) if its moves collide."""
        served = served_endpoints(self.endpoints, variant.endpoints)
        self.routes = build_routes(served, variant.endpoints)
        self.served = served
        self.upstream = variant
        self.deliverer.upstream_unit = self.timestamp_unit

    def reset_world(self) -> None:
        self.world = World(seed=self.settings.seed)
        self.world.subscribe(self.on_change)

    def reset_calls(self) -> None:
        self.calls = {name: Counter() for name in ENDPOINT_NAMES}
        self.unrouted = Counter()

    def on_change(self, change: Change) -> None:
        settings = self.deliverer.settings
        message = render.callback_message(
            change.kind,
            change.order,
            change.refund,
            style=settings.callback_style,
            body_as_string=settings.body_as_string,
            timestamp_ms=int(time.time() * 1000),
        )
        self.deliverer.submit(message, change.order.platform.value, change.order.order_id)

    def fault_for(self, endpoint: str) -> FaultSpec:
        return self.faults.get(endpoint) or self.faults.get(ALL_ENDPOINTS) or FaultSpec()

    def draw_fault(self, spec: FaultSpec) -> Fault | None:
        shares: tuple[tuple[Fault, float], ...] = (
            ("timeout", spec.timeout),
            ("rate_limit", spec.rate_limit),
            ("server_error", spec.server_error),
            ("huge_retry_after", spec.huge_retry_after),
            ("unstorable_error", spec.unstorable_error),
        )
        return self._draw(shares)

    def draw_poison(self, spec: FaultSpec) -> Poison | None:
        shares: tuple[tuple[Poison, float], ...] = (
            ("far_future", spec.far_future),
            ("negative_amount", spec.negative_amount),
        )
        return self._draw(shares)

    def _draw(self, shares: Sequence[tuple[D, float]]) -> D | None:
        """One roll against cumulative shares; no roll when every share is zero (so a spec
        without faults leaves the fault stream where it was)."""
        if not any(share for _, share in shares):
            return None
        roll, edge = self.fault_rng.random(), 0.0
        for what, share in shares:
            edge += share
            if roll < edge:
                return what
        return None

    def verify(self, request: Request) -> Refusal | None:
        """PandaPon's checks on the five headers (§1): all present, then the same signature
        check as our own receiver's (``signer.check_signature``), then a fresh nonce and the
        user-id's permission."""
        headers = {name: request.headers.get(name, "") for name in SIGNED_HEADERS}
        missing = [name for name, value in headers.items() if not value]
        if missing:
            return Refusal(401, f"missing header(s): {', '.join(missing)}")
        now = time.time()
        check = check_signature(
            headers,
            access_key=self.credentials.access_key,
            access_secret=self.credentials.access_secret,
            unit=self.timestamp_unit,
            tolerance_s=self.settings.signature_tolerance_s,
            now=now,
        )
        if check.reason is not None:
            return Refusal(401, REFUSALS.get(check.reason, check.detail or check.reason))
        if self._nonce_seen(headers[HEADER_NONCE], now):
            return Refusal(401, "nonce already used")
        if headers[HEADER_USER_ID] != self.credentials.user_id:
            return Refusal(403, "user-id has no permission")
        return None

    def _nonce_seen(self, nonce: str, now: float) -> bool:
        window = self.settings.signature_tolerance_s
        while self.nonces and (
            len(self.nonces) > NONCE_MEMORY or next(iter(self.nonces.values())) < now - window
        ):
            self.nonces.popitem(last=False)
        if nonce in self.nonces:
            return True
        self.nonces[nonce] = now
        return False


def state_of(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


class BadRequest(Exception):
    """A parameter is missing or invalid (code 400 upstream, HTTP 400 on the control API)."""


class UpstreamAnswer(Exception):
    """An error envelope with the upstream's own code, e.g. 1688 logistics' ``500_2``."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


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
        return _error(404, f"no control endpoint {request.method} {path}")
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
    count = state.calls.setdefault(endpoint.name, Counter())
    spec = state.fault_for(endpoint.name)
    if spec.latency_s:
        await asyncio.sleep(spec.latency_s)
    fault = state.draw_fault(spec)
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
    refusal = state.verify(request)
    if refusal is not None:
        count["auth_rejected"] += 1
        log.info("sandbox refused a request", endpoint=endpoint.name, reason=refusal.msg)
        return _envelope_response(None, code=refusal.status, msg=refusal.msg, status=refusal.status)
    poison = state.draw_poison(spec) if endpoint.kind == "order_detail" else None
    try:
        params = await _read_params(request, endpoint)
        data = serve(state.world, endpoint, params, state.upstream.payload_case, poison)
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


# --- the control side -----------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LineIn(_In):
    title: str = "沙盒商品"
    quantity: int = Field(default=1, ge=1)
    unit_price: Decimal = Field(ge=0, max_digits=14, decimal_places=2)
    product_id: str | None = None
    sku_id: str | None = None


class OrderIn(_In):
    platform: Platform
    lines: list[LineIn] = Field(min_length=1)
    shipping_fee: Decimal = Field(default=Decimal("0"), ge=0, max_digits=14, decimal_places=2)
    order_id: str | None = None
    currency: str = Field(default="CNY", min_length=3, max_length=3)


class PriceIn(_In):
    total_amount: Decimal | None = Field(default=None, ge=0, decimal_places=2)
    shipping_fee: Decimal | None = Field(default=None, ge=0, decimal_places=2)


class EventIn(_In):
    description: str
    status: str | None = None
    location: str | None = None
    at: datetime | None = None


class ShipIn(_In):
    tracking_number: str | None = None
    carrier: str | None = None
    carrier_code: str | None = None
    line_ids: list[str] | None = None
    events: list[EventIn] = Field(default_factory=list)


class DeliverIn(_In):
    tracking_number: str | None = None


class CancelIn(_In):
    reason: str | None = None


class RefundIn(_In):
    amount: Decimal = Field(gt=0, decimal_places=2)
    line_id: str | None = None
    reason: str | None = None


class ResolveIn(_In):
    outcome: Literal["refunded", "rejected", "cancelled"]


class RawStatusIn(_In):
    raw_status: str | None = Field(min_length=1, max_length=128)  # null: the status's own


class ScenarioIn(_In):
    seed: int | None = None
    orders: int = Field(default=0, ge=0, le=100_000)
    steps: int = Field(default=4, ge=0, le=50)
    advance: int = Field(default=0, ge=0, le=100_000)


class DrainIn(_In):
    within_s: float = Field(default=10.0, gt=0, le=300)


_FAULTS = TypeAdapter(dict[str, FaultSpec])


async def _body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as error:
        raise BadRequest(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or 'body'}: {item['msg']}"
        for item in error.errors()
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


ControlHandler = Callable[[Request, SandboxState], Awaitable[Any]]


def control(
    handler: ControlHandler, *, status: int = 200
) -> Callable[[Request], Awaitable[Response]]:
    """A control endpoint: JSON in, JSON out, world errors as 4xx with a reason."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request, state_of(request))
        except BadRequest as error:
            return _error(400, str(error))
        except WorldError as error:
            return _error(error.status, str(error))
        return JSONResponse(result, status_code=status)

    endpoint.__name__ = handler.__name__
    return endpoint


def _platform(request: Request) -> Platform:
    value = request.path_params["platform"]
    try:
        return Platform(value)
    except ValueError:
        raise BadRequest("platform must be taobao or 1688") from None


def _order(request: Request, state: SandboxState) -> WorldOrder:
    return state.world.order(_platform(request), request.path_params["order_id"])


def _new_event(event: EventIn) -> NewEvent:
    return NewEvent(event.description, event.status, event.location, event.at)


async def index(request: Request, state: SandboxState) -> Any:
    """Credentials (no secret), the upstream variant, and the endpoints where they are served."""
    return {
        "sandbox": "PandaPon emulator; see docs/sandbox.md",
        "access_key": state.credentials.access_key,
        "user_id": state.credentials.user_id,
        "timestamp_unit": state.timestamp_unit,
        "upstream": state.upstream.model_dump(),
        "endpoints": [
            {
                "name": e.name,
                "method": e.method,
                "path": e.path,
                "params": dict(e.params),
                "documented": e.documented,
            }
            for e in state.served
        ],
    }


async def health(request: Request, state: SandboxState) -> Any:
    return {"status": "ok", "orders": len(state.world.orders())}


async def create_order(request: Request, state: SandboxState) -> Any:
    data = await _body(request, OrderIn)
    order = state.world.create_order(
        data.platform,
        [NewLine(x.title, x.quantity, x.unit_price, x.product_id, x.sku_id) for x in data.lines],
        shipping_fee=data.shipping_fee,
        order_id=data.order_id,
        currency=data.currency.upper(),
    )
    return {"order": order.truth()}


async def list_orders(request: Request, state: SandboxState) -> Any:
    value = request.query_params.get("platform")
    try:
        platform = Platform(value) if value else None
    except ValueError:
        raise BadRequest("platform must be taobao or 1688") from None
    return {"orders": [o.truth() for o in state.world.orders(platform)]}


async def get_order(request: Request, state: SandboxState) -> Any:
    return {"order": _order(request, state).truth()}


async def pay(request: Request, state: SandboxState) -> Any:
    order = _order(request, state)
    state.world.pay(order)
    return {"order": order.truth()}


async def change_price(request: Request, state: SandboxState) -> Any:
    data = await _body(request, PriceIn)
    order = _order(request, state)
    state.world.change_price(order, total_amount=data.total_amount, shipping_fee=data.shipping_fee)
    return {"order": order.truth()}


async def ship(request: Request, state: SandboxState) -> Any:
    data = await _body(request, ShipIn)
    order = _order(request, state)
    shipment = state.world.ship(
        order,
        tracking_number=data.tracking_number,
        carrier=data.carrier,
        carrier_code=data.carrier_code,
        line_ids=data.line_ids,
        events=[_new_event(e) for e in data.events],
    )
    return {"order": order.truth(), "tracking_number": shipment.tracking_number}


async def add_event(request: Request, state: SandboxState) -> Any:
    data = await _body(request, EventIn)
    order = _order(request, state)
    state.world.add_event(order, request.path_params["tracking_number"], _new_event(data))
    return {"order": order.truth()}


async def deliver(request: Request, state: SandboxState) -> Any:
    data = await _body(request, DeliverIn)
    order = _order(request, state)
    shipment = state.world.deliver(order, data.tracking_number)
    return {"order": order.truth(), "tracking_number": shipment.tracking_number}


async def confirm(request: Request, state: SandboxState) -> Any:
    order = _order(request, state)
    state.world.confirm(order)
    return {"order": order.truth()}


async def cancel(request: Request, state: SandboxState) -> Any:
    data = await _body(request, CancelIn)
    order = _order(request, state)
    state.world.cancel(order, data.reason)
    return {"order": order.truth()}


async def open_refund(request: Request, state: SandboxState) -> Any:
    data = await _body(request, RefundIn)
    order = _order(request, state)
    refund = state.world.open_refund(order, data.amount, line_id=data.line_id, reason=data.reason)
    return {"order": order.truth(), "refund": refund_truth(refund)}


async def get_refund(request: Request, state: SandboxState) -> Any:
    refund = state.world.refund(_platform(request), request.path_params["refund_id"])
    return {"refund": refund_truth(refund)}


async def set_raw_status(request: Request, state: SandboxState) -> Any:
    data = await _body(request, RawStatusIn)
    order = _order(request, state)
    state.world.set_raw_status(order, data.raw_status)
    return {"order": order.truth(), "raw_status": render.raw_order_status(order)}


async def resolve_refund(request: Request, state: SandboxState) -> Any:
    data = await _body(request, ResolveIn)
    refund = state.world.refund(_platform(request), request.path_params["refund_id"])
    state.world.resolve_refund(refund, RefundStatus(data.outcome))
    order = state.world.order(refund.platform, refund.order_id)
    return {"order": order.truth(), "refund": refund_truth(refund)}


async def run_scenario(request: Request, state: SandboxState) -> Any:
    data = await _body(request, ScenarioIn)
    rng = random.Random(f"{data.seed}:scenario") if data.seed is not None else state.scenario_rng
    created = scenario.generate(state.world, rng, data.orders, data.steps)
    advanced = scenario.advance(state.world, rng, data.advance)
    return {
        "created": [{"platform": o.platform.value, "order_id": o.order_id} for o in created],
        "advanced": advanced,
    }


async def get_calls(request: Request, state: SandboxState) -> Any:
    outcomes = {name: dict(c) for name, c in state.calls.items()}
    if state.unrouted:  # only once a request missed every route, so the usual shape stays
        outcomes[UNROUTED] = dict(state.unrouted)
    return {
        "calls": {name: sum(c.values()) for name, c in state.calls.items()},
        "outcomes": outcomes,
    }


async def reset_calls(request: Request, state: SandboxState) -> Any:
    state.reset_calls()
    return await get_calls(request, state)


async def get_faults(request: Request, state: SandboxState) -> Any:
    return {"faults": {k: v.model_dump() for k, v in state.faults.items()}}


async def put_faults(request: Request, state: SandboxState) -> Any:
    try:
        faults = check_fault_keys(_FAULTS.validate_json(await request.body() or b"{}"))
    except (ValidationError, ValueError) as error:
        message = _describe(error) if isinstance(error, ValidationError) else str(error)
        raise BadRequest(message) from None
    state.faults = faults
    return await get_faults(request, state)


async def clear_faults(request: Request, state: SandboxState) -> Any:
    state.faults = {}
    return await get_faults(request, state)


async def get_delivery(request: Request, state: SandboxState) -> Any:
    return {"delivery": state.deliverer.settings.model_dump()}


async def patch_delivery(request: Request, state: SandboxState) -> Any:
    try:
        patch = json.loads(await request.body() or b"{}")
        if not isinstance(patch, dict):
            raise BadRequest("the body must be a JSON object")
        merged = {**state.deliverer.settings.model_dump(), **patch}
        state.deliverer.configure(DeliverySettings.model_validate(merged))
    except ValueError as error:
        if isinstance(error, ValidationError):
            raise BadRequest(_describe(error)) from None
        raise BadRequest("the body is not JSON") from None
    return await get_delivery(request, state)


async def get_upstream(request: Request, state: SandboxState) -> Any:
    return {"upstream": state.upstream.model_dump()}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` removes a key."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


async def patch_upstream(request: Request, state: SandboxState) -> Any:
    try:
        patch = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(patch, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        variant = UpstreamVariant.model_validate(merge_patch(state.upstream.model_dump(), patch))
        state.set_upstream(variant)
    except ValidationError as error:
        raise BadRequest(_describe(error)) from None
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return await get_upstream(request, state)


async def get_callbacks(request: Request, state: SandboxState) -> Any:
    with_body = request.query_params.get("with_body") in ("1", "true", "yes")
    try:
        limit = int(request.query_params.get("limit", "1000"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    return {
        **state.deliverer.stats(),
        "records": state.deliverer.records(with_body=with_body, limit=max(0, limit)),
    }


async def drain_callbacks(request: Request, state: SandboxState) -> Any:
    data = await _body(request, DrainIn)
    drained = await state.deliverer.drain(data.within_s)
    return {"drained": drained, **state.deliverer.stats()}


async def reset(request: Request, state: SandboxState) -> Any:
    state.reset_world()
    state.reset_calls()
    state.faults = dict(state.settings.faults)
    state.set_upstream(state.settings.upstream)
    return {"status": "reset"}


def control_routes() -> list[BaseRoute]:
    p = CONTROL_PREFIX
    order = f"{p}/orders/{{platform}}/{{order_id}}"
    refund = f"{p}/refunds/{{platform}}/{{refund_id}}"
    return [
        Route(p, control(index), methods=["GET"]),
        Route(f"{p}/health", control(health), methods=["GET"]),
        Route(f"{p}/orders", control(create_order, status=201), methods=["POST"]),
        Route(f"{p}/orders", control(list_orders), methods=["GET"]),
        Route(order, control(get_order), methods=["GET"]),
        Route(f"{order}/pay", control(pay), methods=["POST"]),
        Route(f"{order}/price", control(change_price), methods=["POST"]),
        Route(f"{order}/ship", control(ship), methods=["POST"]),
        Route(
            f"{order}/shipments/{{tracking_number}}/events", control(add_event), methods=["POST"]
        ),
        Route(f"{order}/deliver", control(deliver), methods=["POST"]),
        Route(f"{order}/confirm", control(confirm), methods=["POST"]),
        Route(f"{order}/cancel", control(cancel), methods=["POST"]),
        Route(f"{order}/raw-status", control(set_raw_status), methods=["POST"]),
        Route(f"{order}/refunds", control(open_refund, status=201), methods=["POST"]),
        Route(refund, control(get_refund), methods=["GET"]),
        Route(f"{refund}/resolve", control(resolve_refund), methods=["POST"]),
        Route(f"{p}/scenario", control(run_scenario), methods=["POST"]),
        Route(f"{p}/calls", control(get_calls), methods=["GET"]),
        Route(f"{p}/calls", control(reset_calls), methods=["DELETE"]),
        Route(f"{p}/faults", control(get_faults), methods=["GET"]),
        Route(f"{p}/faults", control(put_faults), methods=["PUT"]),
        Route(f"{p}/faults", control(clear_faults), methods=["DELETE"]),
        Route(f"{p}/delivery", control(get_delivery), methods=["GET"]),
        Route(f"{p}/delivery", control(patch_delivery), methods=["PATCH"]),
        Route(f"{p}/upstream", control(get_upstream), methods=["GET"]),
        Route(f"{p}/upstream", control(patch_upstream), methods=["PATCH"]),
        Route(f"{p}/callbacks", control(get_callbacks), methods=["GET"]),
        Route(f"{p}/callbacks/drain", control(drain_callbacks), methods=["POST"]),
        Route(f"{p}/reset", control(reset), methods=["POST"]),
    ]


def create_sandbox_app(settings: SandboxSettings | None = None) -> Starlette:
    """The sandbox app; with no settings, read them from the environment."""
    settings = settings or load_sandbox_settings()
    state = SandboxState.build(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.deliverer.start()
        if settings.scenario_orders:
            scenario.generate(
                state.world, state.scenario_rng, settings.scenario_orders, settings.scenario_steps
            )
        try:
            yield
        finally:
            await state.deliverer.aclose()

    app = Starlette(routes=control_routes(), lifespan=lifespan)
    # The upstream side is the router's fallback, not fixed routes: where each endpoint is
    # served can change at runtime (PATCH /_sandbox/upstream).
    app.router.default = upstream_app
    app.state.sandbox = state
    return app
