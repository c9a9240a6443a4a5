"""The token bucket, on a fake clock: grants counted, waits computed, never a failure; and which
429s pause everyone (an account-wide limit) and which delay only their own order."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from service.config import load_settings
from service.domain import Platform
from service.pandapon.client import PandaPonClient
from service.pandapon.errors import UpstreamRateLimited
from service.pandapon.ratelimit import (
    ACCOUNT_WIDE_SUBJECTS,
    ACCOUNT_WIDE_WINDOW_S,
    DEFAULT_ACCOUNT_PAUSE_S,
    MAX_PAUSE_S,
    LocalTokenBucket,
    RateLimiter,
    RedisTokenBucket,
    make_rate_limiter,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


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


# --- one order's limit, or the account's (the client at the PandaPon boundary) ---------------

HUGE_RETRY_AFTER = "86400"


def limited_for(*order_ids: str) -> Callable[[httpx.Request], httpx.Response]:
    """PandaPon answering 429 with a day's Retry-After for ``order_ids``, the truth otherwise."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("orderId") in order_ids:
            body = {"requestId": "r", "code": 429, "msg": "too many requests"}
            return httpx.Response(429, headers={"Retry-After": HUGE_RETRY_AFTER}, json=body)
        return httpx.Response(200, json={"requestId": "r", "code": 200, "data": ORDER_DETAIL})

    return answer


ORDER_DETAIL = json.loads((FIXTURES / "taobao" / "order_detail__paid.json").read_text())


@asynccontextmanager
async def client_on(
    answer: Callable[[httpx.Request], httpx.Response], limiter: RateLimiter
) -> AsyncIterator[PandaPonClient]:
    settings = load_settings(
        api_base_url="https://pandapon.test",
        access_key="ak",
        access_secret="sk",
        user_id="u",
        broker_url=None,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        yield PandaPonClient(settings, http, limiter=limiter)


async def test_a_huge_retry_after_on_one_order_does_not_delay_another() -> None:
    limiter, time = bucket(100.0)
    async with client_on(limited_for("A"), limiter) as client:
        for _ in range(ACCOUNT_WIDE_SUBJECTS + 1):  # retries of the same order count once
            with pytest.raises(UpstreamRateLimited) as caught:
                await client.order_detail(Platform.TAOBAO, "A")
            assert caught.value.retry_after == 86400.0  # the worker delays order A by it
        await client.order_detail(Platform.TAOBAO, "B")
    assert time.slept == []


async def test_an_account_wide_limit_pauses_every_call_capped() -> None:
    limiter, time = bucket(100.0)
    limited = [f"L{n}" for n in range(ACCOUNT_WIDE_SUBJECTS)]
    async with client_on(limited_for(*limited), limiter) as client:
        for order_id in limited:
            with pytest.raises(UpstreamRateLimited):
                await client.order_detail(Platform.TAOBAO, order_id)
        assert time.slept == []
        await client.order_detail(Platform.TAOBAO, "B")
    assert sum(time.slept) == pytest.approx(MAX_PAUSE_S)
    assert MAX_PAUSE_S <= 60


async def test_limits_spread_beyond_the_window_stay_each_orders_own() -> None:
    limiter, time = bucket(100.0)
    limited = [f"L{n}" for n in range(ACCOUNT_WIDE_SUBJECTS)]
    async with client_on(limited_for(*limited), limiter) as client:
        for order_id in limited:
            with pytest.raises(UpstreamRateLimited):
                await client.order_detail(Platform.TAOBAO, order_id)
            time.now += ACCOUNT_WIDE_WINDOW_S / (ACCOUNT_WIDE_SUBJECTS - 1) + 0.1
        await client.order_detail(Platform.TAOBAO, "B")
    assert time.slept == []


async def test_an_account_wide_limit_without_retry_after_pauses_briefly() -> None:
    limiter, time = bucket(100.0)
    for n in range(ACCOUNT_WIDE_SUBJECTS):
        paused = await limiter.note_limited(f"order {n}", None)
    assert paused == DEFAULT_ACCOUNT_PAUSE_S
    await limiter.acquire()
    assert sum(time.slept) == pytest.approx(DEFAULT_ACCOUNT_PAUSE_S)


@pytest.mark.redis
async def test_the_shared_bucket_tells_one_orders_limit_from_the_accounts(own_redis: str) -> None:
    key = f"pandasync:test:ratelimit:{uuid.uuid4().hex}"
    first = RedisTokenBucket(own_redis, 1000.0, key=key)
    second = RedisTokenBucket(own_redis, 1000.0, key=key)  # another worker process
    try:
        assert await first.note_limited("order A", 86400.0) == 0.0
        assert await second.note_limited("order A", 86400.0) == 0.0
        assert await first.try_take() == 0.0  # one order's limit: nobody waits
        assert await second.note_limited("order B", 86400.0) == 0.0
        assert await first.note_limited("order C", 86400.0) == MAX_PAUSE_S
        wait = await second.try_take()
        assert MAX_PAUSE_S - 1 < wait <= MAX_PAUSE_S  # everyone waits, for the cap at most
    finally:
        await first.aclose()
        await second.aclose()
