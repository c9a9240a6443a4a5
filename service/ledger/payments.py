"""The life of a ``payment_attempts`` row, and which orders a pay run looks at.

An attempt is written before the upstream payment call and again after it::

    start_attempt ──▶ started ──(the call answered)──▶ paid | pay_by_hand | held_back | failed
                         │   └──(no answer: timeout, connection lost, 5xx)──▶ unknown
                         ├──(never called: the re-fetch said no)──▶ (row deleted: discard_attempt)
                         └──(its run died before the outcome)──▶ unknown (mark_orphaned)
    unknown ──(a re-fetch shows it paid / closed unpaid)──▶ paid / failed (close_confirmed)
    unknown ──(a person checked upstream: not paid)──▶ failed (release_attempt)

The partial unique index ``uq_payment_attempts_in_flight`` allows one ``started`` or ``unknown``
row per order: ``start_attempt`` answers None when another exists, whichever process made it.

A running pay run holds a session advisory lock on its ``run_id`` (``hold_run_lock``) for as
long as it lives, on a connection of its own: a ``started`` row whose run holds no lock was left
by a run that died between the insert and the outcome (``run_alive``).

Every outcome written (``finish_attempt``, ``mark_orphaned``, ``close_confirmed``,
``release_attempt``) adds a ``payment.outcome`` row to the change feed in the same statement's
transaction (``service.ledger.changes``).

Every function takes a session or connection and never commits: the pay run commits at each
step that must be durable before the next (``workers/payments.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.domain import PAYMENT_IN_FLIGHT_STATES, OrderStatus, PaymentState, Platform
from service.ledger import changes
from service.ledger.models import ChangeKind, Order, PaymentAttempt
from service.pandapon.errors import clean_text

# The first key of the two-int advisory lock form for pay runs (the reconcile's is 0x5053).
PAY_RUN_LOCK_CLASS = 0x5059  # "PY"
# Text columns without a length of their own keep this many characters of what upstream said.
TEXT_LIMIT = 4000
# The predicate of uq_payment_attempts_in_flight (PAYMENT_IN_FLIGHT_STATES), as the index has it.
IN_FLIGHT_PREDICATE = "state IN ('started', 'unknown')"
_COLUMN_LIMITS = {"upstream_code": 32, "upstream_request_id": 128, "requested_by": 128}
# What an outcome's change row says of the attempt.
_OUTCOME = (
    PaymentAttempt.id,
    PaymentAttempt.account_id,
    PaymentAttempt.platform,
    PaymentAttempt.order_id,
    PaymentAttempt.state,
    PaymentAttempt.amount,
    PaymentAttempt.currency,
    PaymentAttempt.pay_url,
    PaymentAttempt.error,
    PaymentAttempt.finished_at,
)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One ``payment_attempts`` row as a pay run reads it."""

    id: int
    account_id: str
    platform: Platform
    order_id: str
    run_id: str
    requested_by: str
    state: PaymentState
    amount: Decimal | None
    currency: str
    pay_url: str | None
    upstream_msg: str | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None

    @property
    def in_flight(self) -> bool:
        return self.state in PAYMENT_IN_FLIGHT_STATES


@dataclass(frozen=True, slots=True)
class Candidate:
    """An order a pay run looks at: awaiting payment in the ledger, or holding an attempt in
    flight; ``last_attempt`` is its latest attempt, if any."""

    account_id: str
    platform: Platform
    order_id: str
    status: OrderStatus
    amount: Decimal | None
    currency: str
    created_at: datetime
    last_attempt: Attempt | None


_ATTEMPT_COLUMNS = (
    PaymentAttempt.id,
    PaymentAttempt.account_id,
    PaymentAttempt.platform,
    PaymentAttempt.order_id,
    PaymentAttempt.run_id,
    PaymentAttempt.requested_by,
    PaymentAttempt.state,
    PaymentAttempt.amount,
    PaymentAttempt.currency,
    PaymentAttempt.pay_url,
    PaymentAttempt.upstream_msg,
    PaymentAttempt.error,
    PaymentAttempt.started_at,
    PaymentAttempt.finished_at,
)


async def candidates(
    session: AsyncSession,
    *,
    account_id: str,
    platforms: Sequence[Platform] = (),
    order_ids: Sequence[str] = (),
    created_before: datetime | None = None,
) -> list[Candidate]:
    """Orders of the account awaiting payment in the ledger, and those with an attempt in
    flight (whatever the ledger says now), oldest first, within the filters."""
    latest = (
        select(*_ATTEMPT_COLUMNS)
        .where(
            PaymentAttempt.account_id == Order.account_id,
            PaymentAttempt.platform == Order.platform,
            PaymentAttempt.order_id == Order.order_id,
        )
        # Identity order is insertion order; started_at (transaction start) may not be.
        .order_by(PaymentAttempt.id.desc())
        .limit(1)
        .lateral("last_attempt")
    )
    created_at = func.coalesce(Order.upstream_created_at, Order.first_seen_at)
    query = (
        select(
            Order.account_id,
            Order.platform,
            Order.order_id,
            Order.status,
            Order.total_amount,
            Order.currency,
            created_at.label("created_at"),
            *latest.c,
        )
        .select_from(Order)
        .outerjoin(latest, text("true"))
        .where(
            Order.account_id == account_id,
            (Order.status == OrderStatus.PENDING_PAYMENT)
            | latest.c.state.in_([s.value for s in PAYMENT_IN_FLIGHT_STATES]),
        )
        .order_by(created_at, Order.platform, Order.order_id)
    )
    if platforms:
        query = query.where(Order.platform.in_(list(platforms)))
    if order_ids:
        query = query.where(Order.order_id.in_(list(order_ids)))
    if created_before is not None:
        query = query.where(created_at <= created_before)
    rows = (await session.execute(query)).all()
    found: list[Candidate] = []
    for row in rows:
        account, platform, order_id, status, amount, currency, created = row[:7]
        attempt = None if row[7] is None else Attempt(*row[7:])
        found.append(
            Candidate(account, platform, order_id, status, amount, currency, created, attempt)
        )
    return found


async def get_attempt(session: AsyncSession, attempt_id: int) -> Attempt | None:
    row = (
        await session.execute(select(*_ATTEMPT_COLUMNS).where(PaymentAttempt.id == attempt_id))
    ).one_or_none()
    return None if row is None else Attempt(*tuple(row))


async def attempts_of(
    session: AsyncSession, account_id: str, platform: Platform, order_id: str
) -> list[Attempt]:
    """Every attempt of the order, oldest first."""
    rows = await session.execute(
        select(*_ATTEMPT_COLUMNS)
        .where(
            PaymentAttempt.account_id == account_id,
            PaymentAttempt.platform == platform,
            PaymentAttempt.order_id == order_id,
        )
        .order_by(PaymentAttempt.id)
    )
    return [Attempt(*tuple(row)) for row in rows.all()]


async def start_attempt(
    session: AsyncSession,
    *,
    account_id: str,
    platform: Platform,
    order_id: str,
    run_id: str,
    requested_by: str,
    amount: Decimal | None,
    currency: str,
) -> int | None:
    """Insert the order's attempt as ``started``; None (nothing written) when the order has
    an attempt in flight already. Commit before calling upstream."""
    statement = (
        insert(PaymentAttempt)
        .values(
            account_id=account_id,
            platform=platform,
            order_id=order_id,
            run_id=run_id,
            requested_by=_cut("requested_by", requested_by),
            state=PaymentState.STARTED,
            amount=amount,
            currency=currency,
        )
        .on_conflict_do_nothing(
            index_elements=["account_id", "platform", "order_id"],
            # Literal, as the index's own predicate: Postgres cannot infer a partial index
            # from a predicate with parameters.
            index_where=text(IN_FLIGHT_PREDICATE),
        )
        .returning(PaymentAttempt.id)
    )
    found: int | None = (await session.execute(statement)).scalar_one_or_none()
    return found


async def set_amount(
    session: AsyncSession, attempt_id: int, amount: Decimal | None, currency: str
) -> None:
    """The amount the re-fetch just before the call showed (the attempt's own row only)."""
    await session.execute(
        update(PaymentAttempt)
        .where(PaymentAttempt.id == attempt_id, PaymentAttempt.state == PaymentState.STARTED)
        .values(amount=amount, currency=currency)
    )


async def finish_attempt(
    session: AsyncSession,
    attempt_id: int,
    state: PaymentState,
    *,
    pay_url: str | None = None,
    upstream_code: str | None = None,
    upstream_msg: str | None = None,
    upstream_request_id: str | None = None,
    error: str | None = None,
) -> bool:
    """Record the outcome of the call of a ``started`` attempt; False if it was not started."""
    if state is PaymentState.STARTED:
        raise ValueError("an outcome cannot be 'started'")
    result = await session.execute(
        update(PaymentAttempt)
        .where(PaymentAttempt.id == attempt_id, PaymentAttempt.state == PaymentState.STARTED)
        .values(
            state=state,
            pay_url=_cut("pay_url", pay_url),
            upstream_code=_cut("upstream_code", upstream_code),
            upstream_msg=_cut("upstream_msg", upstream_msg),
            upstream_request_id=_cut("upstream_request_id", upstream_request_id),
            error=_cut("error", error),
            finished_at=func.now(),
        )
        .returning(*_OUTCOME)
    )
    return await _outcome_recorded(session, result.one_or_none())


async def discard_attempt(session: AsyncSession, attempt_id: int) -> None:
    """Delete a ``started`` attempt whose call was never made (the re-fetch said not to pay):
    the row only ever stood for the right to call."""
    await session.execute(
        delete(PaymentAttempt).where(
            PaymentAttempt.id == attempt_id, PaymentAttempt.state == PaymentState.STARTED
        )
    )


async def mark_orphaned(session: AsyncSession, attempt_id: int, note: str) -> bool:
    """A ``started`` attempt whose run died before recording the outcome: ``unknown``, for a
    person (the call may or may not have been made)."""
    result = await session.execute(
        update(PaymentAttempt)
        .where(PaymentAttempt.id == attempt_id, PaymentAttempt.state == PaymentState.STARTED)
        .values(state=PaymentState.UNKNOWN, error=_cut("error", note), finished_at=func.now())
        .returning(*_OUTCOME)
    )
    return await _outcome_recorded(session, result.one_or_none())


async def close_confirmed(
    session: AsyncSession, attempt_id: int, state: PaymentState, note: str
) -> bool:
    """An attempt in flight whose outcome a re-fetch of the order has settled: ``paid`` (the
    order shows paid) or ``failed`` (it closed unpaid). ``note`` says so in ``upstream_msg``
    (what upstream showed) and is added to ``error``."""
    if state not in (PaymentState.PAID, PaymentState.FAILED):
        raise ValueError("a re-fetch settles an attempt as paid or failed")
    result = await session.execute(
        update(PaymentAttempt)
        .where(
            PaymentAttempt.id == attempt_id,
            PaymentAttempt.state.in_([s.value for s in PAYMENT_IN_FLIGHT_STATES]),
        )
        .values(
            state=state,
            upstream_msg=_cut("upstream_msg", note),
            error=func.concat_ws("; ", PaymentAttempt.error, note),
            finished_at=func.coalesce(PaymentAttempt.finished_at, func.now()),
        )
        .returning(*_OUTCOME)
    )
    return await _outcome_recorded(session, result.one_or_none())


async def release_attempt(session: AsyncSession, attempt_id: int, by: str, reason: str) -> bool:
    """A person checked upstream and found the order of an ``unknown`` attempt not paid: the
    attempt becomes ``failed`` (saying who released it and why), so a later run may pay."""
    note = f"released by {by}: {reason}"
    result = await session.execute(
        update(PaymentAttempt)
        .where(PaymentAttempt.id == attempt_id, PaymentAttempt.state == PaymentState.UNKNOWN)
        .values(
            state=PaymentState.FAILED,
            error=func.concat_ws("; ", PaymentAttempt.error, _cut("error", note)),
            finished_at=func.coalesce(PaymentAttempt.finished_at, func.now()),
        )
        .returning(*_OUTCOME)
    )
    return await _outcome_recorded(session, result.one_or_none())


async def paying_attempt(
    session: AsyncSession, account_id: str, platform: Platform, order_id: str
) -> int | None:
    """The id of an attempt that paid the order already, if any."""
    found: int | None = await session.scalar(
        select(PaymentAttempt.id)
        .where(
            PaymentAttempt.account_id == account_id,
            PaymentAttempt.platform == platform,
            PaymentAttempt.order_id == order_id,
            PaymentAttempt.state == PaymentState.PAID,
        )
        .order_by(PaymentAttempt.id.desc())
        .limit(1)
    )
    return found


# --- the run's lock -------------------------------------------------------------------------------


def run_lock_key(run_id: str) -> int:
    """A stable signed 32-bit key for a run id (advisory locks take int4 pairs)."""
    digest = zlib.crc32(run_id.encode())
    return digest - (1 << 32) if digest >= (1 << 31) else digest


async def hold_run_lock(conn: AsyncConnection, run_id: str) -> None:
    """Take the run's session lock on ``conn`` (autocommit, kept open for the whole run)."""
    await conn.execute(
        text("SELECT pg_advisory_lock(:c, :k)"),
        {"c": PAY_RUN_LOCK_CLASS, "k": run_lock_key(run_id)},
    )


async def release_run_lock(conn: AsyncConnection, run_id: str) -> None:
    await conn.execute(
        text("SELECT pg_advisory_unlock(:c, :k)"),
        {"c": PAY_RUN_LOCK_CLASS, "k": run_lock_key(run_id)},
    )


# Free (so taken here) means no live run holds it: give it back at once, in the same statement.
_RUN_ALIVE = text(
    "SELECT CASE WHEN pg_try_advisory_lock(:c, :k) THEN NOT pg_advisory_unlock(:c, :k) "
    "ELSE true END"
)


async def run_alive(session: AsyncSession, run_id: str) -> bool:
    """True while the pay run ``run_id`` lives (it holds its lock). Ask from a connection that
    does not hold that run's lock itself (a session's lock is re-entrant)."""
    alive = await session.scalar(_RUN_ALIVE, {"c": PAY_RUN_LOCK_CLASS, "k": run_lock_key(run_id)})
    return bool(alive)


async def _outcome_recorded(session: AsyncSession, outcome: Any) -> bool:
    """Add the change row of an outcome just written (None: nothing was written)."""
    if outcome is None:
        return False
    order_pk = await session.scalar(
        select(Order.id).where(
            Order.account_id == outcome.account_id,
            Order.platform == outcome.platform,
            Order.order_id == outcome.order_id,
        )
    )
    row = changes.change(
        ChangeKind.PAYMENT_OUTCOME,
        account_id=outcome.account_id,
        platform=outcome.platform,
        order_id=outcome.order_id,
        order_pk=order_pk,
        occurred_at=outcome.finished_at,
        attempt_id=outcome.id,
        state=outcome.state,
        amount=outcome.amount,
        currency=outcome.currency,
        pay_url=outcome.pay_url,
        error=outcome.error,
    )
    await changes.record(await session.connection(), [row])
    return True


def _cut(column: str, value: str | None) -> str | None:
    """Upstream chose the text: storable, and short enough for its column."""
    if value is None:
        return None
    return clean_text(value, _COLUMN_LIMITS.get(column, TEXT_LIMIT))
