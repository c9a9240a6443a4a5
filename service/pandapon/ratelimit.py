"""The upstream rate limit, shared by every worker thread and process: a token bucket.

Where the bucket lives (``rate_limit_backend``), so that every worker process on every host
shares one limit and one clock, whatever the broker:

- ``PANDASYNC_RATE_LIMIT_REDIS_URL`` when set, else the broker's Redis (``PANDASYNC_BROKER_URL``
  is ``redis://``): one Redis hash, taken by an atomic Lua script that reads Redis's own clock;
- a RabbitMQ broker without that Redis: one row per account in Postgres (``rate_limit_buckets``),
  taken by one locking UPDATE that reads the database's clock;
- no broker (``pandasync dev``, one process): an in-process bucket.

A caller that finds the bucket empty *waits* for its token; it never fails, so a worker's
retries are never spent on our own limiter. ``pause(seconds)`` stops everyone for a while.

A 429 is one order's business until it is clearly the account's: the client reports each one
with ``note_limited(subject, retry_after)`` (the subject is the order, refund or page asked
for), and only when ``ACCOUNT_WIDE_SUBJECTS`` different subjects were limited within
``ACCOUNT_WIDE_WINDOW_S`` does the limiter pause everyone, for the Retry-After (at most
``MAX_PAUSE_S``). One answer, however long its Retry-After, never stalls other orders: the worker
delays that order's message instead (``workers.policy``). PandaPon documents no rate limit;
429 (HTTP or envelope code) is the one signal assumed (docs/upstream.md#rate-limits), with no
scope, so no single answer is taken as account-wide.

The bucket holds ``burst`` tokens (default: one second's worth) and refills at ``rate``/s, so
over any window of ``t`` seconds at most ``burst + rate * t`` requests go out.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.accounts import Account
from service.config import Settings

log = structlog.get_logger(__name__)

DEFAULT_KEY = "pandasync:ratelimit:upstream"
MAX_PAUSE_S = 60.0  # the longest everyone pauses at once, whatever Retry-After says
ACCOUNT_WIDE_SUBJECTS = 3  # different orders (or pages) limited ...
ACCOUNT_WIDE_WINDOW_S = 10.0  # ... within this many seconds: the limit is the account's
DEFAULT_ACCOUNT_PAUSE_S = 1.0  # the pause when the 429 gave no Retry-After
MAX_POLL_S = 1.0
MIN_WAIT_S = 0.001  # never spin: a wait below this (float rounding) is rounded up
EPSILON = 1e-9

Sleep = Callable[[float], Awaitable[None]]


class AccountPaused(Exception):
    """The account's calls are paused (an account-wide limit) for ``seconds`` more, and the
    caller asked not to wait that out (``defer_when_paused``): a worker thread waiting for one
    account would be a thread the other accounts cannot use."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the account's upstream calls are paused for {seconds:.1f} s")
        self.seconds = seconds


_defer: ContextVar[bool] = ContextVar("pandasync_defer_when_paused", default=False)


@contextmanager
def defer_when_paused() -> Iterator[None]:
    """In this block (this task), a call that finds its account paused raises AccountPaused
    instead of waiting: the reconcile gives its message back, delayed, and the worker thread
    serves other accounts meanwhile."""
    token = _defer.set(True)
    try:
        yield
    finally:
        _defer.reset(token)


def _check_pause(wait: float, rate: float) -> None:
    """A wait longer than one token's refill (1/rate) can only be a pause."""
    if _defer.get() and wait > 1.0 / rate + MIN_WAIT_S:
        raise AccountPaused(wait)


class RateLimiter(Protocol):
    async def acquire(self) -> None:
        """Return once a request may be sent (waiting as long as that takes)."""

    async def pause(self, seconds: float) -> None:
        """Let no request through for ``seconds`` (at most ``MAX_PAUSE_S``)."""

    async def note_limited(self, subject: str, retry_after: float | None) -> float:
        """A call about ``subject`` was answered 429. Pauses everyone when the limit is the
        account's; returns that pause in seconds, 0.0 when it is ``subject``'s own."""

    async def aclose(self) -> None: ...


def account_pause_s(retry_after: float | None) -> float:
    """How long an account-wide limit pauses everyone."""
    wanted = DEFAULT_ACCOUNT_PAUSE_S if retry_after is None else retry_after
    return min(max(wanted, 0.0), MAX_PAUSE_S)


def _log_account_wide(seconds: float, bucket: str | None = None) -> None:
    log.warning(
        "upstream rate limit is account-wide: every upstream call of the account waits; if "
        "this repeats, lower PANDASYNC_UPSTREAM_RATE_LIMIT_RPS (or the account's "
        "rate_limit_rps)",
        bucket=bucket,
        seconds=seconds,
        orders_limited=ACCOUNT_WIDE_SUBJECTS,
        within_s=ACCOUNT_WIDE_WINDOW_S,
    )


def _default_burst(rate: float) -> float:
    return max(1.0, rate)


class LocalTokenBucket:
    """An in-process token bucket; safe across threads and event loops."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else _default_burst(rate)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()
        self._blocked_until = 0.0
        self._limited: dict[str, float] = {}  # subject -> when it was last answered 429

    def try_take(self) -> float:
        """Take a token: 0.0 when granted, else the seconds to wait before trying again."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)
            self._stamp = now
            if now < self._blocked_until:
                return max(MIN_WAIT_S, self._blocked_until - now)
            if self._tokens >= 1 - EPSILON:
                self._tokens = max(0.0, self._tokens - 1)
                return 0.0
            return max(MIN_WAIT_S, (1 - self._tokens) / self.rate)

    async def acquire(self) -> None:
        while (wait := self.try_take()) > 0:
            _check_pause(wait, self.rate)
            await self._sleep(wait)

    async def pause(self, seconds: float) -> None:
        with self._lock:
            self._pause_locked(seconds)

    def _pause_locked(self, seconds: float) -> None:
        until = self._clock() + min(max(seconds, 0.0), MAX_PAUSE_S)
        self._blocked_until = max(self._blocked_until, until)

    async def note_limited(self, subject: str, retry_after: float | None) -> float:
        with self._lock:
            now = self._clock()
            self._limited[subject] = now
            self._limited = {
                s: at for s, at in self._limited.items() if at > now - ACCOUNT_WIDE_WINDOW_S
            }
            if len(self._limited) < ACCOUNT_WIDE_SUBJECTS:
                return 0.0
            # Counted once: the next account-wide pause needs as many new limits.
            self._limited.clear()
            seconds = account_pause_s(retry_after)
            self._pause_locked(seconds)
        _log_account_wide(seconds)
        return seconds

    async def aclose(self) -> None:
        return None


# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst. Returns the seconds to wait, "0" = granted.
_ACQUIRE_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'blocked_until')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
local blocked = tonumber(state[3]) or 0
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if now < blocked then
  wait = math.max(0.001, blocked - now)
elseif tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  wait = math.max(0.001, (1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'ts', string.format('%.6f', now))
local ttl = math.max(burst / rate, blocked - now, 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return string.format('%.6f', wait)
"""

# Sets the bucket's blocked_until to now + seconds unless it already blocks longer.
_BLOCK_LUA = """
local function block(key, now, seconds)
  local deadline = now + seconds
  local blocked = tonumber(redis.call('HGET', key, 'blocked_until')) or 0
  if deadline > blocked then
    redis.call('HSET', key, 'blocked_until', string.format('%.6f', deadline))
    local ttl = redis.call('PTTL', key)
    local needed = math.ceil(seconds * 1000) + 1000
    if ttl < needed then redis.call('PEXPIRE', key, needed) end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS[1]: the bucket; ARGV[1]: seconds during which no token is granted.
_PAUSE_LUA = (
    _BLOCK_LUA
    + """
block(KEYS[1], now, tonumber(ARGV[1]))
return 1
"""
)

# KEYS[1]: the bucket; KEYS[2]: the subjects limited lately (a sorted set scored by time);
# ARGV: subject, window (s), subjects that make the limit account-wide, pause (s).
# Returns the pause applied, "0" when the limit is still the subject's own.
_NOTE_LIMITED_LUA = (
    _BLOCK_LUA
    + """
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000) + 1000)
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[3]) then return '0' end
redis.call('DEL', KEYS[2])
block(KEYS[1], now, tonumber(ARGV[4]))
return ARGV[4]
"""
)


class _SharedBucket:
    """What the shared buckets have in common: the wait loop over ``try_take``, and the
    in-process bucket they fall back to (saying so once in the log) when their store cannot be
    reached, rather than stopping every upstream call."""

    store = ""  # named in the log line
    store_errors: tuple[type[Exception], ...] = ()

    def __init__(
        self, rate: float, burst: float | None, *, key: str, sleep: Sleep = asyncio.sleep
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else _default_burst(rate)
        self.key = key
        self._sleep = sleep
        self._fallback = LocalTokenBucket(rate, self.burst, sleep=sleep)
        self._degraded = False

    async def try_take(self) -> float:
        """One attempt: 0.0 when granted, else the seconds to wait. Raises ``store_errors``."""
        raise NotImplementedError

    async def acquire(self) -> None:
        while True:
            try:
                wait = await self.try_take()
            except self.store_errors as error:
                self._note_degraded(error)
                await self._fallback.acquire()
                return
            self._degraded = False
            if wait <= 0:
                return
            _check_pause(wait, self.rate)
            # A little jitter so waiting processes do not all ask again in the same instant.
            await self._sleep(min(wait, MAX_POLL_S) * (1 + random.random() * 0.1))

    def _note_degraded(self, error: Exception) -> None:
        if not self._degraded:
            log.warning(
                f"rate limit falls back to this process: {self.store} unavailable",
                error=type(error).__name__,
            )
        self._degraded = True


class RedisTokenBucket(_SharedBucket):
    """The token bucket in Redis, shared by every process that uses the same ``key``."""

    store = "Redis"
    store_errors = (RedisError,)

    def __init__(
        self,
        redis_url: str,
        rate: float,
        burst: float | None = None,
        *,
        key: str = DEFAULT_KEY,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(rate, burst, key=key, sleep=sleep)
        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._pause = self._redis.register_script(_PAUSE_LUA)
        self._note_limited = self._redis.register_script(_NOTE_LIMITED_LUA)

    async def try_take(self) -> float:
        """One attempt: 0.0 when granted, else the seconds to wait. Raises RedisError."""
        result = await self._acquire(keys=[self.key], args=[repr(self.rate), repr(self.burst)])
        text = result.decode() if isinstance(result, bytes) else str(result)
        return float(text)

    async def pause(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), MAX_PAUSE_S)
        try:
            await self._pause(keys=[self.key], args=[repr(seconds)])
        except RedisError as error:
            self._note_degraded(error)
            await self._fallback.pause(seconds)

    async def note_limited(self, subject: str, retry_after: float | None) -> float:
        seconds = account_pause_s(retry_after)
        args: list[str | int] = [
            subject,
            repr(ACCOUNT_WIDE_WINDOW_S),
            ACCOUNT_WIDE_SUBJECTS,
            repr(seconds),
        ]
        try:
            result = await self._note_limited(keys=[self.key, f"{self.key}:limited"], args=args)
        except RedisError as error:
            self._note_degraded(error)
            return await self._fallback.note_limited(subject, retry_after)
        paused = float(result.decode() if isinstance(result, bytes) else result)
        if paused > 0:
            _log_account_wide(paused, self.key)
        return paused

    async def aclose(self) -> None:
        await self._redis.aclose()


# One round trip, atomic: the row is locked (concurrent takers queue on it), refilled by the
# database clock's elapsed time, and a token taken if one is there. Returns the seconds to wait,
# 0 when granted. Times are epoch seconds; ``stamp`` never goes back (a taker that read the
# clock before waiting for the lock).
_PG_ACQUIRE = text(
    """
WITH b AS (
  SELECT key, blocked_until,
         least(CAST(:burst AS float8),
               tokens + greatest(0.0, extract(epoch FROM clock_timestamp()) - stamp)
                        * CAST(:rate AS float8)) AS tokens,
         greatest(stamp, extract(epoch FROM clock_timestamp())) AS now
  FROM rate_limit_buckets WHERE key = :key FOR UPDATE
)
UPDATE rate_limit_buckets AS r
SET tokens = CASE WHEN b.now >= b.blocked_until AND b.tokens >= 1 - 1e-9
                  THEN greatest(0.0, b.tokens - 1) ELSE b.tokens END,
    stamp = b.now
FROM b WHERE r.key = b.key
RETURNING CASE WHEN b.now < b.blocked_until THEN greatest(0.001, b.blocked_until - b.now)
               WHEN b.tokens >= 1 - 1e-9 THEN 0.0
               ELSE greatest(0.001, (1 - b.tokens) / CAST(:rate AS float8)) END AS wait
"""
)
_PG_CREATE = text(
    "INSERT INTO rate_limit_buckets (key, tokens, stamp, blocked_until) "
    "VALUES (:key, CAST(:burst AS float8), extract(epoch FROM clock_timestamp()), 0) "
    "ON CONFLICT (key) DO NOTHING"
)
_PG_PAUSE = text(
    "UPDATE rate_limit_buckets SET blocked_until = greatest(blocked_until, "
    "extract(epoch FROM clock_timestamp()) + CAST(:seconds AS float8)) WHERE key = :key"
)


class PostgresTokenBucket(_SharedBucket):
    """The token bucket in a Postgres row (``rate_limit_buckets``), shared by every process that
    uses the same ``key``: the limit of a RabbitMQ deployment without a Redis.

    Which orders were limited lately (``note_limited``) is counted in this process; the
    account-wide pause it leads to is shared through the row.
    """

    store = "Postgres"
    store_errors = (SQLAlchemyError, OSError)

    def __init__(
        self,
        database_url: str,
        rate: float,
        burst: float | None = None,
        *,
        key: str = DEFAULT_KEY,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(rate, burst, key=key, sleep=sleep)
        # Its own small pool: one statement per upstream call, never inside a reconcile's lock.
        self._engine: AsyncEngine = create_async_engine(
            database_url,
            pool_size=2,
            max_overflow=4,
            pool_pre_ping=True,
            isolation_level="AUTOCOMMIT",
            connect_args={"server_settings": {"application_name": "pandasync-ratelimit"}},
        )
        self._created = False
        self._counter = LocalTokenBucket(rate, self.burst, sleep=sleep)  # note_limited's count

    async def _ensure_row(self) -> None:
        if not self._created:
            async with self._engine.connect() as conn:
                await conn.execute(_PG_CREATE, {"key": self.key, "burst": self.burst})
            self._created = True

    async def try_take(self) -> float:
        """One attempt: 0.0 when granted, else the seconds to wait. Raises SQLAlchemyError."""
        await self._ensure_row()
        params = {"key": self.key, "rate": self.rate, "burst": self.burst}
        async with self._engine.connect() as conn:
            wait = (await conn.execute(_PG_ACQUIRE, params)).scalar_one_or_none()
        if wait is None:  # the row was deleted under us: make it again
            self._created = False
            return MIN_WAIT_S
        return float(wait)

    async def pause(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), MAX_PAUSE_S)
        try:
            await self._ensure_row()
            async with self._engine.connect() as conn:
                await conn.execute(_PG_PAUSE, {"key": self.key, "seconds": seconds})
        except self.store_errors as error:
            self._note_degraded(error)
            await self._fallback.pause(seconds)

    async def note_limited(self, subject: str, retry_after: float | None) -> float:
        paused = await self._counter.note_limited(subject, retry_after)
        if paused > 0:
            await self.pause(paused)
        return paused

    async def aclose(self) -> None:
        await self._engine.dispose()


def limiter_key(account: Account | None) -> str:
    """The Redis key of ``account``'s bucket: PandaPon limits per account, so each has its own
    bucket and its own account-wide pause. The single-account settings keep the key they
    always had."""
    if account is None or not account.in_file:
        return DEFAULT_KEY
    return f"{DEFAULT_KEY}:{account.name}"


def rate_limit_backend(settings: Settings) -> str:
    """Where the shared bucket lives for ``settings``: ``redis`` (PANDASYNC_RATE_LIMIT_REDIS_URL,
    else a Redis broker), ``postgres`` (a RabbitMQ broker without that Redis) or ``process``
    (no broker: ``pandasync dev``, or no database to share it through)."""
    if _redis_url(settings):
        return "redis"
    if settings.broker_url and settings.database_url:
        return "postgres"
    return "process"


def _redis_url(settings: Settings) -> str | None:
    if settings.rate_limit_redis_url:
        return settings.rate_limit_redis_url
    url = settings.broker_url
    if url and url.startswith(("redis://", "rediss://")):
        return url
    return None


_backend_logged = False


def log_rate_limit_backend(settings: Settings) -> None:
    """Say once per process where the limit lives (the first limiter made says it): a
    per-process limit multiplies the limit by the processes."""
    global _backend_logged
    if _backend_logged:
        return
    _backend_logged = True
    backend = rate_limit_backend(settings)
    if backend == "process" and settings.broker_url:
        log.warning(
            "upstream rate limit is per process: each worker process sends up to the limit; set "
            "PANDASYNC_DATABASE_URL or PANDASYNC_RATE_LIMIT_REDIS_URL to share it",
            backend=backend,
        )
    else:
        log.info("upstream rate limit", backend=backend, shared=backend != "process")


def make_rate_limiter(
    settings: Settings, *, key: str | None = None, account: Account | None = None
) -> RateLimiter:
    """``account``'s limiter (default: the only account's), on ``rate_limit_backend``'s
    store. The caller closes it."""
    if account is None:
        account = settings.accounts()[0]
    rate = account.rate_limit_rps or settings.upstream_rate_limit_rps
    log_rate_limit_backend(settings)
    key = key or limiter_key(account)
    redis_url = _redis_url(settings)
    if redis_url:
        return RedisTokenBucket(redis_url, rate, key=key)
    if settings.broker_url and settings.database_url:  # rate_limit_backend: "postgres"
        return PostgresTokenBucket(settings.database_url, rate, key=key)
    return LocalTokenBucket(rate)
