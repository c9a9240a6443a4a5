"""The dramatiq broker, chosen from settings, shared by the web role (which enqueues) and the
workers (which consume). Import this before any actor module.

``redis://`` → RedisBroker, ``amqp://`` → RabbitmqBroker, unset → StubBroker (in-process, for
``pandasync dev`` and tests; a Worker in the same process consumes it). dramatiq would otherwise
build a default broker to localhost on the first actor import, silently.

Messages are addressed by actor name, so the web role can enqueue a reconcile without importing
the actors (``reconcile_message``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
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


def enqueue_replays(broker: dramatiq.Broker, orders: Iterable[tuple[str, str, str]]) -> None:
    """A reconcile (source ``replay``) of each (account_id, platform, order_id): what
    ``pandasync replay`` and the console's Replay send. Blocking: the broker client is."""
    for account_id, platform, order_id in orders:
        broker.enqueue(reconcile_message(account_id, platform, order_id, source="replay"))


def _redis_list(broker: Any, queue_name: str) -> str:
    """dramatiq's Redis key of a queue's list of waiting message ids; ``.msgs`` beside it holds
    their bodies, ``.DQ`` is the queue of delayed messages."""
    return f"{broker.namespace}:{queue_name}"


def queue_depth(broker: dramatiq.Broker | None) -> int | None:
    """Messages waiting in the reconcile queue, delayed ones included (Redis and RabbitMQ;
    None when it cannot be read). Blocking."""
    from dramatiq.brokers.redis import RedisBroker

    try:
        if isinstance(broker, RedisBroker):
            full_name = _redis_list(broker, RECONCILE_QUEUE)
            return int(broker.client.llen(full_name)) + int(broker.client.llen(f"{full_name}.DQ"))
        if broker is not None and _is_rabbitmq(broker):
            with rabbitmq_connection(broker) as connection:
                return sum(
                    _rabbitmq_count(connection, name)
                    for name in (RECONCILE_QUEUE, f"{RECONCILE_QUEUE}.DQ")
                )
    except Exception:  # a status command must still print the database half
        return None
    return None


# A check of RabbitMQ (readiness, status) gives up after this long: one attempt, no retries.
RABBITMQ_CHECK_TIMEOUT_S = 2.0


def _is_rabbitmq(broker: dramatiq.Broker | None) -> bool:
    return type(broker).__name__ == "RabbitmqBroker" and hasattr(broker, "parameters")


@contextmanager
def rabbitmq_connection(
    broker: dramatiq.Broker, timeout_s: float = RABBITMQ_CHECK_TIMEOUT_S
) -> Iterator[Any]:
    """A connection of its own, with short timeouts and one attempt, closed after the block:
    the broker's own connections are per thread and retry for long. Blocking."""
    import pika  # type: ignore[import-untyped]

    configured = broker.parameters  # type: ignore[attr-defined]
    first = configured[0] if isinstance(configured, list) else configured
    parameters = copy.copy(first)
    parameters.connection_attempts = 1
    parameters.retry_delay = 0
    parameters.socket_timeout = timeout_s
    parameters.stack_timeout = timeout_s
    parameters.blocked_connection_timeout = timeout_s
    connection = pika.BlockingConnection(parameters)
    try:
        yield connection
    finally:
        with suppress(Exception):
            connection.close()


def _rabbitmq_count(connection: Any, queue_name: str) -> int:
    """Messages ready in ``queue_name`` (a passive declare: 0 when it does not exist yet, as
    dramatiq declares queues on first use). A channel each: the broker closes the channel that
    asked about a missing queue."""
    import pika.exceptions  # type: ignore[import-untyped]

    try:
        declared = connection.channel().queue_declare(queue=queue_name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == 404:
            return 0
        raise
    return int(declared.method.message_count)


def broker_problem(broker: dramatiq.Broker | None) -> str | None:
    """Why the broker cannot be reached, in a few words; None when it answers (or is the
    in-process one). Redis is pinged, RabbitMQ connected to. Blocking: call it off the loop."""
    if broker is None or isinstance(broker, StubBroker):
        return None
    try:
        client = getattr(broker, "client", None)  # Redis
        if client is not None:
            client.ping()
        elif _is_rabbitmq(broker):
            with rabbitmq_connection(broker):
                pass
    except Exception as error:
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return None


def oldest_ready_rabbitmq(
    broker: dramatiq.Broker, queue_name: str = RECONCILE_QUEUE
) -> datetime | None:
    """When the message at the head of a RabbitMQ queue was enqueued (None if none waits).

    RabbitMQ has no peek: the head is fetched unacknowledged and rejected with requeue, which puts
    it back at its place (a consumer may see it marked redelivered; dramatiq ignores that). One
    short-lived connection per call: meant for a pass every few seconds (the relay, the
    scheduler's backlog check, ``pandasync status``), not for a tight loop. Blocking; raises
    when unreachable."""
    import pika.exceptions

    with rabbitmq_connection(broker) as connection:
        channel = connection.channel()
        try:
            method, _properties, body = channel.basic_get(queue=queue_name, auto_ack=False)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:  # not declared yet: nothing ever waited
                return None
            raise
        if method is None:
            return None
        channel.basic_nack(delivery_tag=method.delivery_tag, requeue=True)
    return _enqueued_at(body)


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
    elif _is_rabbitmq(broker):
        return oldest_ready_rabbitmq(broker, queue_name)
    return AGE_UNKNOWN if data is None else _enqueued_at(data)


def _enqueued_at(data: bytes) -> datetime:
    try:
        return dramatiq.Message.decode(data).message_datetime
    except Exception:  # not one of ours: its age is unknown, so nothing is taken for lost
        return AGE_UNKNOWN
