"""The inbox write: each message committed once to webhook_inbox, with its nonce, then 200.

The writer groups the rows of concurrent requests into one transaction (group commit): a
request hands its row to ``InboxWriter.store`` and waits; a flusher takes everything pending
and writes it with ONE statement (nonces into ``webhook_nonces`` and rows into
``webhook_inbox``, both ``ON CONFLICT DO NOTHING``, and the types of the stored rows the
receiver does not know into ``unmapped_values``), run in autocommit on a held connection so
that the statement is the transaction: one round trip commits the batch. Only when it has
returned is each request resolved with its own outcome. A request is answered 200 only after
the commit that holds its row (or the row it duplicates); anything else is a
``StoreUnavailable`` and a 503.

Because the nonce insert and the row insert are one statement, hence one transaction, a replayed
nonce can never leave a stored row behind, and a message whose store failed leaves no nonce
behind (so PandaPon's next delivery is not mistaken for a replay). Across web processes the
unique keys of both tables arbitrate: a concurrent insert of the same key waits for the other
transaction and then sees its row.

Up to ``max_in_flight`` transactions run at once; while they run, new rows queue and go out
together in the next one, so the batch size follows the load by itself.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain import InboxState, MessageKind, Platform, SignatureState
from service.webhooks import metrics
from service.webhooks.errors import StoreUnavailable
from service.webhooks.held import HeldConnections

log = structlog.get_logger("pandasync.webhooks")


def dedupe_key(account_id: str, canonical_envelope: bytes) -> str:
    """The key that is the same for every delivery of one message, and differs between messages.

    What changes between PandaPon's deliveries of one message is the transport: the
    ``timestamp``, ``nonce-str`` and ``signature`` headers are made afresh for each push, and
    the JSON may be re-serialized (key order, spacing, ``messageBody`` as an object or as a
    string). What a retry repeats is the message: its type, platform, body and the envelope's
    own ``timestamp`` (when the message was first pushed). So the key is a digest of the
    account and of those four fields, decoded and serialized canonically (``Envelope.canonical``),
    and of nothing from the headers. Keeping the envelope timestamp in it means that an order
    that goes A -> B -> A produces two distinct "A" messages, not one swallowed duplicate; if
    PandaPon ever re-stamps a retry, the cost is an extra row and an extra (idempotent)
    reconcile, never a lost message.
    """
    digest = hashlib.sha256(account_id.encode())
    digest.update(b"\n")
    digest.update(canonical_envelope)
    return digest.hexdigest()


@dataclass(slots=True)
class InboxRow:
    """One message as it goes into webhook_inbox, with the nonce to record beside it."""

    account_id: str
    dedupe_key: str
    message_type: str
    kind: MessageKind
    platform: Platform | None
    order_id: str | None
    refund_id: str | None
    pushed_at: datetime | None
    raw_body: bytes
    headers_json: str
    request_id: str | None
    state: InboxState
    nonce: str | None
    signature_state: SignatureState | None = None
    # A type the receiver does not know: recorded in unmapped_values when newly stored.
    unknown_type: bool = False


class StoreOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLAYED_NONCE = "replayed_nonce"


@dataclass(frozen=True, slots=True)
class StoreResult:
    outcome: StoreOutcome
    inbox_id: int | None = None


@dataclass(slots=True)
class _Entry:
    row: InboxRow
    future: asyncio.Future[StoreResult]


CommittedHook = Callable[[Sequence[tuple[int, InboxRow]]], None]

# One statement per batch, which is its own transaction (autocommit): arrays in, one result
# row per input row out. A single round trip matters: under load every round trip waits for
# a turn of a busy event loop, so BEGIN / INSERT / COMMIT would triple the store latency.
STORE_BATCH = """
WITH input AS (
    SELECT * FROM unnest(
        $1::int[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::timestamptz[], $11::bytea[], $12::text[], $13::text[],
        $14::text[], $15::text[], $16::bool[]
    ) AS t(ord, nonce, account_id, dedupe_key, message_type, kind, platform, order_id,
           refund_id, pushed_at, raw_body, headers, request_id, state, signature_state,
           unknown_type)
),
fresh_nonce AS (
    INSERT INTO webhook_nonces (nonce)
    SELECT nonce FROM input WHERE nonce IS NOT NULL ORDER BY nonce
    ON CONFLICT DO NOTHING
    RETURNING nonce
),
stored AS (
    INSERT INTO webhook_inbox (account_id, dedupe_key, message_type, kind, platform, order_id,
                               refund_id, pushed_at, raw_body, headers, request_id, state,
                               signature_state)
    SELECT account_id, dedupe_key, message_type, kind, platform, order_id, refund_id,
           pushed_at, raw_body, headers::jsonb, request_id, state, signature_state
    FROM input
    WHERE nonce IS NULL OR nonce IN (SELECT nonce FROM fresh_nonce)
    ORDER BY dedupe_key
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id, dedupe_key
),
-- Types the receiver does not know, of the messages stored now (a duplicate is not counted
-- again), with the last order they named: grouped, since one statement cannot update a row
-- twice, and sorted, so that concurrent batches lock shared rows in one order. The envelope
-- already bounds the type to 128 characters without NUL. Known types cost only the empty
-- scan of this CTE.
unmapped_type AS (
    INSERT INTO unmapped_values (account_id, platform, field, value, seen_count, last_order_id)
    SELECT input.account_id, input.platform, 'message_type', input.message_type, count(*),
           (array_agg(input.order_id ORDER BY input.ord DESC)
               FILTER (WHERE input.order_id IS NOT NULL))[1]
    FROM input JOIN stored ON stored.dedupe_key = input.dedupe_key
    WHERE input.unknown_type
    GROUP BY input.account_id, input.platform, input.message_type
    ORDER BY input.account_id, input.platform, input.message_type
    ON CONFLICT ON CONSTRAINT uq_unmapped_values_account_id_platform_field_value DO UPDATE
    SET last_seen_at = now(),
        seen_count = unmapped_values.seen_count + excluded.seen_count,
        last_order_id = coalesce(excluded.last_order_id, unmapped_values.last_order_id)
)
SELECT input.ord, (input.nonce IS NULL OR fresh_nonce.nonce IS NOT NULL) AS fresh, stored.id
FROM input
LEFT JOIN fresh_nonce ON fresh_nonce.nonce = input.nonce
LEFT JOIN stored ON stored.dedupe_key = input.dedupe_key
"""


# Bodies may be up to MAX_BODY_BYTES each: keep one statement's parameters bounded too.
MAX_BATCH_BYTES = 8 * 1024 * 1024


def batch_arguments(rows: Sequence[InboxRow]) -> tuple[list[Any], ...]:
    """STORE_BATCH's sixteen array parameters, in order."""
    return (
        list(range(len(rows))),
        [r.nonce for r in rows],
        [r.account_id for r in rows],
        [r.dedupe_key for r in rows],
        [r.message_type for r in rows],
        [r.kind.value for r in rows],
        [r.platform.value if r.platform else None for r in rows],
        [r.order_id for r in rows],
        [r.refund_id for r in rows],
        [r.pushed_at for r in rows],
        [r.raw_body for r in rows],
        [r.headers_json for r in rows],
        [r.request_id for r in rows],
        [r.state.value for r in rows],
        [r.signature_state.value if r.signature_state else None for r in rows],
        [r.unknown_type for r in rows],
    )


def describe_error(error: BaseException) -> str:
    """A short description for logs: never the statement's parameters (bodies, headers)."""
    if isinstance(error, sa_exc.StatementError) and error.orig is not None:
        error = error.orig
    return f"{type(error).__name__}: {str(error)[:200]}"


def is_data_error(error: BaseException) -> bool:
    """An error caused by some row's content, not by the database or the connection."""
    return isinstance(
        error,
        asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | UnicodeError,
    )


class InboxWriter:
    """Group commit of inbox rows; ``store`` answers only after the commit."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        timeout_s: float,
        on_committed: CommittedHook | None = None,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self._engine = engine
        self._timeout_s = timeout_s
        self._on_committed = on_committed
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_in_flight)
        self._connections = HeldConnections(engine, [STORE_BATCH])
        self._pending: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._flushes: set[asyncio.Task[None]] = set()
        # Keys of rows in transactions not yet finished: a second row with the same nonce or
        # dedupe key waits for the next batch, so each batch has distinct keys and the
        # database alone decides between them.
        self._nonces_in_flight: set[str] = set()
        self._keys_in_flight: set[str] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="pandasync-inbox-writer")

    async def close(self) -> None:
        """Stop taking rows, finish the transactions in flight, refuse what is left."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(StoreUnavailable("store_failed", "shutting down"))
        await self._connections.close()

    async def store(self, row: InboxRow) -> StoreResult:
        """Commit ``row`` (and its nonce); raise StoreUnavailable if that cannot be done in time."""
        if self._closed or self._runner is None:
            raise StoreUnavailable("store_failed", "the inbox writer is not running")
        future: asyncio.Future[StoreResult] = asyncio.get_running_loop().create_future()
        self._pending.append(_Entry(row, future))
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            raise StoreUnavailable("store_timeout", "the inbox was not written in time") from None

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._slots.acquire()
                batch = self._take_batch()
                if not batch:
                    self._slots.release()
                    break
                task = asyncio.create_task(self._flush(batch))
                self._flushes.add(task)
                task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._slots.release()
        self._wakeup.set()

    def _take_batch(self) -> list[_Entry]:
        batch: list[_Entry] = []
        deferred: list[_Entry] = []
        size = 0
        while self._pending and len(batch) < self._max_batch and size < MAX_BATCH_BYTES:
            entry = self._pending.popleft()
            if entry.future.done():  # its request gave up before the write began
                continue
            nonce, key = entry.row.nonce, entry.row.dedupe_key
            if key in self._keys_in_flight or (nonce and nonce in self._nonces_in_flight):
                deferred.append(entry)
                continue
            self._keys_in_flight.add(key)
            if nonce:
                self._nonces_in_flight.add(nonce)
            batch.append(entry)
            size += len(entry.row.raw_body)
        self._pending.extendleft(reversed(deferred))
        return batch

    async def _flush(self, batch: list[_Entry]) -> None:
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            try:
                await self._write(batch, deadline)
            except Exception as error:
                if len(batch) == 1 or not is_data_error(error):
                    raise
                # One row's content broke the statement: do not let it sink its neighbours.
                log.error("inbox.batch_data_error", error=describe_error(error), batch=len(batch))
                for entry in batch:
                    try:
                        await self._write([entry], deadline)
                    except Exception as single_error:
                        self._fail([entry], "store_failed", single_error)
        except TimeoutError as error:
            self._fail(batch, "store_timeout", error)
        except Exception as error:
            self._fail(batch, "store_failed", error)
        finally:
            for entry in batch:
                self._keys_in_flight.discard(entry.row.dedupe_key)
                if entry.row.nonce:
                    self._nonces_in_flight.discard(entry.row.nonce)

    async def _write(self, batch: list[_Entry], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            held = await self._connections.acquire()
        try:
            returned = await held.statements[0].fetch(
                *batch_arguments([entry.row for entry in batch]),
                timeout=max(deadline - loop.time(), 0.001),
            )
        except BaseException as error:
            if isinstance(error, Exception) and is_data_error(error):
                await self._connections.release(held)
            else:
                await self._connections.discard(held)
            raise
        await self._connections.release(held)
        # Committed (the statement was its own transaction): every row of the batch is durable.
        metrics.BATCH_SIZE.observe(len(batch))
        committed: list[tuple[int, InboxRow]] = []
        for ord_, fresh, inbox_id in returned:
            entry = batch[ord_]
            if not fresh:
                outcome = StoreResult(StoreOutcome.REPLAYED_NONCE)
            elif inbox_id is None:
                outcome = StoreResult(StoreOutcome.DUPLICATE)
            else:
                outcome = StoreResult(StoreOutcome.STORED, int(inbox_id))
                if entry.row.state is InboxState.RECEIVED:
                    committed.append((int(inbox_id), entry.row))
            if not entry.future.done():
                entry.future.set_result(outcome)
        if committed and self._on_committed is not None:
            self._on_committed(committed)

    def _fail(self, batch: Sequence[_Entry], reason: str, error: BaseException) -> None:
        log.warning(
            "inbox.write_failed", reason=reason, error=describe_error(error), batch=len(batch)
        )
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(StoreUnavailable(reason, "the inbox is unavailable"))
