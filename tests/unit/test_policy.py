"""The retry policy: what is retried, how long it waits, what is recorded."""

from __future__ import annotations

import pytest

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
