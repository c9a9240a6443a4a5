"""The in-process token bucket, on a fake clock: grants counted, waits computed, never a failure."""

from __future__ import annotations

import pytest

from service.config import load_settings
from service.pandapon.ratelimit import (
    MAX_PAUSE_S,
    LocalTokenBucket,
    RedisTokenBucket,
    make_rate_limiter,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(rate: float, burst: float | None = None) -> tuple[LocalTokenBucket, FakeTime]:
    time = FakeTime()
    return LocalTokenBucket(rate, burst, clock=time.clock, sleep=time.sleep), time


async def test_a_full_bucket_grants_its_burst_then_waits_one_interval_per_token() -> None:
    limiter, time = bucket(10.0, burst=3.0)
    granted_at = []
    for _ in range(6):
        await limiter.acquire()
        granted_at.append(time.now)
    assert granted_at == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])


async def test_grants_in_any_window_never_exceed_burst_plus_rate() -> None:
    limiter, time = bucket(5.0)  # burst defaults to one second's worth
    granted_at = []
    for _ in range(40):
        await limiter.acquire()
        granted_at.append(time.now)
    for start in granted_at:
        in_window = [t for t in granted_at if start <= t < start + 1.0]
        assert len(in_window) <= 5 + 5
    assert granted_at[-1] == pytest.approx((40 - 5) / 5.0)


async def test_idle_time_refills_up_to_the_burst_only() -> None:
    limiter, time = bucket(2.0, burst=2.0)
    for _ in range(2):
        await limiter.acquire()
    time.now += 60.0
    assert [limiter.try_take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


async def test_pause_holds_every_caller_for_the_retry_after() -> None:
    limiter, time = bucket(100.0)
    await limiter.pause(7.0)
    await limiter.acquire()
    assert time.now == pytest.approx(7.0)
    await limiter.pause(10 * MAX_PAUSE_S)
    await limiter.acquire()
    assert time.now == pytest.approx(7.0 + MAX_PAUSE_S)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LocalTokenBucket(0)


async def test_the_limiter_follows_the_broker_setting() -> None:
    local = make_rate_limiter(load_settings(broker_url=None, upstream_rate_limit_rps=3))
    assert isinstance(local, LocalTokenBucket)
    assert local.rate == 3
    amqp = make_rate_limiter(load_settings(broker_url="amqp://guest@rabbit/"))
    assert isinstance(amqp, LocalTokenBucket)
    shared = make_rate_limiter(load_settings(broker_url="redis://cache:6379/0"))
    assert isinstance(shared, RedisTokenBucket)
    await shared.aclose()  # connections are lazy: nothing was opened
