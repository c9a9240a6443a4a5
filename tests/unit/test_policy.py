"""The retry policy: what is retried, how long it waits, what is recorded, what is given back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from sqlalchemy.exc import DBAPIError

from service.config import load_settings
from service.domain import FailureKind, Platform, ReconcileRequest, SyncSource
from service.pandapon.client import PandaPonClient, upstream_budget
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    UpstreamBudgetExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from workers import actors, policy, runtime
from workers.reconcile import Outcome, ReconcileResult


@pytest.mark.parametrize(
    "error",
    [UpstreamTimeout("t"), UpstreamServerError("5xx"), ConnectionRefusedError("db away")],
)
def test_transient_errors_are_retried_with_growing_backoff(error: Exception) -> None:
    delays = []
    for retries in range(policy.MAX_RETRIES):
        decision = policy.decide(error, retries)
        assert isinstance(decision, policy.Retry)
        delays.append(decision.delay_ms)
    ceilings = [min(policy.MAX_BACKOFF_MS, policy.MIN_BACKOFF_MS << r) for r in range(8)]
    assert all(c // 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))


def _wrapped(error: Exception) -> DBAPIError:
    """A database error as SQLAlchemy raises it from asyncpg."""
    return DBAPIError("SELECT 1", None, error)


@pytest.mark.parametrize(
    "error",
    [
        # What a worker met in the chaos soak right after a Postgres restart.
        asyncpg.exceptions.CannotConnectNowError(
            "the database system is not yet accepting connections"
        ),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        asyncpg.exceptions.ConnectionFailureError("connection failure"),
    ],
)
def test_our_database_briefly_away_is_retried(error: Exception) -> None:
    assert isinstance(policy.decide(_wrapped(error), 0), policy.Retry)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.StringDataRightTruncationError("value too long"),
        asyncpg.exceptions.UndefinedTableError('relation "orders" does not exist'),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
    ],
)
def test_other_database_errors_are_bugs_recorded_at_once(error: Exception) -> None:
    assert policy.decide(_wrapped(error), 0) == policy.Record(FailureKind.PERMANENT)


def test_retry_after_is_a_floor() -> None:
    decision = policy.decide(UpstreamRateLimited("slow down", retry_after=30), 0)
    assert decision == policy.Retry(30_000)


def test_a_huge_retry_after_delays_its_order_for_the_cap_at_most() -> None:
    decision = policy.decide(UpstreamRateLimited("slow down", retry_after=86400), 0)
    assert decision == policy.Retry(policy.MAX_RETRY_AFTER_S * 1000)
    assert policy.MAX_RETRY_AFTER_S <= 15 * 60


def test_exhausted_retries_are_recorded() -> None:
    decision = policy.decide(UpstreamTimeout("t"), policy.MAX_RETRIES)
    assert decision == policy.Record(FailureKind.EXHAUSTED)


@pytest.mark.parametrize(
    "error",
    [
        UpstreamRejected("code 404", code=404),
        MalformedResponse("x", field="baseInfo"),
        AuthError("bad signature"),
        KeyError("a bug"),
    ],
)
def test_permanent_and_unknown_errors_are_recorded_at_once(error: Exception) -> None:
    assert policy.decide(error, 0) == policy.Record(FailureKind.PERMANENT)


class Pauses(list[float]):
    """A sleep that only records how long it was asked to pause."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


async def test_a_transient_blip_is_retried_in_place() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise UpstreamServerError("503")
        return "ok"

    pauses = Pauses()
    assert await policy.call_with_retries(flaky, sleep=pauses) == "ok"
    assert len(calls) == 3
    assert pauses == list(policy.CALL_BACKOFF_S)


async def test_in_place_retries_give_up_and_leave_the_rest_to_the_message() -> None:
    calls: list[int] = []

    async def down() -> str:
        calls.append(1)
        raise UpstreamTimeout("read timeout")

    with pytest.raises(UpstreamTimeout):
        await policy.call_with_retries(down, sleep=Pauses())
    assert len(calls) == len(policy.CALL_BACKOFF_S) + 1


async def test_a_long_retry_after_is_not_waited_for_in_place() -> None:
    calls: list[int] = []

    async def limited() -> str:
        calls.append(1)
        raise UpstreamRateLimited("slow down", retry_after=60)

    with pytest.raises(UpstreamRateLimited):
        await policy.call_with_retries(limited)
    assert len(calls) == 1


async def test_permanent_errors_are_not_retried_in_place() -> None:
    calls: list[int] = []

    async def rejected() -> str:
        calls.append(1)
        raise UpstreamRejected("code 404", code=404)

    with pytest.raises(UpstreamRejected):
        await policy.call_with_retries(rejected)
    assert len(calls) == 1


# --- the time budget of one reconcile's upstream calls ------------------------------------------


def answering_after(seconds: float) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(seconds)
        return httpx.Response(503, json={"requestId": "r", "code": 503, "msg": "busy"})

    return answer


class SlowTokens:
    """A rate limiter whose every token takes ``wait_s`` of real time."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s

    async def acquire(self) -> None:
        await asyncio.sleep(self.wait_s)

    async def pause(self, seconds: float) -> None:
        return None

    async def note_limited(self, subject: str, retry_after: float | None) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None


@asynccontextmanager
async def upstream(
    answer: Callable[[httpx.Request], Awaitable[httpx.Response]], tokens_wait_s: float = 0.0
) -> AsyncIterator[PandaPonClient]:
    settings = load_settings(
        api_base_url="https://pandapon.test",
        access_key="ak",
        access_secret="sk",
        user_id="u",
        broker_url=None,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        yield PandaPonClient(settings, http, limiter=SlowTokens(tokens_wait_s))


async def test_a_slow_upstream_holds_a_reconcile_for_its_budget_only() -> None:
    async with upstream(answering_after(30.0)) as client:
        started = time.monotonic()
        with upstream_budget(0.3), pytest.raises(UpstreamBudgetExceeded) as caught:
            await policy.call_with_retries(lambda: client.order_detail(Platform.TAOBAO, "A"))
    assert time.monotonic() - started < 2.0
    assert isinstance(policy.decide(caught.value, 0), policy.Retry)  # tried again later


async def test_the_budget_is_shared_by_the_calls_of_one_reconcile() -> None:
    async with upstream(answering_after(0.2)) as client:
        with upstream_budget(0.3) as budget:
            with pytest.raises(UpstreamServerError):
                await client.order_detail(Platform.TAOBAO, "A")
            with pytest.raises(UpstreamBudgetExceeded):
                await client.order_detail(Platform.TAOBAO, "A")
            assert budget.remaining <= 0
            with pytest.raises(UpstreamBudgetExceeded):  # at once, nothing sent
                await client.order_detail(Platform.TAOBAO, "A")


async def test_an_in_place_retry_the_budget_cannot_cover_is_left_to_the_message() -> None:
    calls: list[int] = []

    async def down() -> str:
        calls.append(1)
        raise UpstreamServerError("503")

    with upstream_budget(0.1), pytest.raises(UpstreamServerError):
        await policy.call_with_retries(down)
    assert len(calls) == 1  # no 0.2 s pause past the budget


async def test_rate_limit_waits_do_not_spend_the_budget() -> None:
    async with upstream(answering_after(0.0), tokens_wait_s=0.4) as client:
        with upstream_budget(0.3) as budget, pytest.raises(UpstreamServerError):
            await client.order_detail(Platform.TAOBAO, "A")
    assert budget.remaining > 0.2


async def test_without_a_budget_calls_are_bounded_by_their_timeouts_only() -> None:
    async with upstream(answering_after(0.4)) as client:
        with pytest.raises(UpstreamServerError):
            await client.order_detail(Platform.TAOBAO, "A")


# --- a worker that stops gives its reconciles back -----------------------------------------------

REQUEST = ReconcileRequest("acct", Platform.TAOBAO, "O1", SyncSource.WEBHOOK)


@pytest.fixture
def worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process whose runtime needs no database (reconcile_order is replaced)."""

    async def fake_runtime() -> Any:
        settings = load_settings(broker_url=None)
        return SimpleNamespace(engine=None, sessions=None, client=None, settings=settings)

    monkeypatch.setattr(actors, "get_runtime", fake_runtime)
    monkeypatch.setattr(runtime, "_stopping", False)


@pytest.mark.usefixtures("worker_process")
@pytest.mark.parametrize("aftermath", [None, ConnectionResetError("cut mid-query")])
async def test_stopping_cancels_a_stuck_reconcile_and_gives_its_message_back(
    monkeypatch: pytest.MonkeyPatch, aftermath: Exception | None
) -> None:
    started = asyncio.Event()
    cleaned_up: list[bool] = []

    async def stuck(*args: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)  # an upstream that never answers
        finally:
            cleaned_up.append(True)  # the lock released, the transaction rolled back
            if aftermath is not None:
                raise aftermath

    monkeypatch.setattr(actors, "reconcile_order", stuck)
    with structlog.testing.capture_logs() as logs:
        attempt = asyncio.create_task(actors.run_reconcile(REQUEST, 3))
        await started.wait()
        assert await runtime.stop_reconciles(grace_s=0.05) == 1
        assert await asyncio.wait_for(attempt, 1.0) == policy.GiveBack()
        # Once stopping, nothing starts.
        assert await actors.run_reconcile(REQUEST, 0) == policy.GiveBack()
    assert cleaned_up == [True]
    assert not [e for e in logs if e["event"] == "reconcile failed"]  # not the order's failure


@pytest.mark.usefixtures("worker_process")
async def test_a_reconcile_that_ends_within_the_grace_is_not_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def quick(*args: Any) -> ReconcileResult:
        await asyncio.sleep(0.05)
        return ReconcileResult(Outcome.UNCHANGED)

    monkeypatch.setattr(actors, "reconcile_order", quick)
    attempt = asyncio.create_task(actors.run_reconcile(REQUEST, 0))
    await asyncio.sleep(0)
    assert await runtime.stop_reconciles(grace_s=1.0) == 0
    assert await attempt is Outcome.UNCHANGED
