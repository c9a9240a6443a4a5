"""The retry policy, in one place.

- A transient error of one upstream call (timeout, connection error, 5xx, a 429 asking for a
  short wait) is first retried in place, twice, after a short pause (``call_with_retries``): a
  blip costs one more call, not a whole reconcile.
- Still failing, the reconcile is retried as a message with exponential backoff and jitter; a
  429's ``Retry-After`` is honoured as a floor, up to ``MAX_RETRY_AFTER_S``: it delays that
  order, not the others (the shared limiter pauses everyone only for a limit that is clearly
  the account's, ``service.pandapon.ratelimit``). The shared rate limiter waits instead of
  failing, so its waits never consume a retry.
- The upstream calls of one reconcile share a time budget (``RECONCILE_UPSTREAM_BUDGET_S``,
  the rate-limit waits excluded): once it is spent (slow answers, timeouts, in-place retries)
  the message is retried later like any transient error, and the worker thread is free for
  other orders. A slow upstream holds a thread for at most the budget per attempt.
- Permanent errors (a refused request, a 4xx, a body we cannot understand) and auth errors are
  not retried: they are recorded in ``sync_failures`` with the upstream ``requestId``, ``code``
  and ``msg``, for ``pandasync replay`` once the cause is fixed.
- Our own database being away (connection errors, a server shutting down or still starting,
  out of connections, a deadlock or serialization failure: ``database_away``) is retried like a
  transient upstream error; any other exception is a bug and is recorded at once, to be
  replayed after the fix.
- When the retries are exhausted the failure is recorded too: a Postgres row outlives the
  broker's dead-letter queue. Every text of the row that upstream chose (``msg``,
  ``requestId``, ``code``, the error message quoting them) is cleaned and cut to its column,
  so a poisoned answer is recorded like any other.
- A worker that stops gives the message in hand back (``GiveBack``): not a failure, no retry
  spent. So does a reconcile whose account is paused by an account-wide rate limit (``Defer``,
  after the pause): waiting it out would hold a worker thread the other accounts need.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain import FailureKind
from service.ledger.models import SyncFailure
from service.pandapon.client import current_budget
from service.pandapon.errors import (
    PandaPonError,
    TransientError,
    UpstreamBudgetExceeded,
    UpstreamRateLimited,
    clean_text,
)

if TYPE_CHECKING:
    from service.domain import ReconcileRequest

T = TypeVar("T")

CALL_BACKOFF_S = (0.2, 0.5)  # pauses before the in-place retries of one upstream call
MAX_INLINE_RETRY_AFTER_S = 5.0  # a longer Retry-After gives the message back instead
MAX_RETRY_AFTER_S = 15 * 60  # the longest one Retry-After delays its order's next attempt
MAX_RETRIES = 8
MIN_BACKOFF_MS = 1_000
MAX_BACKOFF_MS = 5 * 60_000
UNBOUNDED_TEXT_LIMIT = 4000  # characters kept of a text column without a length of its own


@dataclass(frozen=True, slots=True)
class Retry:
    delay_ms: int


@dataclass(frozen=True, slots=True)
class Record:
    kind: FailureKind


@dataclass(frozen=True, slots=True)
class GiveBack:
    """The worker is stopping: the message goes back to the broker as it is."""


@dataclass(frozen=True, slots=True)
class Defer:
    """The order's account is paused (an account-wide rate limit): the message comes back after
    ``delay_ms``, no retry spent, and the worker thread serves the other accounts meanwhile."""

    delay_ms: int


Decision = Retry | Record | GiveBack | Defer


def backoff_ms(retries: int) -> int:
    """Exponential backoff with full jitter in its upper half: 1 s, 2 s, 4 s … capped at 5 min."""
    ceiling = min(MAX_BACKOFF_MS, MIN_BACKOFF_MS << min(retries, 20))
    return ceiling // 2 + random.randint(0, ceiling // 2)


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run one upstream call, retrying it in place on a transient error (see the docstring).

    Inside an ``upstream_budget`` the pauses count against the budget, and a pause the budget
    cannot cover gives the error to the message-level policy at once. ``sleep`` makes the
    pauses (tests pass one that only records them)."""
    for pause in CALL_BACKOFF_S:
        try:
            return await call()
        except UpstreamBudgetExceeded:
            raise
        except TransientError as error:
            if isinstance(error, UpstreamRateLimited) and error.retry_after is not None:
                if error.retry_after > MAX_INLINE_RETRY_AFTER_S:
                    raise
                pause = max(pause, error.retry_after)
            budget = current_budget()
            if budget is not None:
                if pause >= budget.remaining:
                    raise
                budget.spent += pause
            await sleep(pause)
    return await call()


# SQLSTATEs of a database that is away or busy for a moment, not of a bug: connection
# exceptions (class 08), insufficient resources (class 53: too many connections, out of
# memory), the server shutting down or still starting (57P01-57P03: asyncpg reports a server
# in recovery after a restart as 57P03 wrapped in a plain DBAPIError), and a transaction
# that can simply run again (40001 serialization failure, 40P01 deadlock).
_AWAY_SQLSTATE_CLASSES = ("08", "53")
_AWAY_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01"})


def database_away(error: BaseException) -> bool:
    """True when ``error`` says our own database is briefly unreachable or busy."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    state = getattr(error.orig, "sqlstate", None)
    return isinstance(state, str) and (
        state in _AWAY_SQLSTATES or state.startswith(_AWAY_SQLSTATE_CLASSES)
    )


def is_transient(error: Exception) -> bool:
    """Upstream trouble worth retrying, or our own database being briefly away."""
    return isinstance(error, TransientError | OSError) or database_away(error)


def decide(error: Exception, retries: int) -> Decision:
    """What to do with ``error`` after ``retries`` earlier retries of the same message."""
    if not is_transient(error):
        return Record(FailureKind.PERMANENT)
    if retries >= MAX_RETRIES:
        return Record(FailureKind.EXHAUSTED)
    delay = backoff_ms(retries)
    if isinstance(error, UpstreamRateLimited) and error.retry_after is not None:
        delay = max(delay, int(min(error.retry_after, MAX_RETRY_AFTER_S) * 1000))
    return Retry(delay)


async def record_failure(
    session: AsyncSession,
    request: ReconcileRequest,
    error: Exception,
    kind: FailureKind,
    attempts: int,
) -> None:
    """Open (or update) the order's failure row; at most one open row per order."""
    upstream = error if isinstance(error, PandaPonError) else None
    values = {
        "account_id": request.account_id,
        "platform": request.platform,
        "order_id": request.order_id,
        "kind": kind,
        "source": request.source,
        "error": _storable("error", f"{type(error).__name__}: {error}"),
        "endpoint": _storable("endpoint", upstream.endpoint if upstream else None),
        "http_status": upstream.http_status if upstream else None,
        "upstream_code": _storable("upstream_code", upstream.code if upstream else None),
        "upstream_msg": _storable("upstream_msg", upstream.msg if upstream else None),
        "upstream_request_id": _storable(
            "upstream_request_id", upstream.request_id if upstream else None
        ),
        "attempts": attempts,
    }
    stmt = insert(SyncFailure).values(**values)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=["account_id", "platform", "order_id"],
            index_where=SyncFailure.resolved_at.is_(None),
            set_={
                **{k: stmt.excluded[k] for k in values if k not in ("account_id", "platform")},
                "attempts": SyncFailure.attempts + stmt.excluded.attempts,
                "last_failed_at": func.now(),
            },
        )
    )


def _storable(column: str, value: object) -> str | None:
    """``value`` cleaned and cut to the length of ``sync_failures.<column>``."""
    if value is None:
        return None
    length = SyncFailure.__table__.c[column].type.length  # type: ignore[attr-defined]
    return clean_text(value, length or UNBOUNDED_TEXT_LIMIT)
