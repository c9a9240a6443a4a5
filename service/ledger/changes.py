"""The change feed: ``ledger_changes`` rows, written in the transaction of the change itself.

A row is added only where the ledger records a real change (a status or price history row, a
new parcel, a parcel newly delivered, a new refund state, a payment attempt's outcome), so a
replay, a remap that derives the same values, or an unchanged sync adds none. Its ``payload``
is the ``data`` of the outbound event exactly as delivered (``service.ledger.outbound``); an
AFTER INSERT trigger (migration 0010) sends ``NOTIFY pandasync_ledger_changes, '<id>'``, which
Postgres delivers at commit, never for a rolled-back write.

Reading the feed in order (docs/reporting.md): ``id`` is taken when the row is inserted, not
when its transaction commits, so under concurrency a smaller id can become visible after a
larger one. ``tx_id`` (the writing transaction's id) settles it: every transaction below
``pg_snapshot_xmin(pg_current_snapshot())`` has ended, so the rows with ``tx_id`` below that
horizon are final; a consumer remembers the horizon it read up to (``settled_horizon``) and
reads ``tx_id >= horizon`` again next time, skipping the ids it has processed already.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service.domain import Platform
from service.ledger.models import ChangeKind, LedgerChange

CHANNEL = "pandasync_ledger_changes"

_INSERT = insert(LedgerChange)
_HORIZON = text("SELECT (pg_snapshot_xmin(pg_current_snapshot()))::text::bigint")


def _json(value: Any) -> Any:
    """A JSON value for the payload: money as a string (no float rounding), times in ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if hasattr(value, "value") and isinstance(value.value, str):  # an enum of ours
        return value.value
    return value


def change(
    kind: ChangeKind,
    *,
    account_id: str,
    platform: Platform,
    order_id: str,
    order_pk: int | None,
    occurred_at: datetime | None,
    **details: Any,
) -> dict[str, Any]:
    """The row of one change; ``details`` go into the payload beside the order's key."""
    payload = _json(
        {"account_id": account_id, "platform": platform, "order_id": order_id, **details}
    )
    return {
        "account_id": account_id,
        "platform": platform,
        "order_id": order_id,
        "order_pk": order_pk,
        "kind": kind,
        "payload": payload,
        "occurred_at": occurred_at,
    }


async def record(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` in the caller's transaction (in the order given: ids follow it)."""
    for row in rows:  # one by one: an executemany may not keep the ids in the list's order
        await conn.execute(_INSERT, row)


async def settled_horizon(conn: AsyncConnection) -> int:
    """The transaction id below which every transaction has ended, as of this snapshot: rows
    with a smaller ``tx_id`` are final (committed and visible, or rolled back for good)."""
    found: int = (await conn.execute(_HORIZON)).scalar_one()
    return found
