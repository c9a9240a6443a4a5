"""Broker selection: a Redis that hangs must not block a sender forever."""

from __future__ import annotations

from service.broker import make_broker, with_socket_timeouts
from service.config import load_settings


def test_socket_timeouts_are_added_unless_the_url_sets_them() -> None:
    assert with_socket_timeouts("redis://h:6379/0") == (
        "redis://h:6379/0?socket_timeout=10&socket_connect_timeout=5"
    )
    assert with_socket_timeouts("redis://h:6379/0?socket_timeout=2") == (
        "redis://h:6379/0?socket_timeout=2&socket_connect_timeout=5"
    )


def test_the_redis_broker_uses_them() -> None:
    broker = make_broker(load_settings(broker_url="redis://127.0.0.1:6379/15"))
    try:
        kwargs = broker.client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        assert kwargs["socket_timeout"] == 10.0
        assert kwargs["socket_connect_timeout"] == 5.0
    finally:
        broker.close()
