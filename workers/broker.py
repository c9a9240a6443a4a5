"""The dramatiq broker, chosen from settings. Import this before any actor module.

``redis://`` → RedisBroker, ``amqp://`` → RabbitmqBroker, unset → StubBroker (in-process, for
``pandasync dev`` and tests; a Worker in the same process consumes it). dramatiq would otherwise
build a default broker to localhost on the first actor import, silently.

Messages are addressed by actor name, so the web role can enqueue a reconcile without importing
the actors (``reconcile_message``).
"""

from __future__ import annotations

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
) -> dramatiq.Message[Any]:
    """The message that asks a worker to reconcile one order."""
    return dramatiq.Message(
        queue_name=RECONCILE_QUEUE,
        actor_name=RECONCILE_ACTOR,
        args=(account_id, platform, order_id),
        kwargs={"source": source, "inbox_id": inbox_id, "request_id": request_id},
        options={},
    )
