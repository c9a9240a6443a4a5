"""``pandasync worker`` stops on SIGTERM at any moment: while it starts, while idle, and while
its reconciles wait on an upstream that never answers (each holding its order's lock
connection). Every moment runs at once, each on a worker of its own; each must exit, process
group and all, within ``EXIT_WITHIN_S``, leaving no database connection and no message lost. On
Redis and on RabbitMQ: each broker gives the interrupted messages back its own way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest

from service.broker import make_broker, queue_depth, reconcile_message
from service.config import load_settings
from service.db import asyncpg_dsn
from tests.support.rabbitmq import vhost_of_its_own
from tests.support.stack import PANDASYNC, Role, Stack

pytestmark = pytest.mark.e2e

EXIT_WITHIN_S = 15.0
BUSY_WITHIN_S = 60.0  # for the workers to boot and take their messages
QUEUED = 60  # enough for every busy worker's threads and prefetch
READY_LINE = "Worker process is ready for action."
WORKER_APPLICATION = "pandasync-worker"


@dataclass
class BlackHole:
    """An upstream that accepts connections and never answers."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def black_hole() -> Iterator[BlackHole]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(256)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield BlackHole(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def talks_to(role: Role, port: int) -> bool:
    """True when a process of ``role`` has a connection open to ``port``."""
    assert role.process is not None
    try:
        parent = psutil.Process(role.process.pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(c.raddr and c.raddr.port == port for c in process.net_connections("tcp")):
                return True
    return False


def group_alive(role: Role) -> bool:
    """True while any process of the role's group runs (the leader reaped first)."""
    assert role.process is not None
    role.process.poll()
    try:
        os.killpg(role.process.pid, 0)
    except ProcessLookupError:
        return False
    return True


async def stop_at(role: Role, moment: str, upstream: BlackHole) -> float:
    """Wait for ``moment``, send SIGTERM to the worker, return the seconds until its whole
    process group was gone (``inf`` past ``EXIT_WITHIN_S``)."""
    assert role.process is not None
    deadline = time.monotonic() + BUSY_WITHIN_S
    if moment == "busy":
        while not talks_to(role, upstream.port):
            assert role.running, f"worker exited early\n{role.tail()}"
            assert time.monotonic() < deadline, f"worker took no message\n{role.tail()}"
            await asyncio.sleep(0.1)
    elif moment == "idle":
        while READY_LINE not in role.tail(200):
            assert role.running, f"worker exited early\n{role.tail()}"
            assert time.monotonic() < deadline, f"worker not ready\n{role.tail()}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # its consumer has polled the empty queue
    else:
        await asyncio.sleep(float(moment))
    role.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while group_alive(role):
        if time.monotonic() - signalled > EXIT_WITHIN_S:
            return float("inf")
        await asyncio.sleep(0.05)
    return time.monotonic() - signalled


async def open_connections(database_url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            WORKER_APPLICATION,
        )
    finally:
        await conn.close()
    return int(count)


@contextlib.contextmanager
def idle_broker_url(request: pytest.FixtureRequest, broker_url: str) -> Iterator[str]:
    """A queue of the test's broker kind that nothing is sent to, apart from ``broker_url``'s."""
    if broker_url.startswith("amqp"):
        with vhost_of_its_own() as url:
            yield url
    else:  # no worker of another test runs meanwhile: the shared database is as empty
        yield request.getfixturevalue("clean_redis")


async def test_sigterm_stops_a_worker_at_any_moment(
    fresh_database_url: str, broker_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with idle_broker_url(request, broker_url) as idle_url:
        await sigterm_at_every_moment(fresh_database_url, broker_url, idle_url, tmp_path)


async def sigterm_at_every_moment(
    fresh_database_url: str, broker_url: str, idle_url: str, tmp_path: Path
) -> None:
    busy_broker = make_broker(load_settings(broker_url=broker_url))
    for n in range(QUEUED):
        busy_broker.enqueue(reconcile_message("acct", "taobao", f"O{n}", source="sweep"))

    with black_hole() as upstream:
        stack = Stack(
            fresh_database_url,
            broker_url,
            tmp_path,
            settings={
                "PANDASYNC_API_BASE_URL": upstream.url,
                # Reconciles stay in flight until the shutdown stops them, not before.
                "PANDASYNC_HTTP_READ_TIMEOUT_S": "120",
                "PANDASYNC_RECONCILE_UPSTREAM_BUDGET_S": "300",
            },
        )
        argv = [PANDASYNC, "worker", "--processes", "1", "--threads", "4"]
        moments = ["0.2", "1", "3", "busy", "idle"]
        roles = {
            moment: stack.add(
                f"worker-{moment}",
                argv,
                # The idle worker has a queue of its own, which stays empty.
                **({"PANDASYNC_BROKER_URL": idle_url} if moment == "idle" else {}),
            )
            for moment in moments
        }
        try:
            for role in roles.values():
                role.start()
            took = await asyncio.gather(
                *(stop_at(role, moment, upstream) for moment, role in roles.items())
            )
        finally:
            stack.stop()

    slow = {m: s for m, s in zip(moments, took, strict=True) if s > EXIT_WITHIN_S}
    assert not slow, f"still running {EXIT_WITHIN_S} s after SIGTERM: {sorted(slow)}\n" + "\n".join(
        f"--- {roles[m].name} ---\n{roles[m].tail()}" for m in slow
    )
    # Connections close as the processes exit; the server notices at once.
    for _ in range(40):
        if await open_connections(fresh_database_url) == 0:
            break
        await asyncio.sleep(0.05)
    assert await open_connections(fresh_database_url) == 0
    # Every message taken and interrupted went back to the broker (RabbitMQ counts a message
    # given back a moment after the connection closed).
    for _ in range(50):
        if queue_depth(busy_broker) == QUEUED:
            break
        await asyncio.sleep(0.1)
    assert queue_depth(busy_broker) == QUEUED
    busy_broker.close()
