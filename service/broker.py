"""The dramatiq broker, chosen from settings, shared by the web role (which enqueues) and the
workers (which consume). Import this before any actor module.

``redis://`` → RedisBroker, ``amqp://`` → RabbitmqBroker, unset → StubBroker (in-process, for
``pandasync dev`` and tests; a Worker in the same process consumes it). dramatiq would otherwise
build a default broker to localhost on the first actor import, silently.

Messages are addressed by actor name, so the web role can enqueue a reconcile without importing
the actors (``reconcile_message``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from service.config import Settings

RECONCILE_ACTOR = "reconcile"
RECONCILE_QUEUE = "reconcile"


def make_broker(settings: Settings) -> dramatiq.Broker:
    url = settings.broker_url
    broker: dramatiq.Broker
    if url is None:
        broker = StubBroker()
    elif url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=with_socket_timeouts(url), namespace="pandasync")  # type: ignore[no-untyped-call]
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=url)
    broker.add_middleware(AsyncIO())
    return broker


# A Redis that hangs (rather than refusing) must not block a sender or a worker forever.
# dramatiq's consumers poll without blocking commands, so a plain socket timeout is safe.
REDIS_SOCKET_TIMEOUTS = {"socket_timeout": "10", "socket_connect_timeout": "5"}


def with_socket_timeouts(url: str) -> str:
    """``url`` with socket timeouts added, unless it sets its own."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in REDIS_SOCKET_TIMEOUTS.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


def configure_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker for ``settings`` and make it dramatiq's global broker."""
    broker = make_broker(settings)
    dramatiq.set_broker(broker)
    return broker


def reconcile_message(
    account_id: str,
    platform: str,
    order_id: str,
    *,
    source: str,
    inbox_id: int | None = None,
    request_id: str | None = None,
    refund_id: str | None = None,
) -> dramatiq.Message[Any]:
    """The message that asks a worker to reconcile one order; ``refund_id`` names an
    after-sales record to fetch with it (a refund sweep's find, which the order may no longer
    name). Only set when given, so every other message keeps its shape."""
    kwargs: dict[str, Any] = {"source": source, "inbox_id": inbox_id, "request_id": request_id}
    if refund_id is not None:
        kwargs["refund_id"] = refund_id
    return dramatiq.Message(
        queue_name=RECONCILE_QUEUE,
        actor_name=RECONCILE_ACTOR,
        args=(account_id, platform, order_id),
        kwargs=kwargs,
        options={},
    )


def _redis_list(broker: Any, queue_name: str) -> str:
    """dramatiq's Redis key of a queue's list of waiting message ids; ``.msgs`` beside it holds
    their bodies, ``.DQ`` is the queue of delayed messages."""
    return f"{broker.namespace}:{queue_name}"


def queue_depth(broker: dramatiq.Broker | None) -> int | None:
    """Messages waiting in the reconcile queue (Redis only; None when it cannot be read)."""
    from dramatiq.brokers.redis import RedisBroker

    if not isinstance(broker, RedisBroker):
        return None
    full_name = _redis_list(broker, RECONCILE_QUEUE)
    try:
        return int(broker.client.llen(full_name)) + int(broker.client.llen(f"{full_name}.DQ"))
    except Exception:  # a status command must still print the database half
        return None


# What ``oldest_waiting`` answers when messages wait but their age cannot be read: as old as
# anything, so nothing is taken for lost while the broker still holds work.
AGE_UNKNOWN = datetime.min.replace(tzinfo=UTC)

# One round trip, atomic: the head of the queue (a message id) and that message's data.
_REDIS_HEAD = """
local id = redis.call('lindex', KEYS[1], 0)
if not id then return nil end
return {id, redis.call('hget', KEYS[2], id) or ''}
"""


def oldest_waiting(broker: dramatiq.Broker, queue_name: str = RECONCILE_QUEUE) -> datetime | None:
    """When the oldest message still waiting in ``queue_name`` was enqueued; None if none waits.

    Messages fetched by a worker (in flight, or held for a delayed retry) are not waiting.
    Blocking. A broker that cannot tell the age answers ``AGE_UNKNOWN`` while anything waits.
    """
    from dramatiq.brokers.redis import RedisBroker

    data: bytes | None = None
    if isinstance(broker, StubBroker):
        waiting = broker.queues[queue_name]
        with waiting.mutex:
            if not waiting.queue:
                return None
            data = waiting.queue[0]
    elif isinstance(broker, RedisBroker):
        full_name = _redis_list(broker, queue_name)
        head = broker.client.eval(_REDIS_HEAD, 2, full_name, f"{full_name}.msgs")
        if head is None:
            return None
        data = head[1] or None
    elif hasattr(broker, "get_queue_message_counts"):  # RabbitmqBroker: counts, no ages
        ready, _delayed, _dead = broker.get_queue_message_counts(queue_name)
        if ready == 0:
            return None
    if data is None:
        return AGE_UNKNOWN
    return dramatiq.Message.decode(data).message_datetime
