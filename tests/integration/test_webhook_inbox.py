"""The inbox writer (group commit, nonces, duplicates, failures) and the relay, on Postgres."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

import asyncpg
import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.config import Settings
from service.db import asyncpg_dsn, make_engine, make_sessionmaker
from service.ledger.models import InboxState, MessageKind, Platform
from service.webhooks.errors import StoreUnavailable
from service.webhooks.inbox import InboxRow, InboxWriter, StoreOutcome, StoreResult
from service.webhooks.relay import measure_backlog, purge_nonces, relay_once
from tests.support.broker import enqueue_aged
from tests.support.webhook_checks import count, fetch, sample
from tests.support.webhook_requests import receiver_settings


def row(**changes: object) -> InboxRow:
    base = InboxRow(
        account_id="acct",
        dedupe_key=uuid.uuid4().hex,
        message_type="TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
        kind=MessageKind.STATUS,
        platform=Platform.TAOBAO,
        order_id=uuid.uuid4().hex[:16],
        refund_id=None,
        pushed_at=None,
        raw_body=b"{}",
        headers_json=json.dumps({"nonce-str": "n"}),
        request_id="req",
        state=InboxState.RECEIVED,
        nonce=uuid.uuid4().hex,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@dataclass
class Committed:
    batches: list[list[int]] = field(default_factory=list)

    def __call__(self, rows: Sequence[tuple[int, InboxRow]]) -> None:
        self.batches.append([inbox_id for inbox_id, _ in rows])


@dataclass
class Db:
    url: str
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


@pytest.fixture
async def db(fresh_database_url: str) -> AsyncIterator[Db]:
    settings = receiver_settings(fresh_database_url, relay_grace_s=10)
    engine = make_engine(fresh_database_url, settings)
    try:
        yield Db(fresh_database_url, settings, engine, make_sessionmaker(engine))
    finally:
        await engine.dispose()


async def writer_for(db: Db, committed: Committed | None = None, **options: int) -> InboxWriter:
    writer = InboxWriter(db.engine, timeout_s=2.0, on_committed=committed, **options)
    writer.start()
    return writer


# --- the writer -----------------------------------------------------------------------------


async def test_concurrent_rows_are_committed_together(db: Db) -> None:
    committed = Committed()
    writer = await writer_for(db, committed, max_in_flight=1)
    try:
        results = await asyncio.gather(*(writer.store(row()) for _ in range(60)))
    finally:
        await writer.close()
    assert {r.outcome for r in results} == {StoreOutcome.STORED}
    # Rows written by one transaction share its xmin: fewer transactions than rows.
    [stats] = await fetch(
        db.url, "SELECT count(*) AS n, count(DISTINCT xmin::text) AS txs FROM webhook_inbox"
    )
    assert stats["n"] == 60
    assert stats["txs"] < 60
    assert sorted(i for batch in committed.batches for i in batch) == sorted(
        r.inbox_id for r in results if r.inbox_id is not None
    )
    # Each row's nonce went in with it.
    assert await count(db.url, "webhook_nonces") == 60


async def test_same_message_twice_at_once_is_stored_once(db: Db) -> None:
    writer = await writer_for(db)
    try:
        first = row()
        results = await asyncio.gather(
            writer.store(first), writer.store(replace(first, nonce=uuid.uuid4().hex))
        )
    finally:
        await writer.close()
    assert sorted(r.outcome.value for r in results) == ["duplicate", "stored"]
    assert await count(db.url, "webhook_inbox") == 1


async def test_same_nonce_twice_at_once_stores_one_row(db: Db) -> None:
    writer = await writer_for(db)
    try:
        first = row()
        results = await asyncio.gather(writer.store(first), writer.store(row(nonce=first.nonce)))
    finally:
        await writer.close()
    assert sorted(r.outcome.value for r in results) == ["replayed_nonce", "stored"]
    assert await count(db.url, "webhook_inbox") == 1
    assert await count(db.url, "webhook_nonces") == 1


async def test_only_new_routable_rows_are_handed_off(db: Db) -> None:
    committed = Committed()
    writer = await writer_for(db, committed)
    try:
        stored = await writer.store(row())
        ignored = await writer.store(row(order_id=None, state=InboxState.IGNORED))
        duplicate_of_stored = await fetch(db.url, "SELECT dedupe_key FROM webhook_inbox LIMIT 1")
        dup = await writer.store(row(dedupe_key=duplicate_of_stored[0]["dedupe_key"]))
    finally:
        await writer.close()
    assert (ignored.outcome, dup.outcome) == (StoreOutcome.STORED, StoreOutcome.DUPLICATE)
    assert committed.batches == [[stored.inbox_id]]


async def test_a_row_the_database_refuses_does_not_sink_its_batch(db: Db) -> None:
    writer = await writer_for(db, max_in_flight=1)
    try:
        # Start a batch, so the next rows queue up and go out together behind it.
        first = asyncio.create_task(writer.store(row()))
        poison = row(message_type="BAD\x00TYPE")  # Postgres text cannot hold NUL
        outcomes = await asyncio.gather(
            *(writer.store(r) for r in (row(), poison, row(), row())), return_exceptions=True
        )
        await first
    finally:
        await writer.close()
    assert isinstance(outcomes[1], StoreUnavailable)
    good = [o for i, o in enumerate(outcomes) if i != 1]
    assert all(isinstance(o, StoreResult) and o.outcome is StoreOutcome.STORED for o in good)
    assert await count(db.url, "webhook_inbox") == 4


async def test_a_locked_inbox_times_out_then_the_writer_recovers(db: Db) -> None:
    writer = InboxWriter(db.engine, timeout_s=0.3)
    writer.start()
    blocker = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE webhook_inbox IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable) as caught:
            await writer.store(row())
        assert caught.value.reason == "store_timeout"
        await transaction.rollback()
        assert (await writer.store(row())).outcome is StoreOutcome.STORED
    finally:
        await blocker.close()
        await writer.close()
    assert await count(db.url, "webhook_inbox") == 1


async def test_a_closed_writer_refuses_rows(db: Db) -> None:
    writer = await writer_for(db)
    await writer.close()
    with pytest.raises(StoreUnavailable):
        await writer.store(row())


# --- the relay ------------------------------------------------------------------------------


async def insert_rows(url: str, *, age_s: float, n: int, **values: object) -> list[int]:
    """Rows as a process that committed them and then died before sending would leave them."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        ids = []
        for _ in range(n):
            fields = {
                "account_id": "acct",
                "dedupe_key": uuid.uuid4().hex,
                "message_type": "ORDER_CREATE",
                "kind": "status",
                "platform": "1688",
                "order_id": uuid.uuid4().hex[:12],
                "raw_body": b"{}",
                "headers": "{}",
                "state": "received",
                **values,
            }
            columns = ", ".join(fields)
            params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
            # A 'queued' row was handed off when it was received.
            handed_off = "at" if fields["state"] == "queued" else "NULL"
            ids.append(
                await conn.fetchval(
                    f"WITH t AS (SELECT now() - make_interval(secs => {age_s}) AS at) "
                    f"INSERT INTO webhook_inbox ({columns}, received_at, queued_at) "
                    f"SELECT {params}, at, {handed_off} FROM t RETURNING id",
                    *fields.values(),
                )
            )
        return ids
    finally:
        await conn.close()


def stub_broker(declared: bool = True) -> StubBroker:
    broker = StubBroker()
    if declared:
        broker.declare_queue("reconcile")
    return broker


def sent_inbox_ids(broker: StubBroker) -> list[int]:
    return [
        Message.decode(data).kwargs["inbox_id"] for data in list(broker.queues["reconcile"].queue)
    ]


async def states(url: str) -> dict[int, str]:
    return {r["id"]: r["state"] for r in await fetch(url, "SELECT id, state FROM webhook_inbox")}


async def test_relay_hands_off_rows_left_received_past_the_grace(db: Db) -> None:
    stranded = await insert_rows(db.url, age_s=60, n=3)
    fresh = await insert_rows(db.url, age_s=0, n=1)
    done = await insert_rows(db.url, age_s=60, n=1, state="queued")
    broker = stub_broker()
    before = sample("pandasync_relay_handed_off_total")

    assert await relay_once(db.sessions, broker, db.settings) == 3

    assert sorted(sent_inbox_ids(broker)) == sorted(stranded)
    now = await states(db.url)
    assert [now[i] for i in stranded] == ["queued"] * 3
    assert (now[fresh[0]], now[done[0]]) == ("received", "queued")
    assert sample("pandasync_relay_handed_off_total") == before + 3
    [message] = [Message.decode(d) for d in list(broker.queues["reconcile"].queue)][:1]
    assert message.actor_name == "reconcile"
    assert message.kwargs["source"] == "webhook"
    # Nothing left: a second pass sends nothing more.
    assert await relay_once(db.sessions, broker, db.settings) == 0


async def test_relay_sends_one_reconcile_per_order(db: Db) -> None:
    burst = await insert_rows(db.url, age_s=60, n=3, order_id="same-order")
    await insert_rows(db.url, age_s=60, n=1, order_id="other-order")
    broker = stub_broker()
    assert await relay_once(db.sessions, broker, db.settings) == 4
    messages = [Message.decode(d) for d in list(broker.queues["reconcile"].queue)]
    assert sorted(m.args[2] for m in messages) == ["other-order", "same-order"]
    # The newest row of the burst names the message; all three are closed by it.
    assert max(burst) in {m.kwargs["inbox_id"] for m in messages}
    assert set((await states(db.url)).values()) == {"queued"}


async def test_relay_hands_off_again_rows_the_broker_lost(db: Db) -> None:
    settings = db.settings.model_copy(update={"requeue_after_s": 30.0})
    lost = await insert_rows(db.url, age_s=60, n=2, state="queued")
    recent = await insert_rows(db.url, age_s=5, n=1, state="queued")
    broker = stub_broker()  # empty: whatever was handed off and is not processed is lost
    before = sample("pandasync_relay_handed_off_again_total")

    assert await relay_once(db.sessions, broker, settings) == 2

    assert sorted(sent_inbox_ids(broker)) == sorted(lost)
    assert sample("pandasync_relay_handed_off_again_total") == before + 2
    # Handed off again just now: not again on the next pass.
    assert await relay_once(db.sessions, broker, settings) == 0
    assert recent[0] not in sent_inbox_ids(broker)


async def test_relay_leaves_rows_of_an_order_that_failed_for_good_to_replay(db: Db) -> None:
    settings = db.settings.model_copy(update={"requeue_after_s": 30.0})
    [refused] = await insert_rows(db.url, age_s=60, n=1, state="queued", order_id="refused")
    [outage] = await insert_rows(db.url, age_s=60, n=1, state="queued", order_id="outage")
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        for order_id, kind in (("refused", "permanent"), ("outage", "exhausted")):
            await conn.execute(
                "INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error) "
                "VALUES ('acct', '1688', $1, $2, 'webhook', 'boom')",
                order_id,
                kind,
            )
    finally:
        await conn.close()
    broker = stub_broker()

    assert await relay_once(db.sessions, broker, settings) == 1

    # Retries ran out in an outage: sent again. Refused for good: it waits for a replay.
    assert sent_inbox_ids(broker) == [outage]
    assert (await states(db.url))[refused] == "queued"


async def test_relay_leaves_rows_still_waiting_behind_a_backlog(db: Db) -> None:
    settings = db.settings.model_copy(update={"requeue_after_s": 30.0})
    waiting = await insert_rows(db.url, age_s=60, n=2, state="queued")
    lost = await insert_rows(db.url, age_s=200, n=1, state="queued")
    broker = stub_broker()
    # The oldest message still waiting was enqueued 100 s ago: rows handed off in the 30 s
    # before it, or after it, may be waiting too; a row handed off 200 s ago is not.
    enqueue_aged(broker, 100)  # the head of a backlog

    assert await relay_once(db.sessions, broker, settings) == 1

    assert [i for i in sent_inbox_ids(broker) if i is not None] == lost
    assert {(await states(db.url))[i] for i in waiting} == {"queued"}


async def test_relay_works_in_batches(db: Db) -> None:
    await insert_rows(db.url, age_s=60, n=7)
    broker = stub_broker()
    assert await relay_once(db.sessions, broker, db.settings, batch_size=3) == 7
    assert len(sent_inbox_ids(broker)) == 7


async def test_relay_skips_rows_another_relay_holds(db: Db) -> None:
    held, free = await insert_rows(db.url, age_s=60, n=2)
    other = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT id FROM webhook_inbox WHERE id = $1 FOR UPDATE", held)
        broker = stub_broker()
        # Does not wait for the lock: it takes what is free and leaves the rest.
        assert await relay_once(db.sessions, broker, db.settings) == 1
        assert sent_inbox_ids(broker) == [free]
        await transaction.rollback()
    finally:
        await other.close()
    assert (await states(db.url))[held] == "received"


async def test_relay_leaves_rows_received_when_the_broker_fails(db: Db) -> None:
    ids = await insert_rows(db.url, age_s=60, n=2)
    before = sample("pandasync_relay_failures_total")
    # A broker that refuses every message (its queue was never declared).
    assert await relay_once(db.sessions, stub_broker(declared=False), db.settings) == 0
    assert set((await states(db.url)).values()) == {"received"}
    assert sample("pandasync_relay_failures_total") == before + 1
    # The broker back: the same rows go out.
    broker = stub_broker()
    assert await relay_once(db.sessions, broker, db.settings) == 2
    assert sorted(sent_inbox_ids(broker)) == sorted(ids)


async def test_relay_marks_rows_with_nothing_to_reconcile_ignored(db: Db) -> None:
    [orphan] = await insert_rows(db.url, age_s=60, n=1, order_id=None)
    assert await relay_once(db.sessions, stub_broker(), db.settings) == 0
    assert (await states(db.url))[orphan] == "ignored"


async def test_backlog_gauge_counts_rows_not_handed_off(db: Db) -> None:
    await insert_rows(db.url, age_s=30, n=2)
    await insert_rows(db.url, age_s=30, n=1, state="queued")
    assert await measure_backlog(db.sessions) == 2
    assert sample("pandasync_relay_backlog") == 2
    assert sample("pandasync_relay_oldest_seconds") >= 30


async def test_nonces_older_than_twice_the_tolerance_are_purged(db: Db) -> None:
    tolerance = db.settings.signature_tolerance_s
    conn = await asyncpg.connect(asyncpg_dsn(db.url))
    try:
        await conn.executemany(
            "INSERT INTO webhook_nonces (nonce, seen_at) "
            "VALUES ($1, now() - make_interval(secs => $2))",
            [("old", 2 * tolerance + 5), ("inside", 2 * tolerance - 60), ("new", 0)],
        )
    finally:
        await conn.close()
    assert await purge_nonces(db.sessions, db.settings) == 1
    remaining = {r["nonce"] for r in await fetch(db.url, "SELECT nonce FROM webhook_nonces")}
    assert remaining == {"inside", "new"}
