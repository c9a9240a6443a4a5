"""Sync failures as a person meets them: the open ones, and closing one by hand.

A failure closes by itself when a later reconcile of its order succeeds (its write:
``write_order(resolve_failures=True)``). ``dismiss_failures`` closes one that never will (an
order PandaPon no longer serves, a record it will always refuse): it records when, who and why
(``dismissed_at``, ``dismissed_by``, ``dismissed_reason``; ``resolved_at`` too, so every reader
of "open" sees it closed), and sets the order's waiting inbox messages aside (``ignored``): they
leave the backlog, and a message still in the broker for one of them finds it covered. Nothing
else of the order changes: a later message, sweep or refresh reconciles it as usual, and a new
failure opens if that fails too.

Errors, all raised before anything is written (``ClosedMeanwhile``: inside the transaction,
which the caller's ``session_scope`` rolls back):

```
DismissRefused
├── InvalidNote       the reason or the name is empty or too long
├── NoSuchFailure     an id names no failure
├── AlreadyClosed     an id names a failure closed before
└── ClosedMeanwhile   a sync closed one while the dismissal ran
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import session_scope
from service.domain import WAITING_INBOX_STATES, FailureKind, Platform, SyncSource
from service.ledger.inbox import mark_ignored
from service.ledger.models import SyncFailure, WebhookInbox

REASON_MAX_CHARS = 500
NAME_MAX_CHARS: int = SyncFailure.__table__.c.dismissed_by.type.length  # type: ignore[attr-defined]


class DismissRefused(Exception):
    """The dismissal was refused; nothing was changed."""


class InvalidNote(DismissRefused):
    """The reason or the operator's name cannot be recorded as given."""


class NoSuchFailure(DismissRefused):
    """An id names no sync failure."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = tuple(ids)
        listed = ", ".join(str(i) for i in self.ids)
        super().__init__(
            f"no sync failure with id {listed}: `pandasync failures` lists the open ones"
        )


class AlreadyClosed(DismissRefused):
    """An id names a failure that is closed already."""

    def __init__(self, failure_id: int, closed_at: datetime, dismissed: bool) -> None:
        self.failure_id = failure_id
        self.closed_at = closed_at
        how = "dismissed" if dismissed else "resolved by a sync"
        when = closed_at.replace(microsecond=0).isoformat(" ")
        super().__init__(f"sync failure {failure_id} is already closed ({how} at {when})")


class ClosedMeanwhile(DismissRefused):
    """A sync closed a failure while the dismissal ran."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = tuple(ids)
        listed = ", ".join(str(i) for i in self.ids)
        super().__init__(
            f"sync failure {listed} closed meanwhile (a sync succeeded): nothing was changed; "
            "run the command again without it"
        )


@dataclass(frozen=True, slots=True)
class OpenFailure:
    id: int
    account_id: str
    platform: Platform
    order_id: str
    kind: FailureKind
    source: SyncSource
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    error: str
    endpoint: str | None
    http_status: int | None
    upstream_code: str | None
    upstream_msg: str | None
    upstream_request_id: str | None
    replay_count: int
    replayed_at: datetime | None


async def list_open(
    session: AsyncSession,
    *,
    platform: Platform | None = None,
    kind: FailureKind | None = None,
    account_ids: Sequence[str] | None = None,
    after: int | None = None,
    limit: int,
) -> tuple[list[OpenFailure], int]:
    """The first ``limit`` (at least 1) open failures, oldest first, and how many match;
    ``account_ids``: only those accounts' (None: every account's); ``after``: only those
    with a greater id (the next page of a keyset)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    columns = [getattr(SyncFailure, field.name) for field in fields(OpenFailure)]
    query = select(*columns, func.count().over().label("total")).where(
        SyncFailure.resolved_at.is_(None)
    )
    if platform is not None:
        query = query.where(SyncFailure.platform == platform)
    if kind is not None:
        query = query.where(SyncFailure.kind == kind)
    if account_ids is not None:
        query = query.where(SyncFailure.account_id.in_(account_ids))
    if after is not None:
        query = query.where(SyncFailure.id > after)
    rows = (await session.execute(query.order_by(SyncFailure.id).limit(limit))).all()
    total = int(rows[0].total) if rows else 0
    return [OpenFailure(*row[:-1]) for row in rows], total


@dataclass(frozen=True, slots=True)
class Dismissed:
    id: int
    account_id: str
    platform: Platform
    order_id: str
    kind: FailureKind
    messages_ignored: int  # waiting inbox messages of the order set aside


def check_note(text: str, what: str, max_chars: int) -> str:
    """``text`` stripped, or InvalidNote when nothing is left, it is too long, or it holds
    what Postgres cannot store (a NUL, a byte that is not UTF-8 from the command line)."""
    stripped = text.strip()
    if not stripped:
        raise InvalidNote(f"the {what} is empty")
    if len(stripped) > max_chars:
        raise InvalidNote(f"the {what} is {len(stripped)} characters long; at most {max_chars}")
    try:
        stripped.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidNote(f"the {what} is not valid text (check the terminal's encoding)") from None
    if "\x00" in stripped:
        raise InvalidNote(f"the {what} holds a NUL character")
    return stripped


async def dismiss_failures(
    session: AsyncSession, ids: Sequence[int], *, by: str, reason: str
) -> list[Dismissed]:
    """Close the open failures ``ids`` by hand, all or none, in the caller's transaction.

    Every id is checked before anything is written. The order's waiting inbox rows are locked
    before the failure rows, the order a reconcile's write takes them in."""
    reason = check_note(reason, "reason", REASON_MAX_CHARS)
    by = check_note(by, "name (--by)", NAME_MAX_CHARS)
    wanted = sorted(set(ids))
    if not wanted:
        raise InvalidNote("no failure id given")
    found = {
        row.id: row
        for row in (
            await session.execute(
                select(
                    SyncFailure.id,
                    SyncFailure.account_id,
                    SyncFailure.platform,
                    SyncFailure.order_id,
                    SyncFailure.kind,
                    SyncFailure.resolved_at,
                    SyncFailure.dismissed_at,
                ).where(SyncFailure.id.in_(wanted))
            )
        ).all()
    }
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NoSuchFailure(missing)
    for failure_id in wanted:
        row = found[failure_id]
        if row.resolved_at is not None:
            raise AlreadyClosed(failure_id, row.resolved_at, row.dismissed_at is not None)

    waiting = (
        await session.execute(
            select(WebhookInbox.id, SyncFailure.id)
            .join(
                SyncFailure,
                and_(
                    SyncFailure.account_id == WebhookInbox.account_id,
                    SyncFailure.platform == WebhookInbox.platform,
                    SyncFailure.order_id == WebhookInbox.order_id,
                ),
            )
            .where(SyncFailure.id.in_(wanted), WebhookInbox.state.in_(WAITING_INBOX_STATES))
            .order_by(WebhookInbox.id)
            .with_for_update(of=WebhookInbox)
        )
    ).all()
    closed = set(
        (
            await session.execute(
                update(SyncFailure)
                .where(SyncFailure.id.in_(wanted), SyncFailure.resolved_at.is_(None))
                .values(
                    resolved_at=func.now(),
                    dismissed_at=func.now(),
                    dismissed_by=by,
                    dismissed_reason=reason,
                )
                .returning(SyncFailure.id)
            )
        ).scalars()
    )
    if len(closed) != len(wanted):
        raise ClosedMeanwhile([i for i in wanted if i not in closed])
    if waiting:
        await mark_ignored(session, [inbox_id for inbox_id, _ in waiting])
    ignored = {failure_id: 0 for failure_id in wanted}
    for _, failure_id in waiting:
        ignored[failure_id] += 1
    return [
        Dismissed(
            failure_id,
            found[failure_id].account_id,
            found[failure_id].platform,
            found[failure_id].order_id,
            found[failure_id].kind,
            ignored[failure_id],
        )
        for failure_id in wanted
    ]


# --- replay: the open failures to sync again, and the count of replays on each --------------


@dataclass(frozen=True, slots=True)
class FailureRef:
    id: int
    account_id: str
    platform: Platform
    order_id: str


async def open_failures(
    sessions: async_sessionmaker[AsyncSession],
    *,
    platform: Platform | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    account_ids: Sequence[str] | None = None,
    failure_id: int | None = None,
) -> list[FailureRef]:
    """The open failures, oldest first: optionally one (``failure_id``), those of a platform,
    last seen in ``[since, until)``, or those of ``account_ids``."""
    query = select(
        SyncFailure.id, SyncFailure.account_id, SyncFailure.platform, SyncFailure.order_id
    ).where(SyncFailure.resolved_at.is_(None))
    if failure_id is not None:
        query = query.where(SyncFailure.id == failure_id)
    if account_ids is not None:
        query = query.where(SyncFailure.account_id.in_(account_ids))
    if platform is not None:
        query = query.where(SyncFailure.platform == platform)
    if since is not None:
        query = query.where(SyncFailure.last_failed_at >= since)
    if until is not None:
        query = query.where(SyncFailure.last_failed_at < until)
    async with sessions() as session:
        rows = (await session.execute(query.order_by(SyncFailure.id))).all()
    return [FailureRef(*row) for row in rows]


def replay_orders(failures: Sequence[FailureRef]) -> list[tuple[str, str, str]]:
    """The (account_id, platform, order_id) of each failure, for ``enqueue_replays``."""
    return [(f.account_id, f.platform.value, f.order_id) for f in failures]


async def mark_replayed(sessions: async_sessionmaker[AsyncSession], ids: Sequence[int]) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            update(SyncFailure)
            .where(SyncFailure.id.in_(list(ids)))
            .values(replayed_at=func.now(), replay_count=SyncFailure.replay_count + 1)
        )
