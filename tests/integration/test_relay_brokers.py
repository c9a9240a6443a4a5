"""The relay's "the broker lost it" test on the real brokers, Redis and RabbitMQ.

A ``queued`` row is handed off again only once the broker's queue has moved past it: the oldest
message still waiting was enqueued REQUEUE_AFTER_S after the row was handed off. On Redis the
head is read from dramatiq's list; on RabbitMQ it is fetched and put back (there is no peek). Both
must leave the waiting messages where they were.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import dramatiq
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.broker import oldest_waiting, queue_depth
from service.config import load_settings
from service.db import make_engine, make_sessionmaker
from service.webhooks.relay import relay_once
from tests.integration.test_webhook_inbox import insert_rows, states
from tests.support.broker import enqueue_aged
from tests.support.webhook_checks import fetch

pytestmark = pytest.mark.redis


@pytest.fixture
async def sessions(fresh_database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(fresh_database_url, load_settings(database_url=fresh_database_url))
    yield make_sessionmaker(engine)
    await engine.dispose()


async def handed_off_since(url: str, since: datetime) -> set[int]:
    rows = await fetch(url, "SELECT id FROM webhook_inbox WHERE queued_at >= $1", since)
    return {r["id"] for r in rows}


async def database_now(url: str) -> datetime:
    [row] = await fetch(url, "SELECT now() AS now")
    moment: datetime = row["now"]
    return moment


async def test_only_rows_the_queue_moved_past_are_handed_off_again(
    broker: dramatiq.Broker, sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    settings = load_settings(database_url=fresh_database_url, requeue_after_s=30.0)
    waiting = await insert_rows(fresh_database_url, age_s=60, n=2, state="queued")
    lost = await insert_rows(fresh_database_url, age_s=200, n=1, state="queued")
    # The head of a backlog, enqueued 100 s ago: rows handed off 30 s before it or later may
    # still wait behind it; the one handed off 200 s ago was lost.
    enqueue_aged(broker, 100, order_id="head")
    enqueue_aged(broker, 10, order_id="behind")
    before = await database_now(fresh_database_url)

    assert await relay_once(sessions, broker, settings) == 1

    assert await handed_off_since(fresh_database_url, before) == set(lost)
    assert {(await states(fresh_database_url))[i] for i in waiting} == {"queued"}
    # Sent again, behind the two: handed off just now, so not a third time.
    assert await relay_once(sessions, broker, settings) == 0
    assert queue_depth(broker) == 3
    # Reading the head left it at the head, as old as it was.
    head = oldest_waiting(broker)
    assert head is not None
    assert oldest_waiting(broker) == head
    assert (await database_now(fresh_database_url)) - head > timedelta(seconds=95)


async def test_an_empty_queue_means_every_stale_row_was_lost(
    broker: dramatiq.Broker, sessions: async_sessionmaker[AsyncSession], fresh_database_url: str
) -> None:
    settings = load_settings(database_url=fresh_database_url, requeue_after_s=30.0)
    lost = await insert_rows(fresh_database_url, age_s=60, n=2, state="queued")
    await insert_rows(fresh_database_url, age_s=5, n=1, state="queued")
    before = await database_now(fresh_database_url)

    assert await relay_once(sessions, broker, settings) == 2

    assert await handed_off_since(fresh_database_url, before) == set(lost)
    assert queue_depth(broker) == 2
