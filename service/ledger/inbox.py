"""The life of a ``webhook_inbox`` row, every change of its state in one place.

```
received ──hand-off──▶ queued ──a reconcile covered it──▶ processed
   │                     ▲ │
   │                     └─┘ the broker lost it: the relay hands it off again
   └── nothing to reconcile (no platform or order id) ──▶ ignored
                  set aside when a person dismissed the order's failure ──▶ ignored
```

- **received**: committed by the receiver (``service/webhooks/inbox.py``); the request is
  answered 200 only after this commit.
- **queued**: a reconcile was sent to the broker, right after the commit
  (``service/webhooks/handoff.py``, ``MARK_QUEUED_SQL`` on its held connections) or later by the
  relay (``service/webhooks/relay.py``, ``mark_handed_off``), which also sends again a queued row
  whose message the broker lost.
- **processed**: the ledger write of the order (``service/ledger/write.py``) marks, in its own
  transaction, every waiting row of the order received before its fetch started
  (``mark_processed``): that fetch covered them; a refund message only when the fetch asked
  for its refund (one whose row committed after the reconcile read the open refunds waits for
  its own reconcile).
- **ignored**: nothing to reconcile, or set aside by ``pandasync dismiss`` (the order's failure
  was closed by a person: ``service/ledger/failures.py``); both through ``mark_ignored``.

``WAITING_INBOX_STATES`` (received, queued) and ``COVERED_INBOX_STATES`` (processed, ignored)
are what the sweeps, the reconcile's coalescing and ``pandasync status`` read. A waiting row is
on its way to a reconcile unless ``held_for_replay``: its order's reconcile failed for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    String,
    any_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.domain import WAITING_INBOX_STATES, FailureKind, InboxState, Platform
from service.ledger.models import SyncFailure, WebhookInbox

COVERED_INBOX_STATES = frozenset({InboxState.PROCESSED, InboxState.IGNORED})

# Raw SQL for the hand-off's held asyncpg connections (one prepared statement, no ORM).
MARK_QUEUED_SQL = (
    "UPDATE webhook_inbox SET state = 'queued', queued_at = now() "
    "WHERE id = ANY($1::bigint[]) AND state = 'received'"
)

_ids: BindParameter[int] = bindparam("ids", expanding=True)
_MARK_HANDED_OFF = (
    update(WebhookInbox)
    .where(WebhookInbox.id.in_(_ids))
    .values(state=InboxState.QUEUED, queued_at=func.now())
)
_MARK_IGNORED = (
    update(WebhookInbox).where(WebhookInbox.id.in_(_ids)).values(state=InboxState.IGNORED)
)
_MARK_PROCESSED = (
    update(WebhookInbox)
    .where(
        WebhookInbox.account_id == bindparam("of_account"),
        WebhookInbox.platform == bindparam("of_platform"),
        WebhookInbox.order_id == bindparam("of_order"),
        WebhookInbox.state.in_(WAITING_INBOX_STATES),
        WebhookInbox.received_at <= bindparam("fetched_at"),
        # A refund message is covered only by a fetch that asked for its refund.
        or_(
            bindparam("any_refund", type_=Boolean),
            WebhookInbox.refund_id.is_(None),
            WebhookInbox.refund_id == any_(bindparam("refund_ids", type_=ARRAY(String))),
        ),
    )
    .values(state=InboxState.PROCESSED, processed_at=func.now())
    .returning(WebhookInbox.id)
    .cte("processed")
)
# A successful sync closes the order's open failure: in the statement that marks its rows, one
# round trip for both (two data-modifying CTEs of one statement, on different tables).
_RESOLVE_FAILURES = (
    update(SyncFailure)
    .where(
        SyncFailure.account_id == bindparam("of_account"),
        SyncFailure.platform == bindparam("of_platform"),
        SyncFailure.order_id == bindparam("of_order"),
        SyncFailure.resolved_at.is_(None),
        bindparam("resolve", type_=Boolean),
    )
    .values(resolved_at=func.now())
    .returning(SyncFailure.id)
    .cte("resolved")
)
_MARK_PROCESSED_AND_RESOLVE = select(
    select(func.count()).select_from(_MARK_PROCESSED).scalar_subquery().label("processed"),
    select(func.count()).select_from(_RESOLVE_FAILURES).scalar_subquery().label("resolved"),
)


def held_for_replay() -> ColumnElement[bool]:
    """True for an inbox row whose order has an open permanent sync failure: the relay does
    not send it again and no reconcile is on its way (the row waits for ``pandasync replay``),
    so the sweeps must not count on it. An exhausted failure heals by itself: the relay sends
    such rows again."""
    return (
        select(SyncFailure.id)
        .where(
            SyncFailure.account_id == WebhookInbox.account_id,
            SyncFailure.platform == WebhookInbox.platform,
            SyncFailure.order_id == WebhookInbox.order_id,
            SyncFailure.resolved_at.is_(None),
            SyncFailure.kind == FailureKind.PERMANENT,
        )
        .exists()
    )


async def mark_handed_off(session: AsyncSession, ids: Sequence[int]) -> None:
    """Rows whose reconcile the relay just sent (received, or queued and lost)."""
    await session.execute(_MARK_HANDED_OFF, {"ids": list(ids)})


async def mark_ignored(session: AsyncSession, ids: Sequence[int]) -> None:
    await session.execute(_MARK_IGNORED, {"ids": list(ids)})


async def mark_processed(
    conn: AsyncConnection,
    account_id: str,
    platform: Platform,
    order_id: str,
    fetched_at: datetime,
    *,
    refund_ids: Sequence[str] | None = None,
    resolve_failures: bool = False,
) -> tuple[int, int]:
    """The order's waiting rows received before ``fetched_at``; with ``refund_ids`` (the
    refunds the fetch asked for) only the refund messages of those. ``resolve_failures``: the
    order's open sync failures are resolved too. Returns (rows processed, failures resolved)."""
    params = {
        "of_account": account_id,
        "of_platform": platform,
        "of_order": order_id,
        "fetched_at": fetched_at,
        "any_refund": refund_ids is None,
        "refund_ids": list(refund_ids or ()),
        "resolve": resolve_failures,
    }
    row = (await conn.execute(_MARK_PROCESSED_AND_RESOLVE, params)).one()
    return int(row.processed), int(row.resolved)
