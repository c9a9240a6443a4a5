"""Outbound webhooks, in process: the fan-out, the order per order, the retry schedule,
disabling an endpoint that keeps failing, replay, and the commands' refusals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db import session_scope
from service.ledger import outbound
from service.ledger.models import OrderStatus, Platform, SyncSource
from service.ledger.write import OrderTruth, write_order
from service.pandapon.models import OrderSnapshot
from tests.support.outbound_receiver import Receiver, running_receiver
from workers.outbound import Dispatcher

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
ACCOUNT = "acct-out"
PANDASYNC = str(Path(sys.executable).parent / "pandasync")


def truth(order_id: str, status: OrderStatus, total: str, minutes: int) -> OrderTruth:
    snapshot = OrderSnapshot(
        platform=Platform.TAOBAO,
        order_id=order_id,
        status=status,
        raw_status=status.value.upper(),
        total_amount=Decimal(total),
        modified_at=T0 + timedelta(minutes=minutes),
    )
    return OrderTruth(snapshot, fetched_at=T0 + timedelta(minutes=minutes, seconds=1))


async def history(sessions: async_sessionmaker[AsyncSession], order_id: str, steps: int) -> None:
    """``steps`` changes of one order, each committed on its own."""
    for step in range(steps):
        status = OrderStatus.PAID if step == 0 else OrderStatus.SHIPPED
        async with session_scope(sessions) as session:
            await write_order(
                session,
                ACCOUNT,
                truth(order_id, status, f"{100 + step}.00", step),
                source=SyncSource.WEBHOOK,
            )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


@pytest.fixture
async def endpoint(fresh_sessions: async_sessionmaker[AsyncSession], receiver: Receiver) -> int:
    async with session_scope(fresh_sessions) as session:
        endpoint_id, receiver.secret = await outbound.add_endpoint(session, receiver.url)
    return endpoint_id


def dispatcher(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    *,
    schedule: tuple[float, ...] = (0.05, 0.05, 0.05),
    disable_after_s: float = 3600.0,
    retention_s: float = 30 * 86400.0,
) -> Dispatcher:
    return Dispatcher(
        engine,
        sessions,
        http,
        concurrency=4,
        timeout_s=2.0,
        schedule=schedule,
        disable_after_s=disable_after_s,
        retention_s=retention_s,
    )


async def drive(d: Dispatcher, passes: int, pause_s: float = 0.06) -> None:
    for _ in range(passes):
        await d.step()
        await asyncio.sleep(pause_s)
    await asyncio.gather(*d._in_flight)


async def rows(sessions: async_sessionmaker[AsyncSession], query: str) -> list[dict[str, object]]:
    async with sessions() as session:
        return [dict(r) for r in (await session.execute(text(query))).mappings().all()]


async def test_changes_before_the_endpoint_existed_are_not_sent(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    receiver: Receiver,
) -> None:
    await history(fresh_sessions, "old-1", 2)
    async with session_scope(fresh_sessions) as session:
        _, receiver.secret = await outbound.add_endpoint(session, receiver.url)
    await history(fresh_sessions, "new-1", 1)
    async with httpx.AsyncClient() as http:
        await drive(dispatcher(fresh_engine, fresh_sessions, http), 3)
    assert {d.data["order_id"] for d in receiver.accepted()} == {"new-1"}
    assert receiver.refused == []


async def test_per_order_order_holds_while_an_earlier_event_is_retried(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    receiver: Receiver,
    endpoint: int,
) -> None:
    await history(fresh_sessions, "A", 3)  # status, then status + price, then price
    receiver.failing = True
    async with httpx.AsyncClient() as http:
        d = dispatcher(fresh_engine, fresh_sessions, http, schedule=(0.2,) * 10)
        await drive(d, 3)
        # Only the first change was tried: the later ones wait behind it.
        assert {x.msg_id for x in receiver.received} == {outbound.message_id(endpoint, 1)}
        receiver.failing = False
        await drive(d, 10, 0.1)
    sent = [int(x.msg_id.rsplit("_", 1)[1]) for x in receiver.accepted()]
    changes = await rows(fresh_sessions, "SELECT id FROM ledger_changes ORDER BY id")
    assert sent == [c["id"] for c in changes]
    attempts = await rows(
        fresh_sessions,
        "SELECT a.status_code FROM outbound_delivery_attempts a "
        "JOIN outbound_deliveries d ON d.id = a.delivery_id WHERE d.change_id = 1 ORDER BY a.id",
    )
    assert attempts[0]["status_code"] == 500
    assert attempts[-1]["status_code"] == 200


async def test_the_schedule_runs_out_then_replay_sends_again(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    receiver: Receiver,
    endpoint: int,
) -> None:
    await history(fresh_sessions, "B", 1)
    receiver.failing = True
    async with httpx.AsyncClient() as http:
        d = dispatcher(fresh_engine, fresh_sessions, http, schedule=(0.01, 0.01))
        await drive(d, 6)
        [delivery] = await rows(
            fresh_sessions, "SELECT id, state, attempts FROM outbound_deliveries"
        )
        assert (delivery["state"], delivery["attempts"]) == ("failed", 3)  # 1 + 2 retries
        receiver.failing = False
        async with session_scope(fresh_sessions) as session:
            assert await outbound.replay_delivery(session, endpoint, int(str(delivery["id"])))
            assert not await outbound.replay_delivery(session, endpoint, 999)
        await drive(d, 2)
        assert len(receiver.accepted()) == 1
        async with session_scope(fresh_sessions) as session:
            made = await outbound.replay_range(
                session, endpoint, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC)
            )
        assert made == 1
        await drive(d, 2)
    accepted = receiver.accepted()
    assert len(accepted) == 2
    assert accepted[0].msg_id == accepted[1].msg_id  # a replay is the same message


async def test_finished_deliveries_past_their_retention_are_purged(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    receiver: Receiver,
    endpoint: int,
) -> None:
    await history(fresh_sessions, "old-ok", 1)
    await history(fresh_sessions, "new-ok", 1)
    async with httpx.AsyncClient() as http:
        d = dispatcher(fresh_engine, fresh_sessions, http, retention_s=86400.0)
        await drive(d, 2)
        receiver.failing = True
        await history(fresh_sessions, "old-pending", 1)
        await drive(d, 1)
        # Two made two days ago: one delivered, one still being retried.
        async with session_scope(fresh_sessions) as session:
            await session.execute(
                text(
                    "UPDATE outbound_deliveries SET created_at = now() - interval '2 days' "
                    "WHERE order_id IN ('old-ok', 'old-pending')"
                )
            )
        states = "SELECT order_id, state FROM outbound_deliveries ORDER BY order_id"
        assert await rows(fresh_sessions, states) == [
            {"order_id": "new-ok", "state": "delivered"},
            {"order_id": "old-ok", "state": "delivered"},
            {"order_id": "old-pending", "state": "pending"},
        ]

        attempts = (
            "SELECT d.order_id, count(*) AS n FROM outbound_delivery_attempts a "
            "JOIN outbound_deliveries d ON d.id = a.delivery_id GROUP BY 1 ORDER BY 1"
        )
        before = await rows(fresh_sessions, attempts)
        assert [r["order_id"] for r in before] == ["new-ok", "old-ok", "old-pending"]

        assert await d.purge() == 1

        # The delivered one went, with its attempts; the pending one stays until it ends.
        assert await rows(fresh_sessions, attempts) == [before[0], before[2]]
        [[total]] = [
            list(r.values())
            for r in await rows(fresh_sessions, "SELECT count(*) FROM outbound_delivery_attempts")
        ]
        assert total == int(str(before[0]["n"])) + int(str(before[2]["n"]))
        assert await d.purge() == 0
        # The change itself is kept: a replay of the range makes its delivery again.
        receiver.failing = False
        async with session_scope(fresh_sessions) as session:
            made = await outbound.replay_range(
                session, endpoint, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC)
            )
        assert made == 3
        await drive(d, 3)
    assert {d.data["order_id"] for d in receiver.accepted()} >= {"old-ok", "old-pending"}


async def test_an_endpoint_failing_too_long_is_disabled(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    receiver: Receiver,
    endpoint: int,
) -> None:
    await history(fresh_sessions, "C", 1)
    receiver.failing = True
    async with httpx.AsyncClient() as http:
        d = dispatcher(
            fresh_engine, fresh_sessions, http, schedule=(0.1,) * 50, disable_after_s=0.5
        )
        await drive(d, 15, 0.1)
        tried = len(receiver.received)
        [state] = await rows(
            fresh_sessions, "SELECT enabled, disabled_reason FROM outbound_endpoints"
        )
        assert state["enabled"] is False
        assert "every delivery failed since" in str(state["disabled_reason"])
        await drive(d, 5, 0.1)
        assert len(receiver.received) == tried  # nothing more is sent to it
        receiver.failing = False
        async with session_scope(fresh_sessions) as session:
            assert await outbound.set_enabled(session, endpoint, True)
        await drive(d, 5, 0.1)
    assert len(receiver.accepted()) == 1


def command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PANDASYNC_DATABASE_URL": database_url}
    return subprocess.run([PANDASYNC, *args], env=env, capture_output=True, text=True, timeout=60)


def run(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return command(database_url, "endpoints", *args)


async def test_status_shows_what_waits_and_each_disabled_endpoint(
    fresh_engine: AsyncEngine,
    fresh_sessions: async_sessionmaker[AsyncSession],
    fresh_database_url: str,
    receiver: Receiver,
    endpoint: int,
) -> None:
    quiet = await asyncio.to_thread(command, fresh_database_url, "status")
    assert "outbound webhooks" in quiet.stdout  # the fixture's endpoint
    async with session_scope(fresh_sessions) as session:
        second, _ = await outbound.add_endpoint(session, "http://127.0.0.1:9/erp")
    receiver.failing = True
    await history(fresh_sessions, "waits", 1)
    async with httpx.AsyncClient() as http:
        await drive(dispatcher(fresh_engine, fresh_sessions, http, schedule=(600.0,)), 1)
    disabled = await asyncio.to_thread(
        run, fresh_database_url, "disable", str(second), "--reason", "ERP move"
    )
    assert disabled.returncode == 0, disabled.stderr

    text_out = await asyncio.to_thread(command, fresh_database_url, "status")
    as_json = await asyncio.to_thread(command, fresh_database_url, "status", "--json")

    assert text_out.returncode == as_json.returncode == 0, text_out.stdout + text_out.stderr
    document = json.loads(as_json.stdout)["outbound"]
    # Made for both endpoints; each still pending after its first attempt failed.
    assert (document["endpoints"], document["pending"]) == (2, 2)
    assert document["oldest_pending_age_s"] >= 0
    assert [(d["id"], d["reason"]) for d in document["disabled"]] == [(second, "ERP move")]
    assert "2 endpoint(s), 1 disabled, 2 delivery(ies) pending" in text_out.stdout
    assert f"endpoint {second} disabled since" in text_out.stdout
    assert f"pandasync endpoints enable {second}" in text_out.stdout


async def test_the_commands_refuse_bad_input_in_one_line(
    fresh_database_url: str, receiver: Receiver
) -> None:
    bad = await asyncio.to_thread(run, fresh_database_url, "add", "ftp://example")
    assert bad.returncode == 2
    assert "is not an http(s) URL" in bad.stderr
    added = await asyncio.to_thread(run, fresh_database_url, "add", receiver.url)
    assert added.returncode == 0
    assert "whsec_" in added.stdout
    receiver.secret = "whsec_" + added.stdout.split("whsec_", 1)[1].split()[0]
    tested = await asyncio.to_thread(run, fresh_database_url, "test", "1")
    assert tested.returncode == 0, tested.stderr
    assert "HTTP 200" in tested.stdout
    assert receiver.accepted()[0].type == "endpoint.test"  # verified by standardwebhooks
    listed = await asyncio.to_thread(run, fresh_database_url, "list")
    assert receiver.url in listed.stdout
    assert "whsec_" not in listed.stdout  # shown once, at creation
    both = await asyncio.to_thread(run, fresh_database_url, "replay", "1")
    assert both.returncode == 2
    assert "--delivery" in both.stderr
    missing = await asyncio.to_thread(run, fresh_database_url, "disable", "7", "--reason", "x")
    assert missing.returncode == 1
    assert "no endpoint 7" in missing.stderr
    for result in (bad, both, missing):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
