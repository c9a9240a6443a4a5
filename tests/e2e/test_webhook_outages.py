"""The broker, then the database, taken away while messages keep arriving.

Real HTTP to the receiver under uvicorn, Postgres and the broker (Redis, then RabbitMQ) behind
TCP proxies the test cuts and restores. The promises checked: nothing answered 200 is missing
from the inbox, and every stored message (including any stored but answered 503) reaches the
workers' queue once the broker is back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from dramatiq.broker import MessageProxy

from service.app import close_broker, create_app
from service.broker import RECONCILE_QUEUE, make_broker
from service.config import load_settings
from tests.support.tcp_proxy import TcpProxy
from tests.support.webhook_checks import eventually, fetch, postgres_address, sample, via_port
from tests.support.webhook_requests import WEBHOOK, encode, receiver_settings, signed, taobao_status
from tests.support.webhook_server import serving

pytestmark = pytest.mark.redis

SENDERS = 4


def drain_reconciles(broker_url: str) -> list[MessageProxy]:
    """Every reconcile message waiting in the broker, consumed the way a worker would."""
    broker = make_broker(load_settings(broker_url=broker_url))
    broker.declare_queue(RECONCILE_QUEUE)
    # Everything already waits: the timeout only says when the queue is empty.
    consumer = broker.consume(RECONCILE_QUEUE, prefetch=1000, timeout=1000)
    messages: list[MessageProxy] = []
    try:
        while (message := next(consumer)) is not None:
            messages.append(message)
            consumer.ack(message)
    finally:
        consumer.close()
        close_broker(broker)
    return messages


def broker_address(broker_url: str) -> tuple[str, int]:
    parts = urlsplit(broker_url)
    return parts.hostname or "127.0.0.1", parts.port or (5672 if parts.scheme == "amqp" else 6379)


def broker_via_port(broker_url: str, port: int) -> str:
    parts = urlsplit(broker_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_broker_then_database_outage_loses_nothing(
    fresh_database_url: str, broker_url: str
) -> None:
    with (
        TcpProxy(postgres_address(fresh_database_url)) as postgres_proxy,
        TcpProxy(broker_address(broker_url)) as broker_proxy,
    ):
        settings = receiver_settings(
            via_port(fresh_database_url, postgres_proxy.port),
            broker_url=broker_via_port(broker_url, broker_proxy.port),
            relay_interval_s=0.2,
            relay_grace_s=0.5,
        )
        relayed_before = sample("pandasync_relay_handed_off_total")
        answers: dict[str, int] = {}  # order id -> HTTP status
        stop = asyncio.Event()

        def tally(status: int) -> int:
            return Counter(answers.values())[status]

        async with (
            serving(create_app(settings)) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as client,
        ):

            async def sender() -> None:
                while not stop.is_set():
                    order_id = uuid.uuid4().hex[:20]
                    body = encode(taobao_status(order_id))
                    response = await client.post(WEBHOOK, content=body, headers=signed())
                    answers[order_id] = response.status_code

            async def stored_at_least(n: int) -> bool:
                return tally(200) >= n

            senders = [asyncio.create_task(sender()) for _ in range(SENDERS)]
            try:
                await eventually(lambda: stored_at_least(20), "messages stored, all up")

                broker_proxy.cut()
                mark = tally(200)
                await eventually(lambda: stored_at_least(mark + 40), "stored with the broker down")

                postgres_proxy.cut()

                async def refused_enough() -> bool:
                    return tally(503) >= 20

                await eventually(refused_enough, "503s while the database is down")

                postgres_proxy.restore()
                mark = tally(200)
                await eventually(lambda: stored_at_least(mark + 40), "stored after the database")

                broker_proxy.restore()
            finally:
                stop.set()
                await asyncio.gather(*senders)

            async def all_handed_off() -> bool:
                rows = await fetch(
                    fresh_database_url,
                    "SELECT count(*) AS n FROM webhook_inbox WHERE state = $1",
                    "received",
                )
                return rows[0]["n"] == 0

            await eventually(all_handed_off, "every stored row handed to the broker")

    # Only the two answers of the contract, and both phases really happened.
    assert set(answers.values()) <= {200, 503}
    assert tally(503) >= 20

    rows = await fetch(fresh_database_url, "SELECT id, order_id, state FROM webhook_inbox")
    stored = Counter(r["order_id"] for r in rows)
    answered_200 = {order for order, status in answers.items() if status == 200}
    # Nothing acknowledged is lost, and nothing is stored twice.
    assert answered_200 <= set(stored)
    assert max(stored.values()) == 1
    assert {r["state"] for r in rows} == {"queued"}

    # What the broker outage stranded went out through the relay.
    assert sample("pandasync_relay_handed_off_total") > relayed_before

    messages = await asyncio.to_thread(drain_reconciles, broker_url)
    reached = {m.kwargs["inbox_id"] for m in messages}
    assert {r["id"] for r in rows} <= reached
    assert {m.args[2] for m in messages} == set(stored)


async def test_hand_off_survives_its_helper_process_dying(
    fresh_database_url: str, broker_url: str
) -> None:
    import multiprocessing
    import os
    import signal

    settings = receiver_settings(fresh_database_url, broker_url=broker_url, relay_grace_s=600)

    async def all_queued() -> bool:
        rows = await fetch(fresh_database_url, "SELECT state FROM webhook_inbox")
        return bool(rows) and {r["state"] for r in rows} == {"queued"}

    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        first = await client.post(WEBHOOK, content=encode(taobao_status()), headers=signed())
        assert first.status_code == 200
        await eventually(all_queued, "the first message handed off")
        [helper] = [p for p in multiprocessing.active_children() if p.name == "pandasync-broker"]
        assert helper.pid is not None
        os.kill(helper.pid, signal.SIGKILL)
        helper.join()
        second = await client.post(WEBHOOK, content=encode(taobao_status()), headers=signed())
        assert second.status_code == 200
        # Not the relay (its grace is ten minutes): a new helper sends it.
        await eventually(all_queued, "the second message handed off")
    messages = await asyncio.to_thread(drain_reconciles, broker_url)
    assert len(messages) == 2
