"""Operator commands behind ``pandasync replay``, ``resync`` and ``status`` (and what
``status`` holds for unhealthy)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import Interval, and_, func, select, text, type_coerce
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.broker import (
    AGE_UNKNOWN,
    broker_problem,
    oldest_waiting,
    queue_depth,
)
from service.config import Settings
from service.domain import (
    WAITING_INBOX_STATES,
    InboxState,
    OrderStatus,
    PaymentState,
    Platform,
    UnmappedField,
)
from service.ledger import outbound
from service.ledger.models import (
    Order,
    PaymentAttempt,
    RefundSweepCursor,
    SweepCursor,
    SyncFailure,
    WebhookInbox,
)
from workers.reconcile import count_open_failures


@dataclass(frozen=True, slots=True)
class SweepStatus:
    account_id: str
    platform: Platform
    last_finished_at: datetime | None
    last_examined: int
    last_drift: int


@dataclass(frozen=True, slots=True)
class UnmappedStatus:
    """One unplaced value, accounts summed: the ``orders`` that hold it now (None for a
    message type, counted in ``seen`` messages instead)."""

    platform: Platform | None
    field: UnmappedField
    value: str
    orders: int | None
    seen: int
    first_seen_at: datetime
    last_seen_at: datetime


# A payment attempt still ``started`` this long after it began lost its process: its outcome
# is as unknown as an ``unknown`` one's.
PAYMENT_STARTED_STALE_AFTER = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class PaymentsStatus:
    """Payment attempts a person must look at (the latest attempt of each order): an outcome
    nobody knows (``unknown``, or ``started`` over PAYMENT_STARTED_STALE_AFTER ago), or a
    payment upstream left to a person (``pay_by_hand``, ``held_back``) while the order still
    awaits payment."""

    unknown: int = 0
    started_stale: int = 0
    pay_by_hand: int = 0
    held_back: int = 0

    @property
    def total(self) -> int:
        return self.unknown + self.started_stale + self.pay_by_hand + self.held_back


@dataclass(frozen=True, slots=True)
class OutboundStatus:
    """The outbound webhooks: endpoints, the disabled ones (shown, not judged: an operator may
    disable one on purpose), and the deliveries waiting."""

    endpoints: int = 0
    disabled: tuple[outbound.Endpoint, ...] = ()
    pending: int = 0
    oldest_pending_age: timedelta | None = None


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """One configured account's share of the backlog, failures and orders awaiting payment."""

    name: str
    account_id: str
    inbox_backlog: int = 0
    oldest_unprocessed_age: timedelta | None = None
    open_failures: int = 0
    orders_awaiting_payment: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    checked_at: datetime  # the database's clock; every age is measured by it
    inbox_backlog: int
    inbox_unqueued: int
    oldest_unprocessed_age: timedelta | None
    open_failures: int
    queue_depth: int | None
    broker_error: str | None  # the broker could not be reached
    sweeps: list[SweepStatus]
    refund_sweeps: list[SweepStatus]
    # The first message or order stored: a sweep is due within its interval of it.
    first_stored_at: datetime | None
    orders_awaiting_payment: int
    payments: PaymentsStatus
    unmapped: tuple[UnmappedStatus, ...]
    unmapped_total: int  # more than ``unmapped`` lists when over UNMAPPED_SHOWN
    accounts: tuple[AccountStatus, ...] = ()
    # How long the oldest message ready in the reconcile queue has waited (None: none waits,
    # or the broker cannot tell).
    queue_oldest_age: timedelta | None = None
    outbound: OutboundStatus = OutboundStatus()


async def gather_status(
    sessions: async_sessionmaker[AsyncSession],
    broker: dramatiq.Broker | None,
    accounts: Sequence[tuple[str, str]] = (),
    *,
    only: bool = False,
) -> Status:
    """The status; ``accounts`` (name, account_id) get a line each. With ``only`` every
    count is of those accounts alone (``status --account``); the queue depth and the unmapped
    values stay the deployment's."""
    account_ids = [account_id for _, account_id in accounts] if only else None

    def scoped(query: Any, column: Any) -> Any:
        return query if account_ids is None else query.where(column.in_(account_ids))

    async with sessions() as session:
        backlog, unqueued, oldest, checked_at = (
            await session.execute(
                scoped(
                    select(
                        func.count(),
                        func.count().filter(WebhookInbox.state == InboxState.RECEIVED),
                        type_coerce(func.now() - func.min(WebhookInbox.received_at), Interval()),
                        func.now(),
                    ).where(WebhookInbox.state.in_(WAITING_INBOX_STATES)),
                    WebhookInbox.account_id,
                )
            )
        ).one()
        if account_ids is None:
            failures = await count_open_failures(session)
        else:
            failures = sum(await _open_failures_by_account(session, account_ids))
        sweep_rows = _scoped_rows(await _sweeps(session, SweepCursor), account_ids)
        refund_sweep_rows = _scoped_rows(await _sweeps(session, RefundSweepCursor), account_ids)
        first_stored_at = await _first_stored_at(session)
        unmapped, unmapped_total = await _unmapped_values(session)
        awaiting_payment = (
            await session.execute(
                scoped(
                    select(func.count())
                    .select_from(Order)
                    .where(Order.status == OrderStatus.PENDING_PAYMENT),
                    Order.account_id,
                )
            )
        ).scalar_one()
        payments = await _payments(session)
        endpoints = await outbound.list_endpoints(session)
        pending, oldest_pending = await outbound.pending_summary(session)
        per_account = await _per_account(session, accounts) if len(accounts) > 1 or only else ()
    broker_error = await asyncio.to_thread(_ping, broker) if broker is not None else None
    return Status(
        checked_at=checked_at,
        inbox_backlog=int(backlog),
        inbox_unqueued=int(unqueued),
        oldest_unprocessed_age=oldest,
        open_failures=int(failures),
        queue_depth=None if broker_error else await asyncio.to_thread(queue_depth, broker),
        queue_oldest_age=(
            None
            if broker_error
            else _waited(checked_at, await asyncio.to_thread(_queue_oldest, broker))
        ),
        broker_error=broker_error,
        sweeps=sweep_rows,
        refund_sweeps=refund_sweep_rows,
        first_stored_at=first_stored_at,
        orders_awaiting_payment=int(awaiting_payment),
        payments=payments,
        unmapped=unmapped,
        unmapped_total=unmapped_total,
        accounts=per_account,
        outbound=OutboundStatus(
            endpoints=len(endpoints),
            disabled=tuple(e for e in endpoints if not e.enabled),
            pending=pending,
            oldest_pending_age=oldest_pending,
        ),
    )


def _scoped_rows(rows: list[SweepStatus], account_ids: Sequence[str] | None) -> list[SweepStatus]:
    return rows if account_ids is None else [r for r in rows if r.account_id in account_ids]


async def _open_failures_by_account(session: AsyncSession, account_ids: Sequence[str]) -> list[int]:
    counts = dict(
        (
            await session.execute(
                select(SyncFailure.account_id, func.count())
                .where(SyncFailure.resolved_at.is_(None), SyncFailure.account_id.in_(account_ids))
                .group_by(SyncFailure.account_id)
            )
        )
        .tuples()
        .all()
    )
    return [int(counts.get(a, 0)) for a in account_ids]


async def _per_account(
    session: AsyncSession, accounts: Sequence[tuple[str, str]]
) -> tuple[AccountStatus, ...]:
    """Each account's backlog, oldest waiting message, open failures, orders awaiting payment."""
    ids = [account_id for _, account_id in accounts]
    inbox = {
        row.account_id: row
        for row in (
            await session.execute(
                select(
                    WebhookInbox.account_id,
                    func.count().label("backlog"),
                    type_coerce(func.now() - func.min(WebhookInbox.received_at), Interval()).label(
                        "oldest"
                    ),
                )
                .where(
                    WebhookInbox.state.in_(WAITING_INBOX_STATES),
                    WebhookInbox.account_id.in_(ids),
                )
                .group_by(WebhookInbox.account_id)
            )
        ).all()
    }
    failures = await _open_failures_by_account(session, ids)
    awaiting = dict(
        (
            await session.execute(
                select(Order.account_id, func.count())
                .where(Order.status == OrderStatus.PENDING_PAYMENT, Order.account_id.in_(ids))
                .group_by(Order.account_id)
            )
        )
        .tuples()
        .all()
    )
    return tuple(
        AccountStatus(
            name=name,
            account_id=account_id,
            inbox_backlog=int(inbox[account_id].backlog) if account_id in inbox else 0,
            oldest_unprocessed_age=inbox[account_id].oldest if account_id in inbox else None,
            open_failures=failed,
            orders_awaiting_payment=int(awaiting.get(account_id, 0)),
        )
        for (name, account_id), failed in zip(accounts, failures, strict=True)
    )


async def _first_stored_at(session: AsyncSession) -> datetime | None:
    """When the first inbox message or order still stored arrived (the lowest ids: an index
    read, not a scan)."""
    times = [
        (await session.execute(select(column).order_by(key).limit(1))).scalar_one_or_none()
        for column, key in (
            (WebhookInbox.received_at, WebhookInbox.id),
            (Order.first_seen_at, Order.id),
        )
    ]
    found = [t for t in times if t is not None]
    return min(found) if found else None


def _queue_oldest(broker: dramatiq.Broker | None) -> datetime | None:
    """When the oldest message ready in the reconcile queue was enqueued; None when none waits
    or it cannot be read. Blocking."""
    if broker is None:
        return None
    try:
        found = oldest_waiting(broker)
    except Exception:  # a status command must still print the rest
        return None
    return None if found == AGE_UNKNOWN else found


def _waited(now: datetime, then: datetime | None) -> timedelta | None:
    return None if then is None else max(timedelta(0), now - then)


def _ping(broker: dramatiq.Broker) -> str | None:
    """Why the broker cannot be reached (Redis pinged, RabbitMQ connected to), or None."""
    return broker_problem(broker)


async def _payments(session: AsyncSession) -> PaymentsStatus:
    latest = (
        select(
            PaymentAttempt.account_id,
            PaymentAttempt.platform,
            PaymentAttempt.order_id,
            PaymentAttempt.state,
            PaymentAttempt.started_at,
        )
        .ext(
            distinct_on(PaymentAttempt.account_id, PaymentAttempt.platform, PaymentAttempt.order_id)
        )
        .order_by(
            PaymentAttempt.account_id,
            PaymentAttempt.platform,
            PaymentAttempt.order_id,
            PaymentAttempt.started_at.desc(),
            PaymentAttempt.id.desc(),
        )
        .subquery()
    )
    unpaid = Order.status == OrderStatus.PENDING_PAYMENT
    row = (
        await session.execute(
            select(
                func.count().filter(latest.c.state == PaymentState.UNKNOWN),
                func.count().filter(
                    latest.c.state == PaymentState.STARTED,
                    latest.c.started_at < func.now() - PAYMENT_STARTED_STALE_AFTER,
                ),
                func.count().filter(latest.c.state == PaymentState.PAY_BY_HAND, unpaid),
                func.count().filter(latest.c.state == PaymentState.HELD_BACK, unpaid),
            ).select_from(
                latest.outerjoin(
                    Order,
                    and_(
                        Order.account_id == latest.c.account_id,
                        Order.platform == latest.c.platform,
                        Order.order_id == latest.c.order_id,
                    ),
                )
            )
        )
    ).one()
    return PaymentsStatus(*(int(n) for n in row))


# A sweep's slack beyond its intervals: the scheduler's tick, the run itself, a busy database.
SWEEP_SLACK = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class HealthLimits:
    """What ``pandasync status`` holds for unhealthy (docs/operations.md)."""

    max_lag: timedelta
    sweep_max_age: timedelta
    refund_sweep_max_age: timedelta

    @classmethod
    def from_settings(cls, settings: Settings, *, max_lag_s: float) -> HealthLimits:
        """A sweep may miss one interval (held back behind a backlog, a slow run); the second
        missed interval makes it a problem."""
        return cls(
            max_lag=timedelta(seconds=max_lag_s),
            sweep_max_age=2 * timedelta(seconds=settings.sweep_interval_s) + SWEEP_SLACK,
            refund_sweep_max_age=(
                2 * timedelta(seconds=settings.refund_sweep_interval_s) + SWEEP_SLACK
            ),
        )


def problems(status: Status, limits: HealthLimits) -> list[str]:
    """Why ``status`` is unhealthy, one line each; empty when healthy. Orders awaiting payment
    and payments needing a person are not problems of the sync: they are shown, not judged."""
    found: list[str] = []
    if status.broker_error:
        found.append(
            f"the broker cannot be reached ({status.broker_error}): check that it runs and "
            "that PANDASYNC_BROKER_URL points at it"
        )
    if status.open_failures:
        found.append(
            f"{status.open_failures} open sync failure(s): `pandasync failures` lists them "
            "(`pandasync replay` once the cause is fixed, `pandasync dismiss` for one that "
            "can never succeed)"
        )
    lag = status.oldest_unprocessed_age
    if lag is not None and lag > limits.max_lag:
        found.append(
            f"the oldest unprocessed inbox message is {_age(lag)} old (limit "
            f"{_age(limits.max_lag)}, --max-lag): are the workers running?"
        )
    found += _late_sweeps(status, "sweep", status.sweeps, limits.sweep_max_age, "SWEEP_INTERVAL_S")
    found += _late_sweeps(
        status,
        "refund sweep",
        status.refund_sweeps,
        limits.refund_sweep_max_age,
        "REFUND_SWEEP_INTERVAL_S",
    )
    return found


def _late_sweeps(
    status: Status, label: str, rows: list[SweepStatus], limit: timedelta, setting: str
) -> list[str]:
    """Sweeps whose last run finished longer than ``limit`` ago. One that never finished is
    late only once the first message or order is older than ``limit``: a new install has not
    had the time."""
    now, first = status.checked_at, status.first_stored_at
    why = (
        f"(limit {_age(limit)}: twice {setting}, and a minute): is the scheduler running, "
        "with PANDASYNC_USER_ID set?"
    )
    if first is None or now - first <= limit:
        never = ""
    else:
        never = f"in the {_age(now - first)} since the first message or order was stored {why}"
    if not rows:
        return [f"no {label} has finished {never}"] if never else []
    accounts = {row.account_id for row in rows}
    late: list[str] = []
    for row in rows:
        which = f"{label} {row.platform.value}"
        if len(accounts) > 1:
            which += f" (account {row.account_id})"
        if row.last_finished_at is None:
            if never:
                late.append(f"the {which} has not finished {never}")
        elif now - row.last_finished_at > limit:
            late.append(f"the last {which} finished {_age(now - row.last_finished_at)} ago {why}")
    return late


def _age(age: timedelta) -> str:
    return str(timedelta(seconds=round(age.total_seconds())))


def status_document(status: Status, found: list[str], limits: HealthLimits) -> dict[str, Any]:
    """``status`` for ``pandasync status --json``: stable keys, times in ISO 8601, ages and
    limits in seconds (docs/operations.md)."""

    def seconds(age: timedelta | None) -> float | None:
        return None if age is None else round(age.total_seconds(), 3)

    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    def sweep(row: SweepStatus) -> dict[str, Any]:
        age = None if row.last_finished_at is None else status.checked_at - row.last_finished_at
        return {
            "account_id": row.account_id,
            "platform": row.platform.value,
            "last_finished_at": when(row.last_finished_at),
            "age_s": seconds(age),
            "examined": row.last_examined,
            "drift": row.last_drift,
        }

    accounts = [
        {
            "name": a.name,
            "account_id": a.account_id,
            "inbox_backlog": a.inbox_backlog,
            "oldest_unprocessed_age_s": seconds(a.oldest_unprocessed_age),
            "open_failures": a.open_failures,
            "orders_awaiting_payment": a.orders_awaiting_payment,
        }
        for a in status.accounts
    ]
    payments = status.payments
    return {
        "healthy": not found,
        "problems": found,
        "checked_at": when(status.checked_at),
        "inbox_backlog": status.inbox_backlog,
        "inbox_unqueued": status.inbox_unqueued,
        "oldest_unprocessed_age_s": seconds(status.oldest_unprocessed_age),
        "queue_depth": status.queue_depth,
        "queue_oldest_age_s": seconds(status.queue_oldest_age),
        "broker_error": status.broker_error,
        "open_failures": status.open_failures,
        "sweeps": [sweep(row) for row in status.sweeps],
        "refund_sweeps": [sweep(row) for row in status.refund_sweeps],
        "orders_awaiting_payment": status.orders_awaiting_payment,
        "payments_needing_a_person": {
            "total": payments.total,
            "unknown": payments.unknown,
            "started_stale": payments.started_stale,
            "pay_by_hand": payments.pay_by_hand,
            "held_back": payments.held_back,
        },
        "unmapped_total": status.unmapped_total,
        "unmapped": [
            {
                "value": u.value,
                "platform": u.platform.value if u.platform else None,
                "field": u.field.value,
                "orders": u.orders,
                "seen": u.seen,
                "first_seen_at": when(u.first_seen_at),
                "last_seen_at": when(u.last_seen_at),
            }
            for u in status.unmapped
        ],
        "outbound": {
            "endpoints": status.outbound.endpoints,
            "disabled": [
                {
                    "id": e.id,
                    "url": e.url,
                    "since": when(e.disabled_at),
                    "reason": e.disabled_reason,
                }
                for e in status.outbound.disabled
            ],
            "pending": status.outbound.pending,
            "oldest_pending_age_s": seconds(status.outbound.oldest_pending_age),
        },
        # Only with several accounts (or --account): a single-account document keeps its keys.
        **({"accounts": accounts} if accounts else {}),
        "limits": {
            "max_lag_s": seconds(limits.max_lag),
            "sweep_max_age_s": seconds(limits.sweep_max_age),
            "refund_sweep_max_age_s": seconds(limits.refund_sweep_max_age),
        },
    }


async def _sweeps(
    session: AsyncSession, table: type[SweepCursor] | type[RefundSweepCursor]
) -> list[SweepStatus]:
    """The last run of one kind of sweep, per account and platform."""
    rows = await session.execute(
        select(
            table.account_id,
            table.platform,
            table.last_finished_at,
            table.last_examined,
            table.last_drift,
        ).order_by(table.platform)
    )
    return [SweepStatus(*row) for row in rows.all()]


# The most recently seen first; the rest are in the view.
UNMAPPED_SHOWN = 20
_UNMAPPED = text(
    """
SELECT platform, field, value, sum(orders) AS orders, sum(seen_count) AS seen,
       min(first_seen_at) AS first_seen_at, max(last_seen_at) AS last_seen_at,
       count(*) OVER () AS total
FROM report_unmapped_values
GROUP BY platform, field, value
ORDER BY max(last_seen_at) DESC, platform, field, value
LIMIT :shown
"""
)


async def _unmapped_values(session: AsyncSession) -> tuple[tuple[UnmappedStatus, ...], int]:
    """The values the mapping could not place (``report_unmapped_values``, accounts summed):
    the UNMAPPED_SHOWN seen last, and how many there are."""
    rows = (await session.execute(_UNMAPPED, {"shown": UNMAPPED_SHOWN})).all()
    listed = tuple(
        UnmappedStatus(
            Platform(r.platform) if r.platform else None,
            UnmappedField(r.field),
            r.value,
            None if r.orders is None else int(r.orders),
            int(r.seen),
            r.first_seen_at,
            r.last_seen_at,
        )
        for r in rows
    )
    return listed, int(rows[0].total) if rows else 0
