"""A poisoned upstream error is still recorded in ``sync_failures`` on a real Postgres, where
``pandasync replay`` finds it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import load_settings
from service.db import make_engine, make_sessionmaker, session_scope
from service.domain import FailureKind, Platform, ReconcileRequest, SyncSource
from service.ledger.failures import open_failures
from service.ledger.models import SyncFailure
from service.pandapon.client import PandaPonClient
from service.pandapon.errors import UpstreamRejected
from workers import policy

REQUEST = ReconcileRequest("acct-poison", Platform.TAOBAO, "O-poison", SyncSource.WEBHOOK)
POISONED_MSG = "订单\x00不存在\ud800" + "m" * 1_000_000
POISONED_REQUEST_ID = "req\x00" + "r" * 200


@pytest.fixture
async def sessions(fresh_database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    settings = load_settings(database_url=fresh_database_url)
    engine = make_engine(fresh_database_url, settings, application_name="pandasync-test")
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


async def poisoned_upstream_error() -> UpstreamRejected:
    """The error the client raises for an envelope whose msg and requestId are poisoned."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = {"requestId": POISONED_REQUEST_ID, "code": 1001, "msg": POISONED_MSG}
        return httpx.Response(200, content=json.dumps(body).encode())

    settings = load_settings(
        api_base_url="https://pandapon.test",
        access_key="ak",
        access_secret="sk",
        user_id="u",
        broker_url=None,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(UpstreamRejected) as caught:
            await PandaPonClient(settings, http).order_detail(Platform.TAOBAO, "O-poison")
    return caught.value


async def test_a_poisoned_upstream_error_is_recorded_and_replayable(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    error = await poisoned_upstream_error()
    assert error.msg == POISONED_MSG  # what upstream sent reaches the recorder untouched

    for attempts in (1, 1):  # the second records over the open row
        async with session_scope(sessions) as session:
            await policy.record_failure(session, REQUEST, error, FailureKind.PERMANENT, attempts)

    async with sessions() as session:
        row = (await session.execute(select(SyncFailure))).scalar_one()
    assert row.attempts == 2
    assert row.upstream_code == "1001"
    assert row.upstream_msg is not None
    assert row.upstream_msg.startswith("订单不存在mmm")
    assert "\x00" not in row.upstream_msg
    assert len(row.upstream_msg) <= policy.UNBOUNDED_TEXT_LIMIT
    assert row.upstream_request_id is not None
    assert row.upstream_request_id.startswith("reqrrr")
    assert len(row.upstream_request_id) == SyncFailure.__table__.c.upstream_request_id.type.length
    assert row.error.startswith("UpstreamRejected: taobao_order_detail: code 1001: 订单不存在")

    (found,) = await open_failures(sessions)
    assert (found.account_id, found.platform, found.order_id) == (
        REQUEST.account_id,
        REQUEST.platform,
        REQUEST.order_id,
    )
