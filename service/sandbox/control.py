"""The control side of the sandbox, under ``/_sandbox/``: drive the world, set faults, delivery,
the upstream variant and how payments answer, read call counts, callbacks and the ground truth
(docs/sandbox.md).

A call on one account's world (orders, refunds, scenario, faults, payments, delivery) takes
``?account=USER_ID`` (``on_account``; default: the first account); the observations and resets
of the whole sandbox (index, health, calls, callbacks, drain, reset) cover every account unless
``account`` names one; the upstream variant is the host's (``host_wide``).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.domain import Platform, RefundStatus
from service.sandbox import render, scenario
from service.sandbox.settings import (
    CONTROL_PREFIX,
    DeliverySettings,
    FaultSpec,
    UpstreamVariant,
    check_fault_keys,
)
from service.sandbox.state import (
    UNROUTED,
    AccountWorld,
    BadRequest,
    M,
    PaymentBehaviour,
    SandboxState,
    UnknownAccount,
    json_error,
    state_of,
)
from service.sandbox.world import (
    NewEvent,
    NewLine,
    WorldError,
    WorldOrder,
    refund_truth,
)

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


ControlHandler = Callable[[Request, SandboxState], Awaitable[Any]]
AccountHandler = Callable[[Request, AccountWorld], Awaitable[Any]]
ACCOUNT_PARAM = "account"


def control(
    handler: ControlHandler, *, status: int = 200
) -> Callable[[Request], Awaitable[Response]]:
    """A control endpoint: JSON in, JSON out, world errors as 4xx with a reason."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request, state_of(request))
        except BadRequest as error:
            return json_error(400, str(error))
        except UnknownAccount as error:
            return json_error(404, str(error))
        except WorldError as error:
            return json_error(error.status, str(error))
        return JSONResponse(result, status_code=status)

    endpoint.__name__ = handler.__name__
    return endpoint


def _account_param(request: Request) -> str | None:
    return request.query_params.get(ACCOUNT_PARAM)


def on_account(handler: AccountHandler) -> ControlHandler:
    """A control call on one account's world: the one ``?account=USER_ID`` names, else the
    default (first) account."""

    async def call(request: Request, state: SandboxState) -> Any:
        return await handler(request, state.account(_account_param(request)))

    call.__name__ = handler.__name__
    return call


def host_wide(handler: ControlHandler) -> ControlHandler:
    """A control call on what every account shares (the upstream variant): ``account`` would
    mislead, so it is refused."""

    async def call(request: Request, state: SandboxState) -> Any:
        if _account_param(request) is not None:
            raise BadRequest(
                f"the upstream variant is the whole sandbox's, shared by every account: "
                f"drop ?{ACCOUNT_PARAM}="
            )
        return await handler(request, state)

    call.__name__ = handler.__name__
    return call


def _platform(request: Request) -> Platform:
    value = request.path_params["platform"]
    try:
        return Platform(value)
    except ValueError:
        raise BadRequest("platform must be taobao or 1688") from None


def _order(request: Request, account: AccountWorld) -> WorldOrder:
    return account.world.order(_platform(request), request.path_params["order_id"])


def _new_event(event: EventIn) -> NewEvent:
    return NewEvent(event.description, event.status, event.location, event.at)


def _account_summary(account: AccountWorld) -> dict[str, Any]:
    return {
        "user_id": account.user_id,
        "access_key": account.credentials.access_key,
        "callback_url": account.deliverer.settings.webhook_url,
        "orders": len(account.world.orders()),
    }


async def index(request: Request, state: SandboxState) -> Any:
    """Credentials (no secret) of the account addressed (default: the first) and of every
    account, the upstream variant, and the endpoints where they are served."""
    account = state.account(_account_param(request))
    return {
        "sandbox": "PandaPon emulator; see docs/sandbox.md",
        "access_key": account.credentials.access_key,
        "user_id": account.user_id,
        "accounts": [_account_summary(a) for a in state.accounts.values()],
        "timestamp_unit": state.timestamp_unit,
        "upstream": state.upstream.model_dump(),
        "endpoints": [
            {
                "name": e.name,
                "method": e.method,
                "path": e.path,
                "params": dict(e.params),
                "documented": e.documented,
                "action": e.action,
            }
            for e in state.served
        ],
    }


async def health(request: Request, state: SandboxState) -> Any:
    accounts = state.selected(_account_param(request))
    return {"status": "ok", "orders": sum(len(a.world.orders()) for a in accounts)}


async def create_order(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, OrderIn)
    order = account.world.create_order(
        data.platform,
        [NewLine(x.title, x.quantity, x.unit_price, x.product_id, x.sku_id) for x in data.lines],
        shipping_fee=data.shipping_fee,
        order_id=data.order_id,
        currency=data.currency.upper(),
    )
    return {"order": order.truth()}


async def list_orders(request: Request, account: AccountWorld) -> Any:
    value = request.query_params.get("platform")
    try:
        platform = Platform(value) if value else None
    except ValueError:
        raise BadRequest("platform must be taobao or 1688") from None
    return {"orders": [o.truth() for o in account.world.orders(platform)]}


async def get_order(request: Request, account: AccountWorld) -> Any:
    return {"order": _order(request, account).truth()}


async def pay(request: Request, account: AccountWorld) -> Any:
    order = _order(request, account)
    account.world.pay(order)
    return {"order": order.truth()}


async def change_price(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, PriceIn)
    order = _order(request, account)
    account.world.change_price(
        order, total_amount=data.total_amount, shipping_fee=data.shipping_fee
    )
    return {"order": order.truth()}


async def ship(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, ShipIn)
    order = _order(request, account)
    shipment = account.world.ship(
        order,
        tracking_number=data.tracking_number,
        carrier=data.carrier,
        carrier_code=data.carrier_code,
        line_ids=data.line_ids,
        events=[_new_event(e) for e in data.events],
    )
    return {"order": order.truth(), "tracking_number": shipment.tracking_number}


async def add_event(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, EventIn)
    order = _order(request, account)
    account.world.add_event(order, request.path_params["tracking_number"], _new_event(data))
    return {"order": order.truth()}


async def deliver(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, DeliverIn)
    order = _order(request, account)
    shipment = account.world.deliver(order, data.tracking_number)
    return {"order": order.truth(), "tracking_number": shipment.tracking_number}


async def confirm(request: Request, account: AccountWorld) -> Any:
    order = _order(request, account)
    account.world.confirm(order)
    return {"order": order.truth()}


async def cancel(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, CancelIn)
    order = _order(request, account)
    account.world.cancel(order, data.reason)
    return {"order": order.truth()}


async def open_refund(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, RefundIn)
    order = _order(request, account)
    refund = account.world.open_refund(order, data.amount, line_id=data.line_id, reason=data.reason)
    return {"order": order.truth(), "refund": refund_truth(refund)}


async def get_refund(request: Request, account: AccountWorld) -> Any:
    refund = account.world.refund(_platform(request), request.path_params["refund_id"])
    return {"refund": refund_truth(refund)}


async def set_raw_status(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, RawStatusIn)
    order = _order(request, account)
    account.world.set_raw_status(order, data.raw_status)
    return {"order": order.truth(), "raw_status": render.raw_order_status(order)}


async def resolve_refund(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, ResolveIn)
    refund = account.world.refund(_platform(request), request.path_params["refund_id"])
    account.world.resolve_refund(refund, RefundStatus(data.outcome))
    order = account.world.order(refund.platform, refund.order_id)
    return {"order": order.truth(), "refund": refund_truth(refund)}


async def run_scenario(request: Request, account: AccountWorld) -> Any:
    data = await _body(request, ScenarioIn)
    seeded = data.seed is not None
    rng = random.Random(f"{data.seed}:scenario") if seeded else account.scenario_rng
    created = scenario.generate(account.world, rng, data.orders, data.steps)
    advanced = scenario.advance(account.world, rng, data.advance)
    return {
        "created": [{"platform": o.platform.value, "order_id": o.order_id} for o in created],
        "advanced": advanced,
    }


def _summed(counters: Iterable[Mapping[str, Counter[str]]]) -> dict[str, Counter[str]]:
    """Endpoint -> counts, added up over several accounts' maps."""
    total: dict[str, Counter[str]] = {}
    for by_name in counters:
        for name, counts in by_name.items():
            total.setdefault(name, Counter()).update(counts)
    return total


async def get_calls(request: Request, state: SandboxState) -> Any:
    """The call counts of the account ``?account=`` names, else of every account added up."""
    user_id = _account_param(request)
    accounts = state.selected(user_id)
    calls = _summed(a.calls for a in accounts)
    outcomes = {name: dict(c) for name, c in calls.items()}
    # Only once a request missed every route, so the usual shape stays; no account knows of it.
    if state.unrouted and user_id is None:
        outcomes[UNROUTED] = dict(state.unrouted)
    return {
        "calls": {name: sum(c.values()) for name, c in calls.items()},
        "outcomes": outcomes,
        # The payment actions apart: endpoint -> order id -> calls that named it.
        "payments": {
            name: dict(c) for name, c in _summed(a.payment_calls for a in accounts).items()
        },
        "payment_outcomes": {
            name: dict(c) for name, c in _summed(a.payment_outcomes for a in accounts).items()
        },
    }


async def reset_calls(request: Request, state: SandboxState) -> Any:
    user_id = _account_param(request)
    for account in state.selected(user_id):
        account.reset_calls()
    if user_id is None:
        state.unrouted = Counter()
    return await get_calls(request, state)


async def get_faults(request: Request, account: AccountWorld) -> Any:
    return {"faults": {k: v.model_dump() for k, v in account.faults.items()}}


async def put_faults(request: Request, account: AccountWorld) -> Any:
    try:
        faults = check_fault_keys(_FAULTS.validate_json(await request.body() or b"{}"))
    except (ValidationError, ValueError) as error:
        message = _describe(error) if isinstance(error, ValidationError) else str(error)
        raise BadRequest(message) from None
    account.faults = faults
    return await get_faults(request, account)


async def clear_faults(request: Request, account: AccountWorld) -> Any:
    account.faults = {}
    return await get_faults(request, account)


async def get_payments(request: Request, account: AccountWorld) -> Any:
    return {"payments": account.payments.model_dump(), "protocol_paid": account.protocol_paid}


async def put_payments(request: Request, account: AccountWorld) -> Any:
    account.payments = await _body(request, PaymentBehaviour)
    return await get_payments(request, account)


async def reset_payments(request: Request, account: AccountWorld) -> Any:
    account.reset_payments()
    return await get_payments(request, account)


async def get_delivery(request: Request, account: AccountWorld) -> Any:
    return {"delivery": account.deliverer.settings.model_dump()}


async def patch_delivery(request: Request, account: AccountWorld) -> Any:
    try:
        patch = json.loads(await request.body() or b"{}")
        if not isinstance(patch, dict):
            raise BadRequest("the body must be a JSON object")
        merged = {**account.deliverer.settings.model_dump(), **patch}
        account.deliverer.configure(DeliverySettings.model_validate(merged))
    except ValueError as error:
        if isinstance(error, ValidationError):
            raise BadRequest(_describe(error)) from None
        raise BadRequest("the body is not JSON") from None
    return await get_delivery(request, account)


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


def _delivery_stats(accounts: Sequence[AccountWorld]) -> dict[str, Any]:
    """The deliverers' stats added up (one account: its own, as they are)."""
    every = [account.deliverer.stats() for account in accounts]
    states: Counter[str] = Counter()
    for stats in every:
        states.update(stats["states"])
    return {
        "states": {k: v for k, v in states.items() if v},
        "pending": sum(stats["pending"] for stats in every),
        "in_flight": sum(stats["in_flight"] for stats in every),
        # the first message held back (one account: its own, or None)
        "held": next((stats["held"] for stats in every if stats["held"] is not None), None),
    }


async def get_callbacks(request: Request, state: SandboxState) -> Any:
    """The callbacks of the account ``?account=`` names, else of every account (each record
    says whose, ``account``), the latest ``limit`` by id."""
    with_body = request.query_params.get("with_body") in ("1", "true", "yes")
    try:
        limit = max(0, int(request.query_params.get("limit", "1000")))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    accounts = state.selected(_account_param(request))
    records = sorted(
        (r for a in accounts for r in a.deliverer.records(with_body=with_body, limit=limit)),
        key=lambda record: int(record["id"]),
    )
    return {**_delivery_stats(accounts), "records": records[-limit:] if limit else []}


async def drain_callbacks(request: Request, state: SandboxState) -> Any:
    data = await _body(request, DrainIn)
    accounts = state.selected(_account_param(request))
    drained = await asyncio.gather(*(a.deliverer.drain(data.within_s) for a in accounts))
    return {"drained": all(drained), **_delivery_stats(accounts)}


async def reset(request: Request, state: SandboxState) -> Any:
    """Back to the start for the account ``?account=`` names (its world, counts, payments and
    faults), else for every account and the host (the upstream variant, unrouted counts)."""
    user_id = _account_param(request)
    for account in state.selected(user_id):
        account.reset_world()
        account.reset_calls()
        account.reset_payments()
        account.reset_faults()
    if user_id is None:
        state.unrouted = Counter()
        state.set_upstream(state.settings.upstream)
    return {"status": "reset"}


def control_routes() -> list[BaseRoute]:
    p = CONTROL_PREFIX
    order = f"{p}/orders/{{platform}}/{{order_id}}"
    refund = f"{p}/refunds/{{platform}}/{{refund_id}}"
    return [
        Route(p, control(index), methods=["GET"]),
        Route(f"{p}/health", control(health), methods=["GET"]),
        Route(f"{p}/orders", control(on_account(create_order), status=201), methods=["POST"]),
        Route(f"{p}/orders", control(on_account(list_orders)), methods=["GET"]),
        Route(order, control(on_account(get_order)), methods=["GET"]),
        Route(f"{order}/pay", control(on_account(pay)), methods=["POST"]),
        Route(f"{order}/price", control(on_account(change_price)), methods=["POST"]),
        Route(f"{order}/ship", control(on_account(ship)), methods=["POST"]),
        Route(
            f"{order}/shipments/{{tracking_number}}/events",
            control(on_account(add_event)),
            methods=["POST"],
        ),
        Route(f"{order}/deliver", control(on_account(deliver)), methods=["POST"]),
        Route(f"{order}/confirm", control(on_account(confirm)), methods=["POST"]),
        Route(f"{order}/cancel", control(on_account(cancel)), methods=["POST"]),
        Route(f"{order}/raw-status", control(on_account(set_raw_status)), methods=["POST"]),
        Route(f"{order}/refunds", control(on_account(open_refund), status=201), methods=["POST"]),
        Route(refund, control(on_account(get_refund)), methods=["GET"]),
        Route(f"{refund}/resolve", control(on_account(resolve_refund)), methods=["POST"]),
        Route(f"{p}/scenario", control(on_account(run_scenario)), methods=["POST"]),
        Route(f"{p}/calls", control(get_calls), methods=["GET"]),
        Route(f"{p}/calls", control(reset_calls), methods=["DELETE"]),
        Route(f"{p}/faults", control(on_account(get_faults)), methods=["GET"]),
        Route(f"{p}/faults", control(on_account(put_faults)), methods=["PUT"]),
        Route(f"{p}/faults", control(on_account(clear_faults)), methods=["DELETE"]),
        Route(f"{p}/payments", control(on_account(get_payments)), methods=["GET"]),
        Route(f"{p}/payments", control(on_account(put_payments)), methods=["PUT"]),
        Route(f"{p}/payments", control(on_account(reset_payments)), methods=["DELETE"]),
        Route(f"{p}/delivery", control(on_account(get_delivery)), methods=["GET"]),
        Route(f"{p}/delivery", control(on_account(patch_delivery)), methods=["PATCH"]),
        Route(f"{p}/upstream", control(host_wide(get_upstream)), methods=["GET"]),
        Route(f"{p}/upstream", control(host_wide(patch_upstream)), methods=["PATCH"]),
        Route(f"{p}/callbacks", control(get_callbacks), methods=["GET"]),
        Route(f"{p}/callbacks/drain", control(drain_callbacks), methods=["POST"]),
        Route(f"{p}/reset", control(reset), methods=["POST"]),
    ]
