"""``pandasync failures``, ``dismiss`` and ``status`` on a real Postgres, run as the operator
runs them (a subprocess with only the given settings).

The story of a failure closed by hand: a message whose order PandaPon refuses for good leaves
a permanent failure and a waiting inbox row, and ``status`` says unhealthy; ``dismiss`` closes
the failure and sets the row aside, and ``status`` is healthy again; a later message of the
order syncs as any other, and one that fails again opens a new failure."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import load_settings
from service.db import make_engine, make_sessionmaker, session_scope
from service.domain import (
    FailureKind,
    InboxState,
    MessageKind,
    OrderStatus,
    PaymentState,
    Platform,
    ReconcileRequest,
    SyncSource,
)
from service.ledger.failures import (
    REASON_MAX_CHARS,
    ClosedMeanwhile,
    dismiss_failures,
)
from service.ledger.inbox import held_for_replay
from service.ledger.models import (
    Order,
    PaymentAttempt,
    RefundSweepCursor,
    SweepCursor,
    SyncFailure,
    WebhookInbox,
)
from service.pandapon.errors import UpstreamRejected
from service.pandapon.models import OrderSnapshot, RefundSnapshot, ShipmentSnapshot
from tests.support.broker import BROKERS
from tests.support.stack import PANDASYNC
from workers import actors, policy
from workers.reconcile import Outcome

ACCOUNT = "acct-dismiss"
GONE = "O-gone"  # the order PandaPon refuses


@dataclass(frozen=True)
class Stack:
    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


@pytest.fixture
async def stack(fresh_database_url: str) -> AsyncIterator[Stack]:
    settings = load_settings(database_url=fresh_database_url)
    engine = make_engine(fresh_database_url, settings, application_name="pandasync-test")
    try:
        yield Stack(fresh_database_url, engine, make_sessionmaker(engine))
    finally:
        await engine.dispose()


# --- running the commands --------------------------------------------------------------------


async def pandasync(
    tmp_path: Path, url: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``pandasync *args`` on ``url`` with only the ``env`` settings (none of the caller's)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, *args],
        env={**clean, "PANDASYNC_DATABASE_URL": url, **env},
        cwd=tmp_path,  # no .env of the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )


def ran(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused dismissal prints (exit status 2, nothing on stdout)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("pandasync dismiss: ")
    return line


async def status_json(
    tmp_path: Path, url: str, *args: str, code: int, **env: str
) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        ran(await pandasync(tmp_path, url, "status", "--json", *args, **env), code)
    )
    return document


# --- the ledger as a test sets it up ----------------------------------------------------------


@dataclass
class Upstream:
    """PandaPon answering the order detail, or refusing it for good."""

    refuse: bool

    async def order_detail(self, platform: Platform, order_id: str) -> OrderSnapshot:
        if self.refuse:
            raise UpstreamRejected(
                "code 1001: order not found", endpoint="taobao_order_detail", code=1001
            )
        return OrderSnapshot(platform, order_id, OrderStatus.PAID, "WAIT_SELLER_SEND_GOODS")

    async def logistics(
        self, platform: Platform, order: OrderSnapshot
    ) -> Sequence[ShipmentSnapshot]:
        return ()

    async def refund_detail(self, platform: Platform, refund_id: str) -> RefundSnapshot:
        raise AssertionError("no refund to fetch")


async def reconcile(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Upstream,
    inbox_id: int | None,
    order_id: str = GONE,
) -> Outcome | policy.Decision:
    """One worker attempt, as the actor makes it (its failure recorded by the policy), on this
    test's database with ``upstream`` as PandaPon."""

    async def runtime() -> Any:
        return SimpleNamespace(
            engine=stack.engine,
            sessions=stack.sessions,
            client=upstream,
            settings=load_settings(database_url=stack.url, broker_url=None),
        )

    monkeypatch.setattr(actors, "get_runtime", runtime)
    request = ReconcileRequest(
        ACCOUNT, Platform.TAOBAO, order_id, SyncSource.WEBHOOK, inbox_id=inbox_id
    )
    return await actors.run_reconcile(request, 0)


async def store_message(
    stack: Stack,
    order_id: str = GONE,
    *,
    age: timedelta = timedelta(0),
    state: InboxState = InboxState.QUEUED,
) -> int:
    """A status message of the order, stored and handed to the broker ``age`` ago."""
    async with session_scope(stack.sessions) as session:
        inbox_id: int = (
            await session.execute(
                insert(WebhookInbox)
                .values(
                    account_id=ACCOUNT,
                    dedupe_key=uuid.uuid4().hex,
                    received_at=func.now() - age,
                    message_type="TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
                    kind=MessageKind.STATUS,
                    platform=Platform.TAOBAO,
                    order_id=order_id,
                    raw_body=b"{}",
                    headers={},
                    state=state,
                    queued_at=func.now() - age,
                )
                .returning(WebhookInbox.id)
            )
        ).scalar_one()
    return inbox_id


async def sweeps_done(stack: Stack, *, ago: timedelta = timedelta(0)) -> None:
    """Every sweep of both platforms finished ``ago``, as the scheduler records it."""
    async with session_scope(stack.sessions) as session:
        for table in (SweepCursor, RefundSweepCursor):
            for platform in Platform:
                await session.execute(
                    insert(table).values(
                        account_id=ACCOUNT,
                        platform=platform,
                        last_started_at=func.now() - ago,
                        last_finished_at=func.now() - ago,
                        last_examined=3,
                        last_drift=0,
                    )
                )


async def record(stack: Stack, order_id: str, kind: FailureKind, error: str = "boom") -> int:
    """An open failure of the order, as the policy records it."""
    request = ReconcileRequest(ACCOUNT, Platform.TAOBAO, order_id, SyncSource.SWEEP)
    async with session_scope(stack.sessions) as session:
        await policy.record_failure(session, request, RuntimeError(error), kind, 1)
        failure_id: int = (
            await session.execute(
                select(SyncFailure.id).where(
                    SyncFailure.order_id == order_id, SyncFailure.resolved_at.is_(None)
                )
            )
        ).scalar_one()
    return failure_id


async def inbox_state(stack: Stack, inbox_id: int) -> InboxState:
    async with stack.sessions() as session:
        state: InboxState = (
            await session.execute(select(WebhookInbox.state).where(WebhookInbox.id == inbox_id))
        ).scalar_one()
    return state


async def failure_rows(stack: Stack, order_id: str = GONE) -> list[SyncFailure]:
    async with stack.sessions() as session:
        return list(
            (
                await session.execute(
                    select(SyncFailure)
                    .where(SyncFailure.order_id == order_id)
                    .order_by(SyncFailure.id)
                )
            ).scalars()
        )


async def everything(stack: Stack) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row of ``sync_failures`` and ``webhook_inbox``: nothing may change on a refusal."""
    async with stack.sessions() as session:
        failures = await session.execute(text("SELECT * FROM sync_failures ORDER BY id"))
        inbox = await session.execute(text("SELECT * FROM webhook_inbox ORDER BY id"))
        return [tuple(r) for r in failures.all()], [tuple(r) for r in inbox.all()]


# --- the story --------------------------------------------------------------------------------


async def test_a_failure_closed_by_hand_leaves_the_backlog_and_status_healthy(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sweeps_done(stack)
    message = await store_message(stack)
    decision = await reconcile(stack, monkeypatch, Upstream(refuse=True), message)
    assert decision == policy.Record(FailureKind.PERMANENT)
    [failure] = await failure_rows(stack)
    assert failure.kind is FailureKind.PERMANENT
    assert failure.resolved_at is None
    assert await inbox_state(stack, message) is InboxState.QUEUED  # held for replay

    # Before: unhealthy, naming the open failure.
    before = ran(await pandasync(tmp_path, stack.url, "status"), 1)
    assert "inbox backlog:        1 message(s) not yet processed" in before
    assert "open failures:        1" in before
    [problem] = [line for line in before.splitlines() if line.startswith("unhealthy: ")]
    assert problem.startswith("unhealthy: 1 open sync failure(s): `pandasync failures`")
    document = await status_json(tmp_path, stack.url, code=1)
    assert (document["healthy"], document["open_failures"], document["inbox_backlog"]) == (
        False,
        1,
        1,
    )
    assert document["problems"] == [problem.removeprefix("unhealthy: ")]

    # The list names it.
    listed = ran(await pandasync(tmp_path, stack.url, "failures"), 0).splitlines()
    assert listed[0].split()[:6] == ["id", "platform", "order", "kind", "source", "attempts"]
    assert listed[1].split()[:6] == [str(failure.id), "taobao", GONE, "permanent", "webhook", "1"]
    assert "UpstreamRejected: code 1001: order not found" in listed[1]
    assert len(listed) == 2

    # Closed by hand.
    out = ran(
        await pandasync(
            tmp_path,
            stack.url,
            "dismiss",
            str(failure.id),
            "--reason",
            "  order deleted upstream  ",
            "--by",
            "alice",
        ),
        0,
    )
    assert out.splitlines() == [
        f"dismissed {failure.id}: taobao {GONE} (permanent), 1 waiting message(s) set aside",
        "closed 1 failure(s) by hand as alice; 1 inbox message(s) marked ignored",
    ]
    [closed] = await failure_rows(stack)
    assert closed.resolved_at is not None
    assert closed.dismissed_at == closed.resolved_at
    assert (closed.dismissed_by, closed.dismissed_reason) == ("alice", "order deleted upstream")
    assert await inbox_state(stack, message) is InboxState.IGNORED

    # After: healthy.
    after = ran(await pandasync(tmp_path, stack.url, "status"), 0)
    assert "inbox backlog:        0 message(s) not yet processed" in after
    assert "open failures:        0" in after
    assert "unhealthy" not in after
    document = await status_json(tmp_path, stack.url, code=0)
    assert (document["healthy"], document["problems"]) == (True, [])
    assert (document["open_failures"], document["inbox_backlog"]) == (0, 0)
    assert ran(await pandasync(tmp_path, stack.url, "failures"), 0) == "no open sync failures\n"

    # The message still in the broker finds its row covered: nothing is fetched.
    assert await reconcile(stack, monkeypatch, Upstream(refuse=True), message) is (
        Outcome.COALESCED
    )

    # A later message of the order: nothing holds it back, and it syncs.
    later = await store_message(stack)
    async with stack.sessions() as session:
        held = await session.execute(
            select(held_for_replay()).select_from(WebhookInbox).where(WebhookInbox.id == later)
        )
        assert held.scalar_one() is False
    assert await reconcile(stack, monkeypatch, Upstream(refuse=False), later) is Outcome.WRITTEN
    assert await inbox_state(stack, later) is InboxState.PROCESSED
    async with stack.sessions() as session:
        stored = await session.execute(select(Order.status).where(Order.order_id == GONE))
        assert stored.scalar_one() is OrderStatus.PAID
    [unchanged] = await failure_rows(stack)  # the dismissal's record stays as it was
    assert (unchanged.dismissed_by, unchanged.resolved_at) == ("alice", closed.resolved_at)


async def test_a_later_message_that_fails_again_opens_a_new_failure(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await store_message(stack)
    await reconcile(stack, monkeypatch, Upstream(refuse=True), first)
    [failure] = await failure_rows(stack)
    ran(await pandasync(tmp_path, stack.url, "dismiss", str(failure.id), "--reason", "gone"), 0)

    again = await store_message(stack)
    decision = await reconcile(stack, monkeypatch, Upstream(refuse=True), again)
    assert decision == policy.Record(FailureKind.PERMANENT)
    old, new = await failure_rows(stack)
    assert old.id == failure.id
    assert old.dismissed_at is not None
    assert new.id != failure.id
    assert (new.resolved_at, new.dismissed_at, new.attempts) == (None, None, 1)
    assert await inbox_state(stack, again) is InboxState.QUEUED  # held for replay, as before
    listed = ran(await pandasync(tmp_path, stack.url, "failures"), 0)
    assert listed.splitlines()[1].split()[0] == str(new.id)


async def test_dismiss_records_the_os_user_without_by(stack: Stack, tmp_path: Path) -> None:
    failure_id = await record(stack, "O-1", FailureKind.EXHAUSTED)
    out = ran(
        await pandasync(tmp_path, stack.url, "dismiss", str(failure_id), "--reason", "test"), 0
    )
    assert f"dismissed {failure_id}: taobao O-1 (exhausted), 0 waiting message(s)" in out
    [row] = await failure_rows(stack, "O-1")
    assert row.dismissed_by == getpass.getuser()


async def test_dismiss_closes_several_in_one_call(stack: Stack, tmp_path: Path) -> None:
    ids = [await record(stack, f"O-{n}", FailureKind.PERMANENT) for n in range(3)]
    waiting = [await store_message(stack, "O-0"), await store_message(stack, "O-0")]
    other = await store_message(stack, "O-other")  # another order's message stays as it is
    args = [str(i) for i in (ids[2], ids[0], ids[2])]  # any order, a repeat is one
    out = ran(await pandasync(tmp_path, stack.url, "dismiss", *args, "--reason", "gone"), 0)
    assert out.splitlines()[-1] == (
        "closed 2 failure(s) by hand as "
        + getpass.getuser()
        + "; 2 inbox message(s) marked ignored"
    )
    assert [await inbox_state(stack, i) for i in waiting] == [InboxState.IGNORED] * 2
    assert await inbox_state(stack, other) is InboxState.QUEUED
    assert (await failure_rows(stack, "O-1"))[0].resolved_at is None


# --- bad input changes nothing -----------------------------------------------------------------


async def test_bad_dismissals_change_nothing(stack: Stack, tmp_path: Path) -> None:
    open_id = await record(stack, "O-open", FailureKind.PERMANENT)
    closed_id = await record(stack, "O-closed", FailureKind.PERMANENT)
    await store_message(stack, "O-open")
    ran(await pandasync(tmp_path, stack.url, "dismiss", str(closed_id), "--reason", "first"), 0)
    before = await everything(stack)

    async def dismiss(*args: str) -> str:
        return refused(await pandasync(tmp_path, stack.url, "dismiss", *args))

    line = await dismiss(str(open_id), "999999", "--reason", "gone")
    assert line == (
        "pandasync dismiss: no sync failure with id 999999: "
        "`pandasync failures` lists the open ones"
    )
    line = await dismiss(str(open_id), str(closed_id), "--reason", "gone")
    assert line.startswith(
        f"pandasync dismiss: sync failure {closed_id} is already closed (dismissed at "
    )
    assert "reason is empty" in await dismiss(str(open_id), "--reason", "  \t ")
    assert "--reason is required" in await dismiss(str(open_id))
    too_long = "x" * (REASON_MAX_CHARS + 1)
    assert f"at most {REASON_MAX_CHARS}" in await dismiss(str(open_id), "--reason", too_long)
    assert "name (--by) is empty" in await dismiss(str(open_id), "--reason", "r", "--by", " ")
    assert "name the failures" in await dismiss("--reason", "gone")
    not_an_id = await pandasync(tmp_path, stack.url, "dismiss", "abc", "--reason", "gone")
    assert not_an_id.returncode == 2
    assert "'abc' is not a valid integer" in not_an_id.stderr

    assert await everything(stack) == before


async def test_a_failure_a_sync_closes_meanwhile_undoes_the_whole_dismissal(
    stack: Stack,
) -> None:
    """The sync's transaction holds the failure's row; the dismissal waits for it, finds the
    failure closed, and takes nothing back with it: not the other failure, not the inbox."""
    racing = await record(stack, "O-race", FailureKind.PERMANENT)
    other = await record(stack, "O-other", FailureKind.PERMANENT)
    message = await store_message(stack, "O-other")
    before = await everything(stack)

    async with stack.engine.connect() as sync:
        await sync.execute(
            update(SyncFailure).where(SyncFailure.id == racing).values(resolved_at=func.now())
        )

        async def dismissal() -> None:
            async with session_scope(stack.sessions) as session:
                await dismiss_failures(session, [racing, other], by="bob", reason="gone")

        attempt = asyncio.create_task(dismissal())
        await wait_for_lock_wait(stack)
        await sync.commit()
        with pytest.raises(ClosedMeanwhile) as caught:
            await attempt
    assert caught.value.ids == (racing,)
    _, inbox = await everything(stack)
    assert inbox == before[1]
    assert await inbox_state(stack, message) is InboxState.QUEUED
    [still_open] = await failure_rows(stack, "O-other")
    assert (still_open.resolved_at, still_open.dismissed_by) == (None, None)


async def wait_for_lock_wait(stack: Stack) -> None:
    """Until a backend of this database waits for a row lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(200):
        async with stack.engine.connect() as conn:
            if (await conn.execute(query)).scalar_one():
                return
        await asyncio.sleep(0.025)
    raise AssertionError("the dismissal never waited for the sync's lock")


# --- the list -------------------------------------------------------------------------------


async def test_failures_lists_filters_and_says_how_many_more(stack: Stack, tmp_path: Path) -> None:
    ids = [await record(stack, f"O-{n}", FailureKind.PERMANENT) for n in range(3)]
    exhausted = await record(stack, "O-x", FailureKind.EXHAUSTED, "line one\nline two\x1b[2J")
    async with session_scope(stack.sessions) as session:  # a 1688 one, and a closed one
        await session.execute(
            insert(SyncFailure).values(
                account_id=ACCOUNT,
                platform=Platform.ALIBABA_1688,
                order_id="A-1",
                kind=FailureKind.PERMANENT,
                source=SyncSource.SWEEP,
                error="refused",
            )
        )
    await record(stack, "O-done", FailureKind.PERMANENT)
    async with session_scope(stack.sessions) as session:
        await session.execute(
            update(SyncFailure)
            .where(SyncFailure.order_id == "O-done")
            .values(resolved_at=func.now())
        )

    out = ran(await pandasync(tmp_path, stack.url, "failures", "--limit", "2"), 0).splitlines()
    assert [line.split()[0] for line in out[1:3]] == [str(ids[0]), str(ids[1])]
    assert out[3:] == ["… and 3 more (--limit)"]

    shown = ran(await pandasync(tmp_path, stack.url, "failures", "--kind", "exhausted"), 0)
    [_header, row] = shown.splitlines()
    assert row.split()[0] == str(exhausted)
    assert row.endswith("RuntimeError: line one\\nline two\\x1b[2J")  # one line, escaped

    result = await pandasync(tmp_path, stack.url, "failures", "--platform", "1688", "--json")
    [one] = json.loads(ran(result, 0))
    assert (one["platform"], one["order_id"], one["kind"], one["source"]) == (
        "1688",
        "A-1",
        "permanent",
        "sweep",
    )
    assert one["first_failed_at"].endswith("+00:00")
    assert "T" in one["first_failed_at"]

    result = await pandasync(tmp_path, stack.url, "failures", "--json", "--limit", "1")
    assert [f["id"] for f in json.loads(ran(result, 0))] == [ids[0]]
    assert result.stderr == "… and 4 more (--limit)\n"

    # --account: the configured account's failures (by name or user-id); another is refused.
    mine = {"PANDASYNC_USER_ID": ACCOUNT}
    for name in ("default", ACCOUNT):
        result = await pandasync(
            tmp_path, stack.url, "failures", "--json", "--account", name, **mine
        )
        assert len(json.loads(ran(result, 0))) == 5
    result = await pandasync(tmp_path, stack.url, "failures", "--account", "shop-z", **mine)
    assert result.returncode == 2
    assert result.stderr.startswith("pandasync failures: no account 'shop-z' here")


# --- status -----------------------------------------------------------------------------------


async def test_status_names_a_lag_over_the_limit(stack: Stack, tmp_path: Path) -> None:
    await sweeps_done(stack)
    await store_message(stack, "O-slow", age=timedelta(minutes=10))
    out = ran(await pandasync(tmp_path, stack.url, "status"), 1)
    [problem] = [line for line in out.splitlines() if line.startswith("unhealthy: ")]
    assert re.fullmatch(
        r"unhealthy: the oldest unprocessed inbox message is 0:10:\d\d old "
        r"\(limit 0:05:00, --max-lag\): are the workers running\?",
        problem,
    ), problem
    document = await status_json(tmp_path, stack.url, "--max-lag", "900", code=0)
    assert 600 <= document["oldest_unprocessed_age_s"] < 660
    assert document["inbox_backlog"] == 1


async def test_status_names_sweeps_late_by_two_intervals(stack: Stack, tmp_path: Path) -> None:
    # A new install: no sweep yet, and none due.
    document = await status_json(tmp_path, stack.url, code=0)
    assert (document["sweeps"], document["problems"]) == ([], [])

    # 40 minutes after the first message, still none: twice 15 minutes and a minute is over.
    await store_message(stack, "O-old", age=timedelta(minutes=40), state=InboxState.PROCESSED)
    document = await status_json(tmp_path, stack.url, code=1)
    assert [p.split(" in the ")[0] for p in document["problems"]] == [
        "no sweep has finished",
        "no refund sweep has finished",
    ]
    assert (
        "since the first message or order was stored (limit 0:31:00: twice "
        in (document["problems"][0])
    )

    # Finished 20 minutes ago: late only where twice the interval and a minute is less.
    await sweeps_done(stack, ago=timedelta(minutes=20))
    assert ran(await pandasync(tmp_path, stack.url, "status"), 0)
    late = await status_json(
        tmp_path,
        stack.url,
        code=1,
        PANDASYNC_SWEEP_INTERVAL_S="450",  # 16 minutes: late
        PANDASYNC_REFUND_SWEEP_INTERVAL_S="600",  # 21 minutes: not yet
    )
    pattern = (
        r"the last sweep (\w+) finished 0:20:\d\d ago \(limit 0:16:00: twice SWEEP_INTERVAL_S, "
        r"and a minute\): is the scheduler running, with PANDASYNC_USER_ID set\?"
    )
    matched = [re.fullmatch(pattern, p) for p in late["problems"]]
    assert [m.group(1) if m else p for m, p in zip(matched, late["problems"], strict=True)] == [
        "1688",
        "taobao",
    ]
    assert late["limits"] == {
        "max_lag_s": 300.0,
        "sweep_max_age_s": 960.0,
        "refund_sweep_max_age_s": 1260.0,
    }
    [taobao] = [s for s in late["sweeps"] if s["platform"] == "taobao"]
    assert 1199 < taobao["age_s"] < 1260
    assert (taobao["examined"], taobao["drift"], taobao["account_id"]) == (3, 0, ACCOUNT)


@pytest.mark.parametrize(
    "unreachable", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1/"], ids=BROKERS
)
async def test_status_is_unhealthy_when_the_broker_cannot_be_reached(
    stack: Stack, tmp_path: Path, unreachable: str
) -> None:
    await sweeps_done(stack)
    document = await status_json(tmp_path, stack.url, code=1, PANDASYNC_BROKER_URL=unreachable)
    [problem] = document["problems"]
    assert problem.startswith("the broker cannot be reached (")
    assert "PANDASYNC_BROKER_URL" in problem
    assert document["queue_depth"] is None


async def test_status_counts_payments_for_a_person_without_judging_them(
    stack: Stack, tmp_path: Path
) -> None:
    await sweeps_done(stack)
    async with session_scope(stack.sessions) as session:
        for order_id, status in (
            ("P-unpaid-1", OrderStatus.PENDING_PAYMENT),
            ("P-unpaid-2", OrderStatus.PENDING_PAYMENT),
            ("P-unpaid-3", OrderStatus.PENDING_PAYMENT),
            ("P-paid", OrderStatus.PAID),
        ):
            await session.execute(
                insert(Order).values(
                    account_id=ACCOUNT,
                    platform=Platform.TAOBAO,
                    order_id=order_id,
                    status=status,
                    raw_status="X",
                    snapshot_at=func.now(),
                )
            )
        attempts = [
            ("P-unknown", PaymentState.UNKNOWN, 0),  # counted
            ("P-new", PaymentState.STARTED, 1),  # running now: not counted
            ("P-stuck", PaymentState.STARTED, 11),  # counted
            ("P-unpaid-1", PaymentState.PAY_BY_HAND, 30),  # counted
            ("P-paid", PaymentState.PAY_BY_HAND, 30),  # paid since: not counted
            ("P-unpaid-2", PaymentState.HELD_BACK, 30),  # counted
            ("P-unpaid-3", PaymentState.PAY_BY_HAND, 30),  # superseded by a later attempt
            ("P-unpaid-3", PaymentState.FAILED, 20),
        ]
        for order_id, state, minutes_ago in attempts:
            await session.execute(
                insert(PaymentAttempt).values(
                    account_id=ACCOUNT,
                    platform=Platform.TAOBAO,
                    order_id=order_id,
                    run_id=str(uuid.uuid4()),
                    requested_by="test",
                    state=state,
                    started_at=func.now() - timedelta(minutes=minutes_ago),
                )
            )

    document = await status_json(tmp_path, stack.url, code=0)
    assert document["orders_awaiting_payment"] == 3
    assert document["payments_needing_a_person"] == {
        "total": 4,
        "unknown": 1,
        "started_stale": 1,
        "pay_by_hand": 1,
        "held_back": 1,
    }
    out = ran(await pandasync(tmp_path, stack.url, "status"), 0)
    assert "awaiting payment:     3 order(s)" in out
    assert (
        "payments to look at:  4 (unknown 1, started over 10 min ago 1, pay by hand 1, held back 1)"
    ) in out


async def test_status_json_carries_every_figure_of_the_text(stack: Stack, tmp_path: Path) -> None:
    await sweeps_done(stack)
    document = await status_json(tmp_path, stack.url, code=0)
    assert set(document) == {
        "healthy",
        "problems",
        "checked_at",
        "inbox_backlog",
        "inbox_unqueued",
        "oldest_unprocessed_age_s",
        "queue_depth",
        "queue_oldest_age_s",
        "broker_error",
        "open_failures",
        "sweeps",
        "refund_sweeps",
        "orders_awaiting_payment",
        "payments_needing_a_person",
        "unmapped_total",
        "unmapped",
        "outbound",
        "limits",
    }
    assert (document["oldest_unprocessed_age_s"], document["queue_depth"]) == (None, None)
    assert len(document["sweeps"]) == len(document["refund_sweeps"]) == 2
    assert (document["unmapped_total"], document["unmapped"]) == (0, [])
    assert document["outbound"] == {
        "endpoints": 0,
        "disabled": [],
        "pending": 0,
        "oldest_pending_age_s": None,
    }
