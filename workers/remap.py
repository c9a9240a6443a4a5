"""``pandasync remap``: derive the ledger again from the payloads it already stores.

After a mapping change (a status learned, a field name corrected: ``service/pandapon/mapping.py``)
the normalized columns of orders already synced are still what the old mapping made of them.
Remap maps each order's stored payloads again (``orders.raw``, each parcel's ``shipments.raw``
with its events' ``raw``, ``refunds.raw``), with no upstream call, and writes the result through
the reconcile's own write with ``rederived=True``, unless the order's rows already hold what
the current mapping derives (``already_derived``: the usual case, written nothing):

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BindParameter, RowMapping, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.domain import OrderStatus, Platform, RefundStatus, SyncSource, UnmappedField
from service.ledger.models import Order, OrderLine, Refund, Shipment, ShipmentEvent, UnmappedValue
from service.ledger.write import (
    OrderTruth,
    line_values,
    order_values,
    refund_values,
    shipment_values,
    summary_of,
    trusted,
    write_order,
)
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
    """Counts so far; ``rewritten`` orders held something the mapping now derives otherwise
    (written again), of which ``changed`` got a status or price change (history written)."""

    examined: int = 0
    rewritten: int = 0
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
    select(Order.__table__)
    .where(Order.id > bindparam("after"))
    .order_by(Order.id)
    .limit(bindparam("limit"))
)
_ORDERS_OF_PLATFORM = _ORDERS.where(Order.platform == bindparam("platform"))
_of_orders: BindParameter[int] = bindparam("order_pks", expanding=True)
_LINES = select(*(c for c in OrderLine.__table__.columns if c.name != "raw")).where(
    OrderLine.order_pk.in_(_of_orders)
)
_SHIPMENTS = select(Shipment.__table__).where(Shipment.order_pk.in_(_of_orders))
_EVENTS = (
    select(ShipmentEvent.shipment_id, ShipmentEvent.event_key, ShipmentEvent.raw)
    .where(ShipmentEvent.shipment_id.in_(bindparam("shipment_ids", expanding=True)))
    .order_by(ShipmentEvent.id)
)
_REFUNDS = select(Refund.__table__).where(Refund.order_pk.in_(_of_orders)).order_by(Refund.id)


@dataclass(frozen=True, slots=True)
class _Parcel:
    row: RowMapping  # the shipments row
    event_keys: frozenset[str]
    event_raws: Sequence[Any]


@dataclass(frozen=True, slots=True)
class _Stored:
    """One order's stored rows: its payloads, and what the last write derived from them."""

    row: RowMapping  # the orders row
    lines: Mapping[str, RowMapping]  # by line_id
    parcels: Sequence[_Parcel]
    refunds: Sequence[RowMapping]

    @property
    def pk(self) -> int:
        return int(self.row["id"])

    @property
    def account_id(self) -> str:
        return str(self.row["account_id"])

    @property
    def platform(self) -> Platform:
        return Platform(self.row["platform"])

    @property
    def order_id(self) -> str:
        return str(self.row["order_id"])


async def _load_batch(
    session: AsyncSession, after: int, limit: int, platform: Platform | None
) -> list[_Stored]:
    params: dict[str, Any] = {"after": after, "limit": limit}
    statement = _ORDERS
    if platform is not None:
        statement, params["platform"] = _ORDERS_OF_PLATFORM, platform
    orders = (await session.execute(statement, params)).mappings().all()
    if not orders:
        return []
    pks = {"order_pks": [o["id"] for o in orders]}
    lines: dict[int, dict[str, RowMapping]] = defaultdict(dict)
    for line in (await session.execute(_LINES, pks)).mappings():
        lines[line["order_pk"]][line["line_id"]] = line
    shipments = (await session.execute(_SHIPMENTS, pks)).mappings().all()
    events: dict[int, list[Any]] = defaultdict(list)
    if shipments:
        ids = {"shipment_ids": [s["id"] for s in shipments]}
        for event in (await session.execute(_EVENTS, ids)).all():
            events[event.shipment_id].append(event)
    parcels: dict[int, list[_Parcel]] = defaultdict(list)
    for s in shipments:
        kept = events[s["id"]]
        parcels[s["order_pk"]].append(
            _Parcel(s, frozenset(e.event_key for e in kept), [e.raw for e in kept])
        )
    refunds: dict[int, list[RowMapping]] = defaultdict(list)
    for refund in (await session.execute(_REFUNDS, pks)).mappings():
        refunds[refund["order_pk"]].append(refund)
    return [_Stored(o, lines[o["id"]], parcels[o["id"]], refunds[o["id"]]) for o in orders]


def rederive(stored: _Stored) -> OrderTruth:
    """The truth the current mapping makes of an order's stored payloads; MalformedResponse
    when it cannot read them."""
    order = mapping.map_order(stored.platform, stored.row["raw"])
    if order.order_id != stored.order_id:
        raise MalformedResponse(f"the payload names order {order.order_id}, not this order")
    shipments: list[ShipmentSnapshot] = []
    for parcel in stored.parcels:
        shipments.extend(
            mapping.map_stored_shipment(
                stored.platform, parcel.row["raw"], parcel.event_raws, parcel.row["line_id"]
            )
        )
    refunds: list[RefundSnapshot] = [
        mapping.map_refund(stored.platform, r["raw"]) for r in stored.refunds
    ]
    return OrderTruth(order, shipments, refunds, fetched_at=stored.row["snapshot_at"])


# Stored as they came: a write of a re-derived truth puts back the same payloads.
_PAYLOAD_COLUMNS = frozenset({"raw", "snapshot_at"})


def _holds(row: RowMapping | None, values: Mapping[str, Any]) -> bool:
    """True when ``row`` already holds every derived value of ``values``."""
    return row is not None and all(
        row[name] == value for name, value in values.items() if name not in _PAYLOAD_COLUMNS
    )


def already_derived(stored: _Stored, truth: OrderTruth) -> bool:
    """True when writing ``truth`` would leave every row of the order as it is: the order's
    columns, each line, parcel (and its events) and refund of the truth, and the summary the
    write computes over all of them. Such an order is not written (no lock, no statements)."""
    if not _holds(stored.row, order_values(stored.account_id, truth)):
        return False
    if not all(
        _holds(stored.lines.get(line.line_id), line_values(line)) for line in truth.order.lines
    ):
        return False
    parcels = {p.row["tracking_number"]: p for p in stored.parcels}
    for shipment in truth.shipments:
        parcel = parcels.get(shipment.tracking_number)
        if parcel is None or not _holds(parcel.row, shipment_values(shipment)):
            return False
        if not {e.event_key for e in shipment.events} <= parcel.event_keys:
            return False
    refunds = {r["refund_id"]: r for r in stored.refunds}
    for refund in truth.refunds:
        if not _holds(refunds.get(refund.refund_id), refund_values(refund)):
            return False
    summary = summary_of(
        truth,
        [(r["status"], r["amount"]) for r in stored.refunds],
        [(p.row["first_event_at"], p.row["delivered_at"]) for p in stored.parcels],
    )
    return _holds(stored.row, summary)


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
    truth, _ = trusted(truth)  # as the write will see it
    if already_derived(stored, truth):
        return
    progress.rewritten += 1
    result = await write_order(
        session, stored.account_id, truth, source=SyncSource.REMAP, rederived=True
    )
    if result.stale:
        progress.newer += 1
    elif result.status_changed or result.price_changed:
        progress.changed += 1
        progress.status_changed += result.status_changed
        progress.price_changed += result.price_changed
