"""The scheduler: each job runs once per interval however many instances run."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from service.db import make_sessionmaker
from tests.support.webhook_checks import sample
from workers.scheduler import Job, run_claimed, run_scheduler


async def test_two_instances_run_each_job_once_per_interval(fresh_database_url: str) -> None:
    interval = timedelta(seconds=1)
    runs: list[tuple[str, str, datetime]] = []
    engines = [create_async_engine(fresh_database_url) for _ in range(2)]
    stop = asyncio.Event()
    enough = asyncio.Event()  # each job ran three times

    def job_for(instance: str, name: str) -> Job:
        async def run() -> None:
            async with engines[0].connect() as conn:
                now = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
            runs.append((instance, name, now))
            if all(sum(n == job for _, n, _ in runs) >= 3 for job in ("sweep", "relay")):
                enough.set()

        return Job(name, interval, run)

    tasks = [
        asyncio.create_task(
            run_scheduler(
                engine,
                make_sessionmaker(engine),
                [job_for(f"i{n}", "sweep"), job_for(f"i{n}", "relay")],
                stop,
                tick=0.05,
            )
        )
        for n, engine in enumerate(engines)
    ]
    await asyncio.wait_for(enough.wait(), timeout=30)
    stop.set()
    await asyncio.gather(*tasks)
    for engine in engines:
        await engine.dispose()

    for name in ("sweep", "relay"):
        times = sorted(t for _, n, t in runs if n == name)
        # Never two runs inside one interval, whichever instance claimed them (two instances
        # without the claim would run each job about twice an interval).
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= interval - timedelta(milliseconds=50) for gap in gaps), gaps
    assert {instance for instance, _, _ in runs} <= {"i0", "i1"}


async def test_a_failing_job_is_recorded_and_the_scheduler_goes_on(
    fresh_database_url: str,
) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    stop = asyncio.Event()
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        stop.set()
        raise RuntimeError("upstream unreachable")

    await run_scheduler(engine, sessions, [Job("sweep", timedelta(seconds=60), boom)], stop)
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT last_error, last_finished_at FROM job_runs"))).one()
    await engine.dispose()
    assert calls == 1
    assert row[0] == "RuntimeError: upstream unreachable"
    assert row[1] is not None


async def test_a_job_waits_while_the_reconciles_of_its_last_run_still_wait(
    fresh_database_url: str,
) -> None:
    engine = create_async_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    runs: list[datetime] = []
    # The broker's oldest waiting reconcile, as the test sets it (None: nothing waits).
    waiting_since: list[datetime | None] = [None]

    async def sweep() -> None:
        runs.append(datetime.now(UTC))

    async def backlog() -> datetime | None:
        return waiting_since[0]

    job = Job("sweep:taobao", timedelta(0), sweep, backlog)
    assert await run_claimed(engine, sessions, job)  # first run: nothing waits
    # Reconciles enqueued during that run still wait: held back, however due it is.
    waiting_since[0] = runs[-1] - timedelta(seconds=1)
    assert not await run_claimed(engine, sessions, job)
    assert sample("pandasync_scheduler_job_held_back", job="sweep:taobao") == 1
    # The queue has moved past the end of the last run: it runs again.
    waiting_since[0] = datetime.now(UTC) + timedelta(seconds=1)
    assert await run_claimed(engine, sessions, job)
    waiting_since[0] = None
    assert await run_claimed(engine, sessions, job)
    assert sample("pandasync_scheduler_job_held_back", job="sweep:taobao") == 0
    assert len(runs) == 3
    await engine.dispose()
