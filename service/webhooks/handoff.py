"""From the committed inbox to the broker, off the request's critical path.

After a batch commits, the writer hands its new rows to ``Handoff``, which sends one reconcile
message per order and then marks the rows ``queued``. The request has already been answered:
a broker that is down or slow only leaves rows ``received``, where the relay (``relay.py``)
finds them later. A row can therefore be sent twice (a slow send overtaken by the relay, or a
crash between send and mark); reconcile is idempotent and coalesced, so that costs nothing but
a message.

How the sends run (``make_sender``):

- the in-process broker (StubBroker) only appends to a queue: ``InlineSender``, on the loop;
- a real broker's client blocks and is CPU-heavy: the hand-off uses ``ProcessSender`` (a
  helper process) and the relay ``BrokerSender`` (a daemon thread). Both allow one call at a
  time, each awaited with a bound: a hanging broker ties up the helper, never the event loop,
  and further sends are refused at once (rows stay for the relay) until it answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol, TypeVar

import dramatiq
import structlog
from dramatiq.brokers.stub import StubBroker
from sqlalchemy.ext.asyncio import AsyncEngine

from service.broker import RECONCILE_QUEUE, make_broker, reconcile_message
from service.config import Settings
from service.domain import SyncSource
from service.ledger.inbox import MARK_QUEUED_SQL
from service.webhooks import metrics
from service.webhooks.held import HeldConnections
from service.webhooks.inbox import InboxRow, describe_error

log = structlog.get_logger("pandasync.webhooks")

T = TypeVar("T")

# Bound on one broker call (a batch of sends); the broker client's own timeouts come from
# its URL (e.g. redis://…?socket_timeout=2&socket_connect_timeout=2).
SEND_TIMEOUT_S = 5.0
# Rows waiting for a send beyond this are left to the relay instead of piling up in memory.
MAX_WAITING = 20_000
SEND_BATCH = 500
# Marking rows 'queued' is batched across sends (see Handoff._run).
MARK_EVERY_S = 0.2
MARK_AT_ROWS = 2000


class BrokerBusy(Exception):
    """The previous broker call has not returned yet (the broker is slow or hanging)."""


@dataclass(frozen=True, slots=True)
class PendingReconcile:
    """What a reconcile message needs from one inbox row."""

    inbox_id: int
    account_id: str
    platform: str
    order_id: str
    request_id: str | None


def send_reconciles(
    broker: dramatiq.Broker, items: Sequence[PendingReconcile]
) -> tuple[list[int], BaseException | None]:
    """Enqueue one reconcile per distinct order, oldest first; stop at the first failure.

    Several rows about one order (a burst, or a backlog after an outage) need one reconcile:
    it reads the order's current state and closes all its open inbox rows. The message
    carries the newest row's id and request id. Returns the inbox ids covered by the
    messages sent and the error that stopped the sending, if any. Blocking.
    """
    by_order: dict[tuple[str, str, str], list[PendingReconcile]] = {}
    for item in items:
        by_order.setdefault((item.account_id, item.platform, item.order_id), []).append(item)
    sent: list[int] = []
    for (account_id, platform, order_id), rows in by_order.items():
        newest = max(rows, key=lambda r: r.inbox_id)
        message = reconcile_message(
            account_id,
            platform,
            order_id,
            source=SyncSource.WEBHOOK.value,
            inbox_id=newest.inbox_id,
            request_id=newest.request_id,
        )
        try:
            broker.enqueue(message)
        except Exception as error:
            return sent, error
        sent.extend(r.inbox_id for r in rows)
    return sent, None


class BrokerSender:
    """Runs blocking broker calls on one daemon thread, one at a time, each bounded."""

    def __init__(self, broker: dramatiq.Broker, *, timeout_s: float = SEND_TIMEOUT_S) -> None:
        self.broker = broker
        self._timeout_s = timeout_s
        self._calls: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ] = queue.SimpleQueue()
        # Daemon: a call stuck on a dead broker must not keep the process from exiting.
        self._thread = threading.Thread(target=self._work, name="pandasync-broker", daemon=True)
        self._busy = False
        self._thread.start()

    def close(self) -> None:
        self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:
                future.set_exception(error)

    def _done(self, _: concurrent.futures.Future[Any]) -> None:
        self._busy = False

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the broker thread; BrokerBusy or TimeoutError instead of waiting long."""
        if self._busy:
            raise BrokerBusy("the previous broker call has not returned")
        self._busy = True
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.add_done_callback(self._done)
        self._calls.put((fn, future))
        return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)

    async def send(
        self, items: Sequence[PendingReconcile]
    ) -> tuple[list[int], BaseException | None]:
        """``send_reconciles`` on the broker thread; a busy or slow broker is an error result."""
        try:
            return await self.call(lambda: send_reconciles(self.broker, items))
        except (BrokerBusy, TimeoutError) as error:
            return [], error


class InlineSender:
    """The in-process broker (StubBroker) only appends to a queue: send on the event loop."""

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    async def send(
        self, items: Sequence[PendingReconcile]
    ) -> tuple[list[int], BaseException | None]:
        return send_reconciles(self.broker, items)

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()

    def close(self) -> None:
        pass


def _serve_broker(conn: Connection, settings: Settings) -> None:
    """The helper process: reconcile batches in, (sequence, ids sent, error) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it, by closing the pipe
    broker = make_broker(settings)
    broker.declare_queue(RECONCILE_QUEUE)
    conn.send((READY, [], None))
    try:
        while True:
            try:
                sequence, items = conn.recv()
            except (EOFError, OSError):
                return
            sent, error = send_reconciles(broker, items)
            conn.send((sequence, sent, None if error is None else describe_error(error)))
    finally:
        broker.close()
        pool = getattr(getattr(broker, "client", None), "connection_pool", None)
        if pool is not None:
            pool.disconnect()


READY = 0  # the helper's first message; batches are numbered from 1
# A helper is a new interpreter importing the broker stack: allow for a slow start.
HELPER_START_TIMEOUT_S = 60.0


class BrokerFailed(Exception):
    """The helper process reported a broker error (its description is the message)."""


class ProcessSender:
    """Sends from a helper process, so the broker client's CPU is not the event loop's.

    A Redis or RabbitMQ client spends on the order of 100-250 µs of Python per message
    (dramatiq's encoding, redis-py's packing and parsing); in a thread of the web process that
    time is taken from the event loop through the GIL, and it showed in bench/ingest as both
    throughput and tail latency. One batch is in flight at a time; a batch without an answer
    within the bound is left to the relay, and a dead helper is started again.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = SEND_TIMEOUT_S) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._sequence = 0
        self._waiting_for: int | None = None
        self._reply: asyncio.Future[tuple[list[int], str | None]] | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = asyncio.Event()
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded event loop
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve_broker,
            args=(child, self._settings),
            name="pandasync-broker",
            daemon=True,  # never outlives the web process
        )
        self._process.start()
        child.close()
        self._conn = parent
        self._waiting_for = None
        self._ready.clear()
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            sequence, sent, error = conn.recv()
        except (EOFError, OSError):
            self._stop(conn)
            self._settle(([], "the broker helper process exited"))
            return
        if sequence == READY:
            self._ready.set()
        elif sequence == self._waiting_for:
            self._waiting_for = None
            self._settle((sent, error))
        # An answer to a batch already given up on: its rows are the relay's now.

    def _settle(self, result: tuple[list[int], str | None]) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(result)

    def _stop(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()
        self._conn = None
        self._waiting_for = None

    async def send(
        self, items: Sequence[PendingReconcile]
    ) -> tuple[list[int], BaseException | None]:
        if self._waiting_for is not None:
            return [], BrokerBusy("the previous batch has not been answered")
        if self._conn is None or self._process is None or not self._process.is_alive():
            self._restart()
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), HELPER_START_TIMEOUT_S)
            except TimeoutError as slow_start:
                return [], slow_start
        conn = self._conn
        if conn is None:  # the helper exited while starting
            return [], BrokerFailed("the broker helper process exited")
        self._sequence += 1
        self._waiting_for = self._sequence
        self._reply = asyncio.get_running_loop().create_future()
        try:
            conn.send((self._sequence, list(items)))
            sent, error = await asyncio.wait_for(asyncio.shield(self._reply), self._timeout_s)
        except TimeoutError as timeout:
            return [], timeout
        except (OSError, ValueError) as broken:
            if self._conn is conn:
                self._stop(conn)
            return [], broken
        return sent, None if error is None else BrokerFailed(error)

    def _restart(self) -> None:
        log.warning("handoff.helper_restarted")
        if self._conn is not None:
            self._stop(self._conn)
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._process.close()
        self._start()

    def close(self) -> None:
        if self._conn is not None:
            self._stop(self._conn)
        if self._process is not None:
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process.close()
            self._process = None


class Sender(Protocol):
    async def send(
        self, items: Sequence[PendingReconcile]
    ) -> tuple[list[int], BaseException | None]: ...

    def close(self) -> None: ...


def make_sender(broker: dramatiq.Broker, settings: Settings) -> Sender:
    """How the web process hands committed rows to ``broker``."""
    if isinstance(broker, StubBroker):
        return InlineSender(broker)
    return ProcessSender(settings)


class Handoff:
    """Sends the reconciles of freshly committed rows, then marks those rows ``queued``."""

    def __init__(self, sender: Sender, engine: AsyncEngine, *, db_timeout_s: float) -> None:
        self._sender = sender
        self._connections = HeldConnections(engine, [MARK_QUEUED_SQL])
        self._db_timeout_s = db_timeout_s
        self._waiting: deque[PendingReconcile] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="pandasync-handoff")

    async def close(self, drain_timeout_s: float = 2.0) -> None:
        """Send what is waiting if that is quick; whatever is left stays for the relay."""
        if self._runner is None:
            return
        try:
            async with asyncio.timeout(drain_timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("handoff.left_for_relay", rows=len(self._waiting))
        self._runner.cancel()
        await asyncio.gather(self._runner, return_exceptions=True)
        await self._connections.close()

    def submit(self, committed: Sequence[tuple[int, InboxRow]]) -> None:
        """Called by the writer right after a commit; never blocks."""
        if len(self._waiting) + len(committed) > MAX_WAITING:
            metrics.HANDOFF_DEFERRED.inc(len(committed))
            return
        for inbox_id, row in committed:
            if row.platform is None or row.order_id is None:
                continue
            self._waiting.append(
                PendingReconcile(
                    inbox_id, row.account_id, row.platform.value, row.order_id, row.request_id
                )
            )
        self._idle.clear()
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        to_mark: list[int] = []
        last_mark = loop.time()
        while True:
            if not self._waiting:
                if to_mark:
                    await self._mark(to_mark)
                    to_mark = []
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            count = min(len(self._waiting), SEND_BATCH)
            to_mark += await self._send([self._waiting.popleft() for _ in range(count)])
            # Under load, one UPDATE for several batches: a row's 'queued' can wait, the
            # relay only looks at rows older than RELAY_GRACE_S.
            if len(to_mark) >= MARK_AT_ROWS or loop.time() - last_mark >= MARK_EVERY_S:
                await self._mark(to_mark)
                to_mark = []
                last_mark = loop.time()

    async def _send(self, batch: list[PendingReconcile]) -> list[int]:
        sent, error = await self._sender.send(batch)
        if sent:
            metrics.HANDOFF_SENT.inc(len(sent))
        if error is not None:
            unsent = len(batch) - len(sent)
            if isinstance(error, BrokerBusy | TimeoutError):
                metrics.HANDOFF_DEFERRED.inc(unsent)
            else:
                metrics.HANDOFF_FAILED.inc(unsent)
            log.warning("handoff.broker_failed", error=describe_error(error), left_for_relay=unsent)
        return sent

    async def _mark(self, sent: list[int]) -> None:
        try:
            async with asyncio.timeout(self._db_timeout_s):
                held = await self._connections.acquire()
            try:
                await held.statements[0].fetch(sent, timeout=self._db_timeout_s)
            except BaseException:
                await self._connections.discard(held)
                raise
            await self._connections.release(held)
        except Exception as mark_error:
            # The messages are out; the relay will send these rows once more, harmlessly.
            log.warning("handoff.mark_failed", error=describe_error(mark_error), rows=len(sent))
