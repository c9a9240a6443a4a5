"""What a reconcile would fetch and map for a sandbox order, without the sockets in between.

The sandbox renders the order as PandaPon answers (either spelling), the JSON goes over the
wire (decimals as ``Decimal``), and the client's mapping reads it: the same truth a reconcile
writes, for tests and benchmarks that fill a ledger fast.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from service.ledger.models import Platform
from service.ledger.write import OrderTruth
from service.pandapon import mapping
from service.pandapon.models import ShipmentSnapshot
from service.sandbox import render
from service.sandbox.world import WorldOrder


def over_the_wire(data: Any) -> Any:
    return mapping.parse_json(json.dumps(data, ensure_ascii=False))


def truth_of(order: WorldOrder, case: render.PayloadCase, *, fetched_at: datetime) -> OrderTruth:
    platform = order.platform
    snapshot = mapping.map_order(platform, over_the_wire(render.order_data(order, case)))
    shipments: list[ShipmentSnapshot] = []
    if platform is Platform.TAOBAO:
        seen: dict[str, ShipmentSnapshot] = {}
        for line in order.lines:
            data = over_the_wire(render.logistics_data(order, line, case))
            for parcel in mapping.map_shipments(platform, data, line.line_id):
                seen.setdefault(parcel.tracking_number, parcel)
        shipments = list(seen.values())
    else:
        shipments = mapping.map_shipments(platform, over_the_wire(render.logistics_data(order)))
    refunds = [
        mapping.map_refund(platform, over_the_wire(render.refund_data(r, case, order)))
        for r in order.refunds
    ]
    return OrderTruth(snapshot, shipments, refunds, fetched_at=fetched_at)
