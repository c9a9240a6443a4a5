"""Upstream text in failure records and log lines: cleaned for Postgres and cut to size.

A poisoned upstream can put a NUL, a lone surrogate or a megabyte in any text of its error
envelope (``msg``, ``requestId``, ``code``); none of it may stop the failure from being recorded,
or fill the logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import structlog
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from service.config import load_settings
from service.domain import FailureKind, Platform, ReconcileRequest, SyncSource
from service.ledger.models import SyncFailure
from service.pandapon.client import PandaPonClient
from service.pandapon.errors import (
    LOG_TEXT_LIMIT,
    PandaPonError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    clean_text,
)
from workers import actors, policy

REQUEST = ReconcileRequest("acct", Platform.TAOBAO, "O1", SyncSource.WEBHOOK)
MEGABYTE = "m" * 1_000_000
POISON = "\x00\ud800"  # a NUL and a lone surrogate: neither fits in a Postgres text


class CapturingSession:
    """Stands in for the session: keeps the statement instead of running it."""

    def __init__(self) -> None:
        self.statements: list[Any] = []

    async def execute(self, statement: Any) -> None:
        self.statements.append(statement)


async def stored_values(error: Exception) -> dict[str, Any]:
    """The values ``record_failure`` would insert for ``error``."""
    session = CapturingSession()
    await policy.record_failure(
        cast(AsyncSession, session), REQUEST, error, FailureKind.PERMANENT, 1
    )
    (statement,) = session.statements
    params: dict[str, Any] = statement.compile(dialect=postgresql.dialect()).params
    return params


def assert_storable(value: object, column: str, starts_with: str) -> None:
    assert isinstance(value, str)
    assert "\x00" not in value
    assert not any("\ud800" <= c <= "\udfff" for c in value)
    length = SyncFailure.__table__.c[column].type.length
    assert len(value) <= (length or policy.UNBOUNDED_TEXT_LIMIT)
    assert value.startswith(starts_with)


FIELDS: list[tuple[str, Callable[[], Exception], str, str]] = [
    (
        "msg",
        lambda: UpstreamRejected("code 1001", code=1001, msg=f"订单{POISON}不存在{MEGABYTE}"),
        "upstream_msg",
        "订单不存在m",
    ),
    (
        "requestId",
        lambda: UpstreamServerError("HTTP 503", request_id=f"req{POISON}-" + "r" * 200),
        "upstream_request_id",
        "req-rrr",
    ),
    ("code", lambda: UpstreamRejected("code", code=10**40), "upstream_code", "10000"),
    (
        "endpoint",
        lambda: UpstreamServerError("x", endpoint=f"ep{POISON}" + "e" * 100),
        "endpoint",
        "epeee",
    ),
    (
        "error text",
        lambda: UpstreamRejected(f"taobao_order_detail: code 1001: {POISON}{MEGABYTE}", code=1001),
        "error",
        "UpstreamRejected: taobao_order_detail: code 1001: mmm",
    ),
    (
        "error text of a bug",
        lambda: ValueError(f"bad {POISON}{MEGABYTE}"),
        "error",
        "ValueError: bad mmm",
    ),
]


@pytest.mark.parametrize(
    ("make_error", "column", "starts_with"),
    [field[1:] for field in FIELDS],
    ids=[field[0] for field in FIELDS],
)
async def test_each_upstream_text_is_stored_clean_and_within_its_column(
    make_error: Callable[[], Exception], column: str, starts_with: str
) -> None:
    values = await stored_values(make_error())
    assert_storable(values[column], column, starts_with)


async def test_a_clean_short_text_is_stored_as_it_came() -> None:
    error = UpstreamRejected("code 1001", code=1001, msg="订单不存在", request_id="req-1")
    values = await stored_values(error)
    assert (values["upstream_msg"], values["upstream_request_id"], values["upstream_code"]) == (
        "订单不存在",
        "req-1",
        "1001",
    )


def test_clean_text_drops_what_postgres_cannot_hold_and_marks_a_cut() -> None:
    assert clean_text("a\x00b\ud800c\udfffd", 10) == "abcd"
    assert clean_text("tab\tand 换行\n", 20) == "tab\tand 换行\n"
    assert clean_text("x" * 10, 10) == "x" * 10
    assert clean_text("x" * 11, 10) == "x" * 9 + "…"
    assert clean_text(10**40, 5) == "1000…"


def test_error_context_for_a_log_line_is_cut_and_clean() -> None:
    error = UpstreamRateLimited(
        "rate limited",
        retry_after=3.0,
        msg=f"slow{POISON}{MEGABYTE}",
        request_id=f"req{POISON}{MEGABYTE}",
    )
    context = error.context()
    for key in ("msg", "request_id"):
        value = context[key]
        assert isinstance(value, str)
        assert len(value) <= LOG_TEXT_LIMIT
        assert "\x00" not in value
    assert context["retry_after"] == 3.0


async def test_a_failed_call_logs_one_line_of_sane_length() -> None:
    def poisoned(request: httpx.Request) -> httpx.Response:
        body = {"requestId": f"req{POISON}", "code": 1001, "msg": MEGABYTE, "data": None}
        # ASCII JSON: the lone surrogate travels as an escape, as a real upstream could send it.
        return httpx.Response(200, content=json.dumps(body).encode())

    settings = load_settings(
        api_base_url="https://pandapon.test",
        access_key="ak",
        access_secret="sk",
        user_id="u",
        broker_url=None,
    )
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(transport=httpx.MockTransport(poisoned)) as http:
            client = PandaPonClient(settings, http)
            with pytest.raises(UpstreamRejected):
                await client.order_detail(Platform.TAOBAO, "O1")
    (entry,) = [e for e in logs if e["event"] == "pandapon call failed"]
    assert all(len(str(value)) <= LOG_TEXT_LIMIT for value in entry.values())


async def test_a_failed_reconcile_logs_one_line_of_sane_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def fake_runtime() -> Any:
        return SimpleNamespace(
            engine=None, sessions=None, client=None, settings=load_settings(broker_url=None)
        )

    async def poisoned_reconcile(*args: Any) -> Any:
        raise UpstreamServerError(f"HTTP 503: {MEGABYTE}", msg=f"{POISON}{MEGABYTE}")

    monkeypatch.setattr(actors, "get_runtime", fake_runtime)
    monkeypatch.setattr(actors, "reconcile_order", poisoned_reconcile)
    with structlog.testing.capture_logs() as logs:
        decision = await actors.run_reconcile(REQUEST, 0)
    assert isinstance(decision, policy.Retry)
    (entry,) = [e for e in logs if e["event"] == "reconcile failed"]
    assert all(len(str(value)) <= LOG_TEXT_LIMIT for value in entry.values())
    assert "\x00" not in str(entry)


def test_the_base_error_context_is_clean_too() -> None:
    error = PandaPonError("x", endpoint=f"e{POISON}", code=10**600)
    assert all("\x00" not in str(value) for value in error.context().values())
