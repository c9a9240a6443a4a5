"""The scheduler role: periodic jobs that run once per interval across all instances.

Any number of ``pandasync scheduler`` processes may run (for availability). A job runs when an
instance *claims* it: one atomic ``INSERT … ON CONFLICT DO UPDATE … WHERE last_started_at is
older than the interval`` on ``job_runs`` succeeds for exactly one instance per interval. A
session advisory lock held while the job runs keeps a slow run from overlapping the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import dramatiq
import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.accounts import Account
from service.broker import AGE_UNKNOWN, oldest_waiting, reconcile_message
from service.config import Settings
from service.db import session_scope
from service.domain import Platform, SyncSource
from service.ledger.models import JobRun
from workers.sweeps import OrderLister, RefundLister, SweepReport, refresh, refund_sweep, sweep

log = structlog.get_logger(__name__)

JOB_LOCK_CLASS = 0x4A42  # "JB": apart from the order locks

JOB_RUNS = Counter("pandasync_scheduler_job_runs_total", "Job runs by outcome", ["job", "outcome"])
JOB_SECONDS = Histogram(
    "pandasync_scheduler_job_seconds",
    "Duration of a job run",
    ["job"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SWEEP_EXAMINED = Counter(
    "pandasync_sweep_orders_examined_total", "Orders seen in order-list pages", ["platform"]
)
SWEEP_UNREADABLE = Counter(
    "pandasync_sweep_unreadable_records_total",
    "Order-list records that could not be read (each logged; reconciled when it has an id)",
    ["platform"],
)
SWEEP_DRIFT = Gauge(
    "pandasync_sweep_drift",
    "Orders the last sweep found out of date (lost or late messages); should trend to 0",
    ["platform"],
)
REFUND_SWEEP_EXAMINED = Counter(
    "pandasync_refund_sweep_examined_total", "Refunds seen in refund-list pages", ["platform"]
)
REFUND_SWEEP_UNREADABLE = Counter(
    "pandasync_refund_sweep_unreadable_records_total",
    "Refund-list records that could not be read (each logged; its order reconciled when shown)",
    ["platform"],
)
REFUND_SWEEP_DRIFT = Gauge(
    "pandasync_refund_sweep_drift",
    "Refunds the last refund sweep found missing or out of date (lost messages); should trend to 0",
    ["platform"],
)


JOB_HELD_BACK = Gauge(
    "pandasync_scheduler_job_held_back",
    "1 while a job that asks for reconciles waits for those of its last run to leave the queue",
    ["job"],
    multiprocess_mode="mostrecent",
)

# When the oldest reconcile still waiting in the broker was enqueued; None when none waits.
Backlog = Callable[[], Awaitable[datetime | None]]


@dataclass(frozen=True, slots=True)
class Job:
    """``backlog``, for a job that asks for reconciles: it is held back while reconciles
    enqueued before its last run ended still wait. Running again then would only ask for the
    same orders again, behind the same backlog; nothing is missed by waiting (a sweep starts
    from its cursor)."""

    name: str
    interval: timedelta
    run: Callable[[], Awaitable[object]]
    backlog: Backlog | None = None


async def claim(sessions: async_sessionmaker[AsyncSession], job: Job) -> bool:
    """True for exactly one caller per interval, whatever the number of instances."""
    stmt = (
        insert(JobRun)
        .values(job=job.name, last_started_at=func.now())
        .on_conflict_do_update(
            index_elements=["job"],
            set_={"last_started_at": func.now()},
            where=(JobRun.last_started_at.is_(None))
            | (JobRun.last_started_at <= func.now() - job.interval),
        )
        .returning(JobRun.job)
    )
    async with session_scope(sessions) as session:
        return (await session.execute(stmt)).scalar_one_or_none() is not None


async def _finish(sessions: async_sessionmaker[AsyncSession], job: Job, error: str | None) -> None:
    async with session_scope(sessions) as session:
        await session.execute(
            text(
                "UPDATE job_runs SET last_finished_at = now(), last_error = :error WHERE job = :job"
            ),
            {"job": job.name, "error": error},
        )


async def held_back(sessions: async_sessionmaker[AsyncSession], job: Job) -> bool:
    """Whether reconciles enqueued before ``job``'s last run ended still wait in the broker."""
    if job.backlog is None:
        return False
    waiting_since = await job.backlog()
    held = False
    if waiting_since is not None:
        async with sessions() as session:
            last_end = (
                await session.execute(
                    select(func.greatest(JobRun.last_started_at, JobRun.last_finished_at)).where(
                        JobRun.job == job.name
                    )
                )
            ).scalar_one_or_none()
        held = last_end is not None and last_end >= waiting_since
    JOB_HELD_BACK.labels(job.name).set(int(held))
    return held


async def run_claimed(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession], job: Job
) -> bool:
    """Run ``job`` if it is not held back and this instance claims it; returns whether it ran."""
    if await held_back(sessions, job) or not await claim(sessions, job):
        return False
    key = zlib.crc32(job.name.encode()) & 0x7FFFFFFF
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        locked = (
            await autocommit.execute(
                text("SELECT pg_try_advisory_lock(:c, :k)"), {"c": JOB_LOCK_CLASS, "k": key}
            )
        ).scalar_one()
        if not locked:
            JOB_RUNS.labels(job.name, "overlap").inc()
            return False
        error: str | None = None
        try:
            with JOB_SECONDS.labels(job.name).time():
                await job.run()
            JOB_RUNS.labels(job.name, "ok").inc()
        except Exception as exc:  # a failing job must not stop the scheduler
            error = f"{type(exc).__name__}: {exc}"[:2000]
            JOB_RUNS.labels(job.name, "error").inc()
            log.exception("scheduled job failed", job=job.name)
        finally:
            await autocommit.execute(
                text("SELECT pg_advisory_unlock(:c, :k)"), {"c": JOB_LOCK_CLASS, "k": key}
            )
    await _finish(sessions, job, error)
    return True


async def run_scheduler(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    jobs: Sequence[Job],
    stop: asyncio.Event,
    *,
    tick: float = 1.0,
) -> None:
    """Claim and run due jobs until ``stop`` is set; a running job finishes before exit."""
    log.info("scheduler started", jobs=[j.name for j in jobs])
    while not stop.is_set():
        for job in jobs:
            if stop.is_set():
                break
            try:
                await run_claimed(engine, sessions, job)
            except Exception:  # the database may be away for a while: keep ticking
                log.exception("could not claim job", job=job.name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=tick)
    log.info("scheduler stopped")


def backlog_of(broker: dramatiq.Broker) -> Backlog:
    """The ``Backlog`` of ``broker``'s reconcile queue. A broker that cannot be read, or cannot
    tell the age, holds nothing back (a sweep's sends then tell whether it is there)."""

    async def waiting_since() -> datetime | None:
        try:
            since = await asyncio.to_thread(oldest_waiting, broker)
        except Exception:
            return None
        return None if since is AGE_UNKNOWN else since

    return waiting_since


class Enqueuer(Protocol):
    """Sends one reconcile message; both ``Enqueue`` and ``EnqueueNaming`` of the sweeps."""

    def __call__(
        self,
        account_id: str,
        platform: Platform,
        order_id: str,
        source: SyncSource,
        refund_id: str | None = None,
    ) -> None: ...


def enqueue_with(broker: dramatiq.Broker) -> Enqueuer:
    """An ``Enqueuer`` that sends reconcile messages on ``broker``."""

    def enqueue(
        account_id: str,
        platform: Platform,
        order_id: str,
        source: SyncSource,
        refund_id: str | None = None,
    ) -> None:
        broker.enqueue(
            reconcile_message(
                account_id, platform.value, order_id, source=source.value, refund_id=refund_id
            )
        )

    return enqueue


class Lister(OrderLister, RefundLister, Protocol):
    """What the sweeps page through (``PandaPonClient``)."""


@dataclass(frozen=True, slots=True)
class SweepMetrics:
    """Where one kind of sweep reports: its log line and its per-platform metrics."""

    event: str
    examined: Counter
    unreadable: Counter
    drift: Gauge


ORDER_SWEEP_METRICS = SweepMetrics("sweep finished", SWEEP_EXAMINED, SWEEP_UNREADABLE, SWEEP_DRIFT)
REFUND_SWEEP_METRICS = SweepMetrics(
    "refund sweep finished", REFUND_SWEEP_EXAMINED, REFUND_SWEEP_UNREADABLE, REFUND_SWEEP_DRIFT
)


def observe_sweep(metrics: SweepMetrics, report: SweepReport) -> SweepReport:
    """Count a finished sweep into its metrics and log it; returns ``report``."""
    platform = report.platform.value
    metrics.examined.labels(platform).inc(report.examined)
    metrics.drift.labels(platform).set(report.drift)
    metrics.unreadable.labels(platform).inc(report.unreadable)
    log.info(
        metrics.event,
        platform=platform,
        examined=report.examined,
        drift=report.drift,
        pages=report.pages,
        unreadable=report.unreadable,
    )
    return report


JOB_NAME_CHARS = 64  # job_runs.job


def job_name(name: str, platform: Platform, account: Account | None = None) -> str:
    """``name:platform``, or ``name:platform@account`` for an account of the accounts file
    (the single-account settings keep the names, and so the job_runs rows, they always had);
    a name too long for job_runs.job is shortened with a checksum that keeps it unique."""
    base = f"{name}:{platform.value}"
    if account is None or not account.in_file:
        return base
    full = f"{base}@{account.name}"
    if len(full) <= JOB_NAME_CHARS:
        return full
    digest = f"{zlib.crc32(account.name.encode()):08x}"
    return f"{full[: JOB_NAME_CHARS - len(digest) - 1]}~{digest}"


def sweep_jobs(
    name: str,
    interval_s: float,
    run: Callable[[Platform], Awaitable[SweepReport]],
    metrics: SweepMetrics,
    backlog: Backlog,
    account: Account | None = None,
) -> list[Job]:
    """One job per platform (and account), held back behind the reconcile backlog."""
    jobs = []
    for platform in Platform:

        async def run_one(platform: Platform = platform) -> object:
            return observe_sweep(metrics, await run(platform))

        jobs.append(
            Job(
                job_name(name, platform, account),
                timedelta(seconds=interval_s),
                run_one,
                backlog,
            )
        )
    return jobs


def default_jobs(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    client: Lister | Mapping[str, Lister],
    broker: dramatiq.Broker,
    relay: Callable[[], Awaitable[object]] | None = None,
) -> list[Job]:
    """Sweep and refund sweep per account and platform, refresh, and the inbox relay, at
    their intervals. ``client``: the only account's lister, or every account's by user-id
    (``WorkerRuntime.clients``)."""
    enqueue = enqueue_with(broker)
    backlog = backlog_of(broker)
    jobs: list[Job] = []
    for account in settings.accounts():
        if not account.user_id:
            log.warning("PANDASYNC_USER_ID is not set: no sweep (it needs the account to page)")
            continue
        lister = client.get(account.user_id) if isinstance(client, Mapping) else client
        if lister is None:
            continue
        jobs += _sweeps_of(settings, sessions, lister, enqueue, backlog, account)

    async def run_refresh() -> object:
        return await refresh(
            sessions, enqueue, stale_after=timedelta(hours=settings.refresh_stale_hours)
        )

    jobs.append(
        Job("refresh", timedelta(seconds=settings.refresh_interval_s), run_refresh, backlog)
    )
    if relay is not None:
        jobs.append(Job("relay", timedelta(seconds=settings.relay_interval_s), relay))
    return jobs


def _sweeps_of(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    client: Lister,
    enqueue: Enqueuer,
    backlog: Backlog,
    account: Account,
) -> list[Job]:
    """One account's order and refund sweeps, a job per platform each."""
    account_id = account.user_id or account.name

    async def order_sweep(platform: Platform) -> SweepReport:
        lookback = timedelta(seconds=settings.sweep_lookback_s)
        return await sweep(sessions, client, enqueue, account_id, platform, lookback=lookback)

    async def refunds_sweep(platform: Platform) -> SweepReport:
        lookback = timedelta(seconds=settings.refund_sweep_lookback_s)
        return await refund_sweep(
            sessions, client, enqueue, account_id, platform, lookback=lookback
        )

    return [
        *sweep_jobs(
            "sweep", settings.sweep_interval_s, order_sweep, ORDER_SWEEP_METRICS, backlog, account
        ),
        *sweep_jobs(
            "refund_sweep",
            settings.refund_sweep_interval_s,
            refunds_sweep,
            REFUND_SWEEP_METRICS,
            backlog,
            account,
        ),
    ]
