"""RabbitMQ keeps every property Redis has: each test here runs on both brokers.

- a burst of messages for one order is coalesced (at most 3 upstream detail fetches for 10);
- the upstream rate limit is shared by several worker processes (within 10 % of the setting);
- readiness and ``pandasync status`` reach the broker: queue depth, the oldest message's age.

RabbitMQ is ``PANDASYNC_TEST_RABBITMQ_URL`` (default the local one); each test gets a vhost of its
own (``tests.support.rabbitmq``). Without a server a test is skipped on a laptop, failed on CI.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.app import _check_broker
from service.broker import (
    RECONCILE_QUEUE,
    broker_problem,
    make_broker,
    oldest_ready_rabbitmq,
    queue_depth,
    reconcile_message,
)
from service.config import load_settings
from service.pandapon.ratelimit import (
    PostgresTokenBucket,
    RedisTokenBucket,
    make_rate_limiter,
    rate_limit_backend,
)
from tests.support.broker import BROKERS, enqueue_aged
from tests.support.rabbitmq import rabbitmq_url
from tests.support.stack import Stack, burst_detail_fetches
from workers.operations import gather_status

pytestmark = pytest.mark.redis

__all__ = ["rabbitmq_url"]  # the fixture, used by name

LINES = [{"title": "保温杯", "quantity": 2, "unit_price": "25.00", "product_id": "p-cup"}]


# --- readiness and status ---------------------------------------------------------------


async def test_readiness_reaches_the_broker(broker: dramatiq.Broker) -> None:
    assert broker_problem(broker) is None
    assert await _check_broker(broker) == "ok"


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:9/0", "amqp://guest:guest@127.0.0.1:9/"], ids=BROKERS
)
async def test_readiness_fails_fast_when_the_broker_is_down(url: str) -> None:
    down = make_broker(load_settings(broker_url=url))
    started = time.monotonic()
    try:
        check = await _check_broker(down)
    finally:
        down.close()
    assert check.startswith("unavailable: "), check
    assert time.monotonic() - started < 3.0
    assert broker_problem(down) is not None


def test_queue_depth_counts_the_waiting_and_the_delayed(broker: dramatiq.Broker) -> None:
    assert queue_depth(broker) == 0
    enqueue_aged(broker, 5)
    broker.enqueue(reconcile_message("acct", "taobao", "later", source="sweep"), delay=60_000)
    deadline = time.monotonic() + 5
    while queue_depth(broker) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # RabbitMQ counts a published message a moment later
    assert queue_depth(broker) == 2


# gather_status's payments query uses DISTINCT ON through ``distinct(...)``, which this
# SQLAlchemy deprecates (a warning, an error under pytest's settings): not this test's subject.
async def test_status_shows_the_queue_depth_and_the_oldest_age(
    broker: dramatiq.Broker, fresh_sessions: async_sessionmaker[AsyncSession]
) -> None:
    empty = await gather_status(fresh_sessions, broker)
    assert (empty.broker_error, empty.queue_depth, empty.queue_oldest_age) == (None, 0, None)
    enqueue_aged(broker, 90)
    enqueue_aged(broker, 5)
    status = await gather_status(fresh_sessions, broker)
    for _ in range(50):  # RabbitMQ counts a published message a moment later
        if status.queue_depth == 2:
            break
        await asyncio.sleep(0.1)
        status = await gather_status(fresh_sessions, broker)
    assert status.queue_depth == 2
    assert status.queue_oldest_age is not None
    assert abs(status.queue_oldest_age - timedelta(seconds=90)) < timedelta(seconds=5)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:9/0", "amqp://guest:guest@127.0.0.1:9/"], ids=BROKERS
)
async def test_status_says_the_broker_is_down(
    url: str, fresh_sessions: async_sessionmaker[AsyncSession]
) -> None:
    down = make_broker(load_settings(broker_url=url))
    try:
        status = await gather_status(fresh_sessions, down)
    finally:
        down.close()
    assert status.broker_error is not None
    assert (status.queue_depth, status.queue_oldest_age) == (None, None)


def test_the_oldest_message_on_rabbitmq_is_read_and_left_in_place(rabbitmq_url: str) -> None:
    broker = make_broker(load_settings(broker_url=rabbitmq_url))
    try:
        broker.declare_queue(RECONCILE_QUEUE)
        assert oldest_ready_rabbitmq(broker) is None
        enqueue_aged(broker, 120)
        enqueue_aged(broker, 10)
        time.sleep(0.2)
        head = oldest_ready_rabbitmq(broker)
        assert head is not None
        assert abs(head - (datetime.now(UTC) - timedelta(seconds=120))) < timedelta(seconds=2)
        assert queue_depth(broker) == 2  # looked at, not taken
        again = oldest_ready_rabbitmq(broker)
        assert again == head  # still the head
    finally:
        broker.close()


# --- the shared upstream rate limit ---------------------------------------------------------

RATE = 20.0
PROCESSES = 3
RUN_S = 4.0
WARMUP_S = 1.0  # past the bucket's initial burst


def _take_tokens(settings: dict[str, Any], ready: Any, start: Any, queue: Any) -> None:
    """One worker-like process: once every process is ready, take tokens as fast as the limit
    lets it until ``RUN_S`` after the common start (``start``, set by the test)."""

    async def run() -> list[float]:
        limiter = make_rate_limiter(load_settings(**settings))
        taken: list[float] = []
        try:
            ready.put(True)  # imported, connected: a slow start costs no share of the window
            start_at: float = await asyncio.to_thread(start.get, True, 120)
            await asyncio.sleep(max(0.0, start_at - time.time()))
            while time.time() < start_at + RUN_S:
                await limiter.acquire()
                taken.append(time.time())
        finally:
            await limiter.aclose()
        return taken

    queue.put(asyncio.run(run()))


@pytest.mark.parametrize("store", ["postgres", "redis"])
async def test_three_processes_share_the_rate_limit_on_rabbitmq(
    store: str, rabbitmq_url: str, own_redis: str, fresh_database_url: str
) -> None:
    settings: dict[str, Any] = {
        "broker_url": rabbitmq_url,
        "database_url": fresh_database_url,
        "upstream_rate_limit_rps": RATE,
    }
    if store == "redis":
        settings["rate_limit_redis_url"] = own_redis
    assert rate_limit_backend(load_settings(**settings)) == store
    probe = make_rate_limiter(load_settings(**settings))
    expected = PostgresTokenBucket if store == "postgres" else RedisTokenBucket
    assert isinstance(probe, expected)
    await probe.aclose()

    context = multiprocessing.get_context("spawn")
    ready, start, queue = context.Queue(), context.Queue(), context.Queue()
    processes = [
        context.Process(target=_take_tokens, args=(settings, ready, start, queue))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        await asyncio.to_thread(ready.get, True, 120)
    start_at = time.time() + 0.5
    for _ in processes:
        start.put(start_at)
    results = [await asyncio.to_thread(queue.get, True, 60) for _ in processes]
    for process in processes:
        process.join(10)
    taken = sorted(t for result in results for t in result)
    window = (start_at + WARMUP_S, start_at + RUN_S)
    in_window = [t for t in taken if window[0] <= t < window[1]]
    measured = len(in_window) / (window[1] - window[0])
    per_process = [len(r) for r in results]
    print(
        f"{store}: {measured:.2f} requests/s over {window[1] - window[0]:.0f} s "
        f"(limit {RATE}); per process {per_process}",
        file=sys.stderr,
    )
    assert all(n > 0 for n in per_process), per_process  # each process got its share
    assert abs(measured - RATE) <= RATE * 0.10, (measured, per_process)


async def test_a_pause_in_the_postgres_bucket_stops_every_process(fresh_database_url: str) -> None:
    one = PostgresTokenBucket(fresh_database_url, RATE, key="acct-pause")
    other = PostgresTokenBucket(fresh_database_url, RATE, key="acct-pause")
    elsewhere = PostgresTokenBucket(fresh_database_url, RATE, key="acct-other")
    try:
        assert await other.try_take() == 0.0
        await one.pause(1.0)
        assert 0.8 < await other.try_take() <= 1.0  # the row says so, for every process
        assert await elsewhere.try_take() == 0.0  # another account's bucket is its own
        for n in range(3):  # three orders limited within the window: the account's limit
            await one.note_limited(f"order-{n}", 2.0)
        assert 1.8 < await other.try_take() <= 2.0
    finally:
        for bucket in (one, other, elsewhere):
            await bucket.aclose()


# --- coalescing, end to end ---------------------------------------------------------------


@pytest.fixture
async def stack(
    broker_url: str, fresh_database_url: str, clean_redis: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    running = Stack(
        fresh_database_url, clean_redis, tmp_path, settings={"PANDASYNC_BROKER_URL": broker_url}
    )
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        print(running.logs())  # shown by pytest when the test failed


@pytest.mark.e2e
async def test_a_burst_for_one_order_costs_at_most_three_detail_fetches(stack: Stack) -> None:
    fetches = await burst_detail_fetches(stack, LINES)
    print(f"detail fetches for a burst of 10: {fetches}", file=sys.stderr)
    assert 1 <= fetches <= 3, fetches
