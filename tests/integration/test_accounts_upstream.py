"""Per-account upstream care, on Redis: each account has its own bucket and its own
account-wide pause, so one account's 429s never hold back another's calls; the workers and the
scheduler pick each account's client by the account_id of the work."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.accounts import Account
from service.config import Settings, load_settings
from service.pandapon.ratelimit import (
    ACCOUNT_WIDE_SUBJECTS,
    DEFAULT_KEY,
    AccountPaused,
    LocalTokenBucket,
    RedisTokenBucket,
    defer_when_paused,
    limiter_key,
    make_rate_limiter,
)
from workers.runtime import UnknownAccount, WorkerRuntime
from workers.scheduler import default_jobs

ACCOUNTS = """
[accounts.shop-a]
user_id = "2200001"
access_key = "ak-a"
access_secret = "secret-a-0123456789"
rate_limit_rps = 2

[accounts.shop-b]
user_id = "2200002"
access_key = "ak-b"
access_secret = "secret-b-0123456789"
api_base_url = "http://127.0.0.1:1"
"""


def two_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> Settings:
    for name in ("USER_ID", "ACCESS_KEY", "ACCESS_SECRET", "WEBHOOK_TOKEN"):
        monkeypatch.delenv(f"PANDASYNC_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    return load_settings(accounts_file=path, **overrides)


def test_each_account_has_its_own_key_and_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = two_accounts(
        tmp_path, monkeypatch, broker_url="redis://cache:6379/0", upstream_rate_limit_rps=7
    )
    a, b = settings.accounts()
    limiter_a = make_rate_limiter(settings, account=a)
    limiter_b = make_rate_limiter(settings, account=b)
    assert isinstance(limiter_a, RedisTokenBucket)
    assert isinstance(limiter_b, RedisTokenBucket)
    assert (limiter_a.key, limiter_a.rate) == (f"{DEFAULT_KEY}:shop-a", 2.0)
    assert (limiter_b.key, limiter_b.rate) == (f"{DEFAULT_KEY}:shop-b", 7.0)
    # The single-account settings keep the key every deployment has used so far.
    single = Account("default", "u", "k", None)
    assert limiter_key(single) == DEFAULT_KEY


async def test_an_account_wide_pause_of_one_account_leaves_the_other_free(own_redis: str) -> None:
    a = RedisTokenBucket(own_redis, 50.0, key=f"{DEFAULT_KEY}:shop-a")
    b = RedisTokenBucket(own_redis, 50.0, key=f"{DEFAULT_KEY}:shop-b")
    try:
        paused = 0.0
        for n in range(ACCOUNT_WIDE_SUBJECTS):
            paused = await a.note_limited(f"taobao order {n}", retry_after=30)
        assert paused == 30.0
        assert await a.try_take() > 25  # A waits out its pause ...
        for _ in range(10):
            assert await b.try_take() == 0.0  # ... B goes on at its own rate
        client = aioredis.Redis.from_url(own_redis)
        try:
            blocked = await client.hget(f"{DEFAULT_KEY}:shop-a", "blocked_until")
            assert blocked is not None
            assert await client.hget(f"{DEFAULT_KEY}:shop-b", "blocked_until") is None
        finally:
            await client.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_the_worker_runtime_has_a_client_per_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_redis: str
) -> None:
    settings = two_accounts(
        tmp_path,
        monkeypatch,
        broker_url=own_redis,
        database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
        api_base_url="http://127.0.0.1:2",
    )
    runtime = WorkerRuntime.build(settings)
    try:
        a = runtime.client_for("2200001")
        b = runtime.client_for("2200002")
        assert a.account.name == "shop-a"
        assert b.account.name == "shop-b"
        assert "127.0.0.1:2" in repr(a)
        assert "127.0.0.1:1" in repr(b)
        with pytest.raises(UnknownAccount, match="not in PANDASYNC_ACCOUNTS_FILE"):
            runtime.client_for("2200003")
        keys = {getattr(limiter, "key", None) for limiter in runtime.limiters}
        assert keys == {f"{DEFAULT_KEY}:shop-a", f"{DEFAULT_KEY}:shop-b"}
        jobs = default_jobs(settings, runtime.sessions, runtime.clients, broker=_NoBroker())
        names = {job.name for job in jobs}
        assert {"sweep:taobao@shop-a", "sweep:1688@shop-b", "refund_sweep:1688@shop-a"} <= names
        assert "sweep:taobao" not in names
    finally:
        await runtime.aclose()


class _NoBroker:
    """Enough of a broker to build the jobs (nothing is sent)."""

    def enqueue(self, message: object) -> None:
        raise AssertionError("nothing is sent while building jobs")


async def test_a_reconcile_does_not_wait_out_its_accounts_pause(own_redis: str) -> None:
    """Under ``defer_when_paused`` (the worker's reconciles) a paused account raises at once;
    an ordinary refill wait, and a caller that did not ask (sweeps, commands), still wait."""
    bucket = RedisTokenBucket(own_redis, 20.0, key=f"{DEFAULT_KEY}:shop-a")
    local = LocalTokenBucket(20.0)
    try:
        for limiter in (bucket, local):
            for _ in range(25):  # past the burst: the next tokens are a refill wait away
                with defer_when_paused():
                    await limiter.acquire()
            await limiter.pause(20)
            with defer_when_paused(), pytest.raises(AccountPaused) as paused:
                await limiter.acquire()
            assert 15 < paused.value.seconds <= 20
    finally:
        await bucket.aclose()
