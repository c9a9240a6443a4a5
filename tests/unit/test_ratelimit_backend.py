"""Where the shared upstream rate limit lives, for each broker (``rate_limit_backend``)."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings
from service.pandapon.ratelimit import (
    LocalTokenBucket,
    PostgresTokenBucket,
    RedisTokenBucket,
    make_rate_limiter,
    rate_limit_backend,
)

DB = "postgresql+asyncpg://u@db:5432/pandasync"
AMQP = "amqp://guest:guest@rabbit:5672/"


@pytest.mark.parametrize(
    ("settings", "backend", "kind"),
    [
        ({"broker_url": "redis://cache:6379/0", "database_url": DB}, "redis", RedisTokenBucket),
        ({"broker_url": AMQP, "database_url": DB}, "postgres", PostgresTokenBucket),
        (
            {"broker_url": AMQP, "database_url": DB, "rate_limit_redis_url": "redis://rl:6379/3"},
            "redis",
            RedisTokenBucket,
        ),
        ({"broker_url": AMQP, "database_url": None}, "process", LocalTokenBucket),
        ({"broker_url": None, "database_url": DB}, "process", LocalTokenBucket),
    ],
    ids=["redis-broker", "rabbitmq", "rabbitmq-with-redis", "rabbitmq-no-database", "dev"],
)
async def test_the_backend_follows_the_settings(
    settings: dict[str, str | None], backend: str, kind: type
) -> None:
    loaded = load_settings(**settings)
    assert rate_limit_backend(loaded) == backend
    limiter = make_rate_limiter(loaded)
    assert isinstance(limiter, kind)
    await limiter.aclose()  # connections are lazy: nothing was opened


async def test_the_rate_limit_redis_overrides_the_brokers() -> None:
    loaded = load_settings(broker_url="redis://cache:6379/0", rate_limit_redis_url="redis://rl/3")
    limiter = make_rate_limiter(loaded)
    assert isinstance(limiter, RedisTokenBucket)
    assert limiter._redis.connection_pool.connection_kwargs["host"] == "rl"
    await limiter.aclose()


def test_the_rate_limit_redis_must_be_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="PANDASYNC_RATE_LIMIT_REDIS_URL: must be a redis://"):
        load_settings(rate_limit_redis_url="amqp://guest@rabbit/")
