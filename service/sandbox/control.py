"""The control side of the sandbox, under ``/_sandbox/``: drive the world, set faults, delivery,
the upstream variant and how payments answer, read call counts, callbacks and the ground truth
(docs/sandbox.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
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
    BadRequest,
    M,
    PaymentBehaviour,
    SandboxState,
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


def control(
    handler: ControlHandler, *, status: int = 200
) -> Callable[[Request], Awaitable[Response]]:
    """A control endpoint: JSON in, JSON out, world errors as 4xx with a reason."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request, state_of(request))
        except BadRequest as error:
            return json_error(400, str(error))
        except WorldError as error:
            return json_error(error.status, str(error))
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
                "action": e.action,
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
        # The payment actions apart: endpoint -> order id -> calls that named it.
        "payments": {name: dict(c) for name, c in state.payment_calls.items()},
        "payment_outcomes": {name: dict(c) for name, c in state.payment_outcomes.items()},
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


async def get_payments(request: Request, state: SandboxState) -> Any:
    return {"payments": state.payments.model_dump(), "protocol_paid": state.protocol_paid}


async def put_payments(request: Request, state: SandboxState) -> Any:
    state.payments = await _body(request, PaymentBehaviour)
    return await get_payments(request, state)


async def reset_payments(request: Request, state: SandboxState) -> Any:
    state.reset_payments()
    return await get_payments(request, state)


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
    state.reset_payments()
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
        Route(f"{p}/payments", control(get_payments), methods=["GET"]),
        Route(f"{p}/payments", control(put_payments), methods=["PUT"]),
        Route(f"{p}/payments", control(reset_payments), methods=["DELETE"]),
        Route(f"{p}/delivery", control(get_delivery), methods=["GET"]),
        Route(f"{p}/delivery", control(patch_delivery), methods=["PATCH"]),
        Route(f"{p}/upstream", control(get_upstream), methods=["GET"]),
        Route(f"{p}/upstream", control(patch_upstream), methods=["PATCH"]),
        Route(f"{p}/callbacks", control(get_callbacks), methods=["GET"]),
        Route(f"{p}/callbacks/drain", control(drain_callbacks), methods=["POST"]),
        Route(f"{p}/reset", control(reset), methods=["POST"]),
    ]
