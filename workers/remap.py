"""``pandasync remap``: derive the ledger again from the payloads it already stores.

After a mapping change (a status learned, a field name corrected: ``service/pandapon/mapping.py``)
the normalized columns of orders already synced are still what the old mapping made of them.
Remap maps each order's stored payloads again (``orders.raw``, each parcel's ``shipments.raw``
with its events' ``raw``, ``refunds.raw``), with no upstream call, and writes the result through
the reconcile's own write with ``rederived=True``:

- history is appended only for real changes (source ``remap``), so a second run writes none;
- the re-derived truth is versioned as the snapshot it came from: an order a worker synced
  while remap ran keeps the newer truth (counted as ``newer``); remap is safe beside workers;
- ``last_synced_at`` stays and the inbox is not touched: nothing was fetched;
- the statuses in ``unmapped_values`` that the mapping now places are removed at the end (they
  are no longer unmapped); message types stay, as messages are not derived again.

Orders go in batches of ``batch_size`` by primary key (keyset pagination: memory stays flat
whatever the ledger's size), one transaction per batch. A payload the current mapping cannot
read is left as it is and reported (``unreadable``); the run goes on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.ledger.models import (
    Order,
    OrderStatus,
    Platform,
    Refund,
    RefundStatus,
    Shipment,
    ShipmentEvent,
    SyncSource,
    UnmappedField,
    UnmappedValue,
)
from service.ledger.write import OrderTruth, write_order
from service.pandapon import mapping
from service.pandapon.errors import MalformedResponse
from service.pandapon.models import RefundSnapshot, ShipmentSnapshot

DEFAULT_BATCH_SIZE = 500
# The orders whose payloads could not be read that a report names (the count is complete).
UNREADABLE_SHOWN = 20


@dataclass(frozen=True, slots=True)
class Unreadable:
    platform: Platform
    order_id: str
    error: str


@dataclass
class RemapProgress:
    """Counts so far; ``changed`` orders got a status or price change (history written)."""

    examined: int = 0
    changed: int = 0
    status_changed: int = 0
    price_changed: int = 0
    newer: int = 0
    unreadable: int = 0
    unreadable_orders: list[Unreadable] = field(default_factory=list)
    placed: int = 0  # unmapped values the mapping now places, removed at the end

    @property
    def unchanged(self) -> int:
        return self.examined - self.changed - self.newer - self.unreadable


_ORDERS = (
    select(Order.id, Order.account_id, Order.platform, Order.order_id, Order.raw, Order.snapshot_at)
    .where(Order.id > bindparam("after"))
    .order_by(Order.id)
    .limit(bindparam("limit"))
)
_ORDERS_OF_PLATFORM = _ORDERS.where(Order.platform == bindparam("platform"))
_SHIPMENTS = select(Shipment.id, Shipment.order_pk, Shipment.line_id, Shipment.raw).where(
    Shipment.order_pk.in_(bindparam("order_pks", expanding=True))
)
_EVENTS = (
    select(ShipmentEvent.shipment_id, ShipmentEvent.raw)
    .where(ShipmentEvent.shipment_id.in_(bindparam("shipment_ids", expanding=True)))
    .order_by(ShipmentEvent.id)
)
_REFUNDS = (
    select(Refund.order_pk, Refund.raw)
    .where(Refund.order_pk.in_(bindparam("order_pks", expanding=True)))
    .order_by(Refund.id)
)


@dataclass(frozen=True, slots=True)
class _Stored:
    """One order's stored payloads."""

    pk: int
    account_id: str
    platform: Platform
    order_id: str
    raw: Any
    snapshot_at: Any
    parcels: Sequence[tuple[str | None, Any, Sequence[Any]]]  # (line_id, raw, event raws)
    refunds: Sequence[Any]


async def _load_batch(
    session: AsyncSession, after: int, limit: int, platform: Platform | None
) -> list[_Stored]:
    params: dict[str, Any] = {"after": after, "limit": limit}
    statement = _ORDERS
    if platform is not None:
        statement, params["platform"] = _ORDERS_OF_PLATFORM, platform
    orders = (await session.execute(statement, params)).all()
    if not orders:
        return []
    pks = [o.id for o in orders]
    shipments = (await session.execute(_SHIPMENTS, {"order_pks": pks})).all()
    events: dict[int, list[Any]] = defaultdict(list)
    if shipments:
        ids = [s.id for s in shipments]
        for event in (await session.execute(_EVENTS, {"shipment_ids": ids})).all():
            events[event.shipment_id].append(event.raw)
    parcels: dict[int, list[tuple[str | None, Any, Sequence[Any]]]] = defaultdict(list)
    for s in shipments:
        parcels[s.order_pk].append((s.line_id, s.raw, events[s.id]))
    refunds: dict[int, list[Any]] = defaultdict(list)
    for refund in (await session.execute(_REFUNDS, {"order_pks": pks})).all():
        refunds[refund.order_pk].append(refund.raw)
    return [
        _Stored(
            o.id,
            o.account_id,
            o.platform,
            o.order_id,
            o.raw,
            o.snapshot_at,
            parcels[o.id],
            refunds[o.id],
        )
        for o in orders
    ]


def rederive(stored: _Stored) -> OrderTruth:
    """The truth the current mapping makes of an order's stored payloads; MalformedResponse
    when it cannot read them."""
    order = mapping.map_order(stored.platform, stored.raw)
    if order.order_id != stored.order_id:
        raise MalformedResponse(f"the payload names order {order.order_id}, not this order")
    shipments: list[ShipmentSnapshot] = []
    for line_id, parcel_raw, event_raws in stored.parcels:
        shipments.extend(
            mapping.map_stored_shipment(stored.platform, parcel_raw, event_raws, line_id)
        )
    refunds: list[RefundSnapshot] = [mapping.map_refund(stored.platform, r) for r in stored.refunds]
    return OrderTruth(order, shipments, refunds, fetched_at=stored.snapshot_at)


async def remap(
    sessions: async_sessionmaker[AsyncSession],
    *,
    platform: Platform | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[RemapProgress], Awaitable[None] | None] | None = None,
) -> RemapProgress:
    """Remap every order (of ``platform``), batch by batch; ``on_batch`` after each commit."""
    progress = RemapProgress()
    after = 0
    while True:
        async with session_scope(sessions) as session:
            batch = await _load_batch(session, after, batch_size, platform)
            if not batch:
                break
            for stored in batch:
                await _remap_one(session, stored, progress)
            after = batch[-1].pk
        if on_batch is not None:
            result = on_batch(progress)
            if result is not None:
                await result
    async with session_scope(sessions) as session:
        progress.placed = await forget_placed_values(session, platform)
    return progress


def _placed(platform: Platform, field_: UnmappedField, value: str) -> bool:
    """True when the current mapping places ``value`` (a status of ``field_``)."""
    if field_ is UnmappedField.ORDER_STATUS:
        return mapping.order_status(platform, value) is not OrderStatus.UNKNOWN
    if field_ is UnmappedField.REFUND_STATUS:
        return mapping.refund_status(platform, value) is not RefundStatus.UNKNOWN
    if field_ is UnmappedField.PARCEL_STATUS:
        return mapping.parcel_status_known(platform, value)
    return False


_STATUS_VALUES = select(
    UnmappedValue.id, UnmappedValue.platform, UnmappedValue.field, UnmappedValue.value
).where(UnmappedValue.field != UnmappedField.MESSAGE_TYPE, UnmappedValue.platform.is_not(None))
_FORGET = delete(UnmappedValue).where(UnmappedValue.id.in_(bindparam("ids", expanding=True)))


async def forget_placed_values(session: AsyncSession, platform: Platform | None) -> int:
    """Remove the statuses of ``unmapped_values`` that the mapping now places; how many."""
    statement = _STATUS_VALUES
    if platform is not None:
        statement = statement.where(UnmappedValue.platform == platform)
    rows = (await session.execute(statement)).all()
    ids = [r.id for r in rows if _placed(r.platform, r.field, r.value)]
    if ids:
        await session.execute(_FORGET, {"ids": ids})
    return len(ids)


async def _remap_one(session: AsyncSession, stored: _Stored, progress: RemapProgress) -> None:
    progress.examined += 1
    try:
        truth = rederive(stored)
    except MalformedResponse as error:
        progress.unreadable += 1
        if len(progress.unreadable_orders) < UNREADABLE_SHOWN:
            progress.unreadable_orders.append(
                Unreadable(stored.platform, stored.order_id, error.message)
            )
        return
    result = await write_order(
        session, stored.account_id, truth, source=SyncSource.REMAP, rederived=True
    )
    if result.stale:
        progress.newer += 1
    elif result.status_changed or result.price_changed:
        progress.changed += 1
        progress.status_changed += result.status_changed
        progress.price_changed += result.price_changed
