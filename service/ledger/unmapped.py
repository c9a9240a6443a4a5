"""Upstream values the mapping could not place, in plain sight.

PandaPon's vocabulary is partly a guess (docs/upstream.md#message-types, #statuses): an order,
refund or parcel status, or a message type, may come that the mapping does not know. Each one is

- counted in ``pandasync_unmapped_values_total{platform, field}`` (never the value as a
  label: PandaPon chooses the values, so they would make the series unbounded), once per
  snapshot or message carrying it;
- upserted into ``unmapped_values`` (one row per account, platform, field and value: first and
  last sight, how many snapshots or messages, the order it was last seen on).

Statuses are recorded by the reconcile, in the transaction of the order's ledger write
(``record_unmapped``, which never commits); message types by the inbox writer's batch
statement (``service.webhooks.inbox.STORE_BATCH``). Values are stored cleaned of NUL and cut
to the column's 128 characters, so an odd value can never fail the write that carries it.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import Counter as MetricCounter
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.ledger.models import (
    OrderStatus,
    Platform,
    RefundStatus,
    UnmappedField,
    UnmappedValue,
)
from service.ledger.write import OrderTruth
from service.pandapon import mapping

MAX_VALUE_LENGTH = 128  # unmapped_values.value
CONSTRAINT = "uq_unmapped_values_account_id_platform_field_value"
# The ``platform`` label of a message that names no platform.
NO_PLATFORM = "none"

# How many snapshots of one fetch carried each (field, value).
Found = Counter[tuple[UnmappedField, str]]

UNMAPPED = MetricCounter(
    "pandasync_unmapped_values_total",
    "Snapshots (order, refund, parcel) or stored messages carrying a value the mapping could "
    "not place, by platform and field; the values are in unmapped_values.",
    ["platform", "field"],
)
# Every series exists from the start, so increase() sees the first one.
_SERIES = {
    (platform, field): UNMAPPED.labels(platform=platform.value, field=field.value)
    for platform in Platform
    for field in UnmappedField
}
_MESSAGE_TYPE_WITHOUT_PLATFORM = UNMAPPED.labels(
    platform=NO_PLATFORM, field=UnmappedField.MESSAGE_TYPE.value
)


def clean(value: str) -> str:
    """The value as stored: without NUL (Postgres text cannot hold it), at most 128 characters."""
    return value.replace("\x00", "")[:MAX_VALUE_LENGTH]


def unmapped_in(truth: OrderTruth) -> Found:
    """The values of one fetch the mapping could not place, with how many snapshots carried
    each. Empty in the usual case."""
    found: Found = Counter()
    order = truth.order
    if order.status is OrderStatus.UNKNOWN:
        found[(UnmappedField.ORDER_STATUS, clean(order.raw_status))] += 1
    for refund in truth.refunds:
        if refund.status is RefundStatus.UNKNOWN:
            found[(UnmappedField.REFUND_STATUS, clean(refund.raw_status))] += 1
    for parcel in truth.shipments:
        raw = parcel.raw_status
        if raw is not None and not mapping.parcel_status_known(order.platform, raw):
            found[(UnmappedField.PARCEL_STATUS, clean(raw))] += 1
    return found


_proposed = insert(UnmappedValue).excluded
_UPSERT = insert(UnmappedValue).on_conflict_do_update(
    constraint=CONSTRAINT,
    set_={
        "last_seen_at": func.now(),
        "seen_count": UnmappedValue.seen_count + _proposed.seen_count,
        "last_order_id": _proposed.last_order_id,
    },
)


async def record_unmapped(session: AsyncSession, account_id: str, truth: OrderTruth) -> Found:
    """Upsert the unplaced values of ``truth`` in the caller's transaction (never commits);
    returns them, for ``count`` once committed. Sends nothing when there are none."""
    found = unmapped_in(truth)
    if not found:
        return found
    order = truth.order
    rows = [
        {
            "account_id": account_id,
            "platform": order.platform,
            "field": field,
            "value": value,
            "seen_count": snapshots,
            "last_order_id": order.order_id,
        }
        # Sorted: concurrent reconciles lock the rows they share in one order.
        for (field, value), snapshots in sorted(found.items())
    ]
    conn = await session.connection()
    await conn.execute(_UPSERT, rows)
    return found


def count(platform: Platform, found: Found) -> None:
    """Count the unplaced values of a committed fetch."""
    for (field, _value), snapshots in found.items():
        _SERIES[(platform, field)].inc(snapshots)


def count_message_type(platform: Platform | None) -> None:
    """Count one stored message of a type the receiver does not know."""
    if platform is None:
        _MESSAGE_TYPE_WITHOUT_PLATFORM.inc()
    else:
        _SERIES[(platform, UnmappedField.MESSAGE_TYPE)].inc()
