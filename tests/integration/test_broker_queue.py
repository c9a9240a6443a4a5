"""How old the oldest waiting reconcile is, read from a real Redis and a real RabbitMQ (the
relay's test of loss)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dramatiq
import pytest

from service.broker import (
    RECONCILE_QUEUE,
    oldest_waiting,
    queue_depth,
    reconcile_message,
)
from tests.support.broker import enqueue_aged
from workers.scheduler import backlog_of

pytestmark = pytest.mark.redis


def test_an_empty_queue_has_nothing_waiting(broker: dramatiq.Broker) -> None:
    assert oldest_waiting(broker) is None


def test_the_head_of_the_queue_is_the_oldest_waiting(broker: dramatiq.Broker) -> None:
    enqueue_aged(broker, 120)
    enqueue_aged(broker, 10)
    head = oldest_waiting(broker)
    assert head is not None
    assert abs(head - (datetime.now(UTC) - timedelta(seconds=120))) < timedelta(seconds=2)


def test_a_fetched_message_no_longer_waits(broker: dramatiq.Broker) -> None:
    enqueue_aged(broker, 120)
    enqueue_aged(broker, 10)
    consumer = broker.consume(RECONCILE_QUEUE, prefetch=1, timeout=500)
    try:
        fetched = next(consumer)  # in a worker's hands: in flight, not waiting
        assert fetched is not None
        head = oldest_waiting(broker)
        assert head is not None
        assert datetime.now(UTC) - head < timedelta(seconds=15)
        consumer.ack(fetched)
    finally:
        consumer.close()


# On RabbitMQ: tests/integration/test_rabbitmq_parity.py (which waits for RabbitMQ's count).
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_queue_depth_counts_the_waiting_and_the_delayed(broker: dramatiq.Broker) -> None:
    assert queue_depth(broker) == 0
    enqueue_aged(broker, 5)
    broker.enqueue(reconcile_message("acct", "taobao", "later", source="sweep"), delay=60_000)
    assert queue_depth(broker) == 2
    assert queue_depth(None) is None


async def test_the_schedulers_backlog_reads_the_same_head(broker: dramatiq.Broker) -> None:
    backlog = backlog_of(broker)
    assert await backlog() is None
    enqueue_aged(broker, 300)
    since = await backlog()
    assert since is not None
    assert abs(since - (datetime.now(UTC) - timedelta(seconds=300))) < timedelta(seconds=2)
