"""The retry policy: what is retried, how long it waits, what is recorded."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from service.ledger.models import FailureKind
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
)
from workers import policy


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


async def test_a_transient_blip_is_retried_in_place() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise UpstreamServerError("503")
        return "ok"

    assert await policy.call_with_retries(flaky) == "ok"
    assert len(calls) == 3


async def test_in_place_retries_give_up_and_leave_the_rest_to_the_message() -> None:
    calls: list[int] = []

    async def down() -> str:
        calls.append(1)
        raise UpstreamTimeout("read timeout")

    with pytest.raises(UpstreamTimeout):
        await policy.call_with_retries(down)
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
