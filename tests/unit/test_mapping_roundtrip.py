"""The sandbox's rendering and the client's mapping agree, for any order a scenario produces.

The two are written independently from docs/upstream.md (neutral → payload in
``service.sandbox.render``, payload → neutral in ``service.pandapon.mapping``), so an order that
survives render → JSON → mapping unchanged is evidence both read the contract the same way. Both
spellings: the contract's camelCase and the evidence's snake_case ([TG]).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ledger.models import Platform, RefundStatus
from service.pandapon import mapping
from service.sandbox import render, scenario
from service.sandbox.render import PayloadCase
from service.sandbox.world import World, WorldOrder, WorldRefund

CASES: tuple[PayloadCase, ...] = ("camel", "snake")


def over_the_wire(data: Any) -> Any:
    return mapping.parse_json(json.dumps(data, ensure_ascii=False))


def knowable(refund: WorldRefund) -> RefundStatus:
    """1688 has no final refusal: a refused request (``waitbuyermodify``) is still open."""
    if refund.platform is Platform.ALIBABA_1688 and refund.status is RefundStatus.REJECTED:
        return RefundStatus.REQUESTED
    return refund.status


def check_order(order: WorldOrder, case: PayloadCase = "camel") -> None:
    snapshot = mapping.map_order(order.platform, over_the_wire(render.order_data(order, case)))
    taobao = order.platform is Platform.TAOBAO
    assert snapshot.order_id == order.order_id
    assert snapshot.status is order.status
    assert snapshot.total_amount == order.total_amount
    assert snapshot.product_amount == order.product_amount
    assert snapshot.shipping_fee == order.shipping_fee
    assert snapshot.discount_amount == (None if taobao else order.discount_amount)
    assert snapshot.created_at == order.created_at
    assert snapshot.modified_at == order.modified_at
    assert snapshot.paid_at == order.paid_at
    if not taobao:
        assert snapshot.shipped_at == order.shipped_at
        assert snapshot.completed_at == order.completed_at
        assert snapshot.close_reason == order.close_reason
    assert [ln.line_id for ln in snapshot.lines] == [ln.line_id for ln in order.lines]
    for got, want in zip(snapshot.lines, order.lines, strict=True):
        assert (got.title, got.quantity, got.amount) == (want.title, want.quantity, want.amount)
        assert got.unit_price == (None if taobao else want.unit_price)
        if taobao:
            parcel = order.shipment_for_line(want.line_id)
            assert got.has_tracking is (parcel is not None)
            assert got.tracking_number == (parcel.tracking_number if parcel else None)
    # Each line names its latest refund.
    latest = {r.line_id: r.refund_id for r in order.refunds if r.line_id is not None}
    named = (latest[line.line_id] for line in order.lines if line.line_id in latest)
    assert snapshot.refund_ids == tuple(dict.fromkeys(named))
    check_shipments(order, case)
    # [TG]'s nested record carries no time of its own; every other record does.
    timeless = taobao and case == "snake"
    for refund in order.refunds:
        data = over_the_wire(render.refund_data(refund, case, order))
        mapped = mapping.map_refund(order.platform, data)
        assert (mapped.refund_id, mapped.order_id) == (refund.refund_id, refund.order_id)
        assert (mapped.status, mapped.amount) == (knowable(refund), refund.amount)
        assert mapped.requested_at == (None if timeless else refund.requested_at)
        assert mapped.resolved_at == (None if timeless else refund.resolved_at)
        assert mapped.modified_at == (None if timeless else refund.modified_at)
        assert mapped.line_id == (refund.line_id if taobao else None)


def check_shipments(order: WorldOrder, case: PayloadCase = "camel") -> None:
    if order.platform is Platform.TAOBAO:
        seen: dict[str, Any] = {}
        for line in order.lines:
            data = over_the_wire(render.logistics_data(order, line, case))
            for shipment in mapping.map_shipments(order.platform, data, line.line_id):
                seen[shipment.tracking_number] = shipment
    else:
        data = over_the_wire(render.alibaba_logistics(order))
        seen = {s.tracking_number: s for s in mapping.map_shipments(order.platform, data)}
    assert set(seen) == {s.tracking_number for s in order.shipments}
    for parcel in order.shipments:
        mapped = seen[parcel.tracking_number]
        assert mapped.delivered is (parcel.delivered_at is not None)
        assert mapped.carrier == parcel.carrier
        taobao = order.platform is Platform.TAOBAO
        # [TG]'s parcels name the carrier (logistics_partner), not its code.
        assert mapped.carrier_code == (parcel.carrier_code if taobao and case == "camel" else None)
        if taobao:  # asked per sub-order: the parcel as seen from one of its lines
            assert mapped.line_id in parcel.line_ids
        else:
            assert mapped.line_id is None
        expected = sorted(parcel.events, key=lambda e: e.at)
        assert [(e.event_at, e.description) for e in mapped.events] == [
            (e.at, e.description) for e in expected
        ]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    steps=st.integers(min_value=0, max_value=8),
    case=st.sampled_from(CASES),
)
def test_rendered_orders_map_back_to_the_world(seed: int, steps: int, case: PayloadCase) -> None:
    world = World(
        seed=seed, clock=lambda: datetime.fromtimestamp(1_790_000_000 + seed % 10**6, UTC)
    )
    orders = scenario.generate(world, random.Random(seed), orders=8, steps=steps)
    for order in orders:
        check_order(order, case)


@pytest.mark.parametrize("case", CASES)
def test_a_long_scenario_reaches_every_neutral_state(case: PayloadCase) -> None:
    world, rng = World(seed=7), random.Random(7)
    orders = [o for steps in range(9) for o in scenario.generate(world, rng, 15, steps)]
    reached = {o.status for o in orders}
    assert len(reached) == 5  # pending, paid, shipped, completed, cancelled
    assert {r.status for o in orders for r in o.refunds} >= {"requested", "refunded", "rejected"}
    for order in orders:
        check_order(order, case)
