"""``pandasync pay`` against the sandbox over HTTP and a real database: each awaiting order is
paid at most once, whatever runs at the same time, times out or was paid meanwhile.

Each test fills a ledger of its own by reconciling sandbox orders, then runs the real command
as a subprocess, and counts the payment calls the sandbox received per order
(``GET /_sandbox/calls``: ``payments``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import load_settings
from service.db import make_engine, make_sessionmaker
from service.domain import OrderStatus, Platform, ReconcileRequest, SyncSource
from service.ledger.payments import hold_run_lock, release_run_lock
from service.pandapon.client import PandaPonClient, make_http_client
from tests.support.servers import RecordingReceiver, SandboxServer, serve_in_thread
from tests.support.stack import PANDASYNC
from workers.reconcile import reconcile_order

pytest_plugins = ["tests.support.sandbox"]
pytestmark = pytest.mark.timeout(180)

AL, TB = Platform.ALIBABA_1688, Platform.TAOBAO
PAY_CALL = {AL: "alibaba_order_pay", TB: "taobao_order_pay"}


@dataclass
class Ledger:
    """The sandbox and a database of this test's own, the command pointed at both."""

    server: SandboxServer
    url: str
    engine: AsyncEngine
    tmp_path: Path

    # --- the world and the ledger -------------------------------------------------------------

    async def order(
        self, platform: Platform, price: str = "10", *, order_id: str | None = None
    ) -> str:
        """A new order awaiting payment (price + 1 shipping), synced into the ledger."""
        truth = await self.server.remote.create_order(
            platform,
            [{"title": "袜子", "quantity": 1, "unit_price": price}],
            shipping_fee="1",
            order_id=order_id,
        )
        await self.sync(platform, truth["order_id"])
        return str(truth["order_id"])

    async def sync(self, platform: Platform, order_id: str) -> None:
        settings = self.server.service_settings(database_url=self.url)
        async with make_http_client(settings) as http:
            client = PandaPonClient(settings, http)
            request = ReconcileRequest(
                settings.user_id or "", platform, order_id, SyncSource.MANUAL
            )
            await reconcile_order(self.engine, make_sessionmaker(self.engine), client, request)

    async def status(self, platform: Platform, order_id: str) -> str:
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT status FROM orders WHERE platform = :p AND order_id = :o"),
                {"p": platform.value, "o": order_id},
            )
        return str(found)

    async def attempts(self, order_id: str | None = None) -> list[dict[str, Any]]:
        where = "" if order_id is None else "WHERE order_id = :o"
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(f"SELECT * FROM payment_attempts {where} ORDER BY id"), {"o": order_id}
            )
            return [dict(r._mapping) for r in rows]

    # --- the sandbox ---------------------------------------------------------------------------

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=self.server.url, trust_env=False) as http:
            response = await http.request(method, f"/_sandbox{path}", json=body)
        response.raise_for_status()
        return response.json()

    async def pay_calls(self, platform: Platform | None = None) -> dict[str, int]:
        """Payment calls the sandbox received, per order id."""
        payments = (await self.control("GET", "/calls"))["payments"]
        calls: dict[str, int] = {}
        for platform_of, name in PAY_CALL.items():
            if platform in (None, platform_of):
                calls.update(payments[name])
        return calls

    async def behave(self, **behaviour: Any) -> None:
        await self.control("PUT", "/payments", behaviour)

    # --- the command ---------------------------------------------------------------------------

    def env(self, *, enabled: bool = True, **extra: str) -> dict[str, str]:
        settings = self.server.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
        env.update(
            {
                "PANDASYNC_DATABASE_URL": self.url,
                "PANDASYNC_API_BASE_URL": self.server.url,
                "PANDASYNC_ACCESS_KEY": settings.access_key,
                "PANDASYNC_ACCESS_SECRET": settings.access_secret.get_secret_value(),
                "PANDASYNC_USER_ID": settings.user_id,
                "PANDASYNC_TIMESTAMP_UNIT": settings.timestamp_unit,
                "PANDASYNC_PAYMENTS_ENABLED": "true" if enabled else "false",
                "PANDASYNC_LOG_LEVEL": "WARNING",
                "PANDASYNC_LOG_FORMAT": "json",
                **extra,
            }
        )
        return env

    def start(self, *args: str, enabled: bool = True, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [PANDASYNC, "pay", *args],
            env=self.env(enabled=enabled, **extra),
            cwd=self.tmp_path,  # no .env of the checkout
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    async def pay(
        self, *args: str, enabled: bool = True, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        process = self.start(*args, enabled=enabled, **extra)
        out, err = await asyncio.to_thread(process.communicate, timeout=120)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        assert "Traceback" not in err, err
        return result


@pytest.fixture
async def ledger(
    sandbox_server: SandboxServer, fresh_database_url: str, tmp_path: Path
) -> AsyncIterator[Ledger]:
    settings = load_settings(database_url=fresh_database_url)
    engine = make_engine(fresh_database_url, settings, application_name="pandasync-tests")
    try:
        yield Ledger(sandbox_server, fresh_database_url, engine, tmp_path)
    finally:
        await engine.dispose()


def line_of(result: subprocess.CompletedProcess[str], order_id: str) -> str:
    (line,) = [line for line in result.stdout.splitlines() if f" {order_id} " in line]
    return line


# --- the dry run and the switch -------------------------------------------------------------------


async def test_the_dry_run_makes_no_payment_call_and_writes_nothing(ledger: Ledger) -> None:
    first = await ledger.order(AL, "20")
    second = await ledger.order(TB, "30")
    result = await ledger.pay(enabled=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "payments are off" in result.stdout
    assert "would pay" in line_of(result, first)
    assert "21.00 CNY" in line_of(result, first)
    assert "would pay" in line_of(result, second)
    assert "31.00 CNY" in line_of(result, second)
    assert "pay: would pay 2 order(s), 52.00 CNY" in result.stdout
    assert await ledger.pay_calls() == {}
    assert await ledger.attempts() == []
    assert await ledger.status(AL, first) == "pending_payment"
    # The dry run looked upstream (a re-fetch per order), never at a payment endpoint.
    calls = (await ledger.control("GET", "/calls"))["calls"]
    assert calls["alibaba_order_detail"] >= 1
    assert calls["taobao_order_detail"] >= 1


async def test_payments_off_refuse_yes_in_one_line(ledger: Ledger) -> None:
    await ledger.order(AL)
    result = await ledger.pay("--yes", enabled=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pandasync pay: payments are off: set PANDASYNC_PAYMENTS_ENABLED=true to pay "
        "(docs/operations.md, Paying orders)"
    ]
    assert await ledger.pay_calls() == {}
    assert await ledger.attempts() == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--older-than", "2 days"], "--older-than"),
        (["--max-total", "-5"], "--max-total"),
        (["--max-total", "1.001"], "--max-total"),
        (["--release", "1"], "--reason"),
    ],
)
async def test_bad_options_change_nothing(ledger: Ledger, args: list[str], named: str) -> None:
    await ledger.order(AL)
    result = await ledger.pay(*args, "--yes")
    assert result.returncode == 2
    assert named in result.stderr
    assert await ledger.pay_calls() == {}
    assert await ledger.attempts() == []


# --- paying ---------------------------------------------------------------------------------------


async def test_yes_pays_each_awaiting_order_exactly_once(ledger: Ledger) -> None:
    orders = {(AL, await ledger.order(AL, "20")), (TB, await ledger.order(TB, "30"))}
    orders.add((AL, await ledger.order(AL, "40")))
    already = await ledger.order(TB, "50")
    await ledger.server.remote.pay(TB, already)
    await ledger.sync(TB, already)

    result = await ledger.pay("--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pay: paid 3 order(s), 93.00 CNY" in result.stdout
    assert await ledger.pay_calls() == {order_id: 1 for _, order_id in orders}
    for platform, order_id in orders:
        (attempt,) = await ledger.attempts(order_id)
        assert attempt["state"] == "paid"
        assert attempt["finished_at"] is not None
        assert attempt["finished_at"] >= attempt["started_at"]
        assert attempt["upstream_code"] == "200"
        assert attempt["upstream_request_id"]
        assert attempt["requested_by"]
        assert attempt["platform"] == platform.value
        # The ledger shows the payment: the command synced the order after the call.
        assert await ledger.status(platform, order_id) == "paid"
        assert (await ledger.server.remote.order(platform, order_id))["status"] == "paid"
        assert "ledger: paid" in line_of(result, order_id)
    amounts = {a["order_id"]: str(a["amount"]) for a in await ledger.attempts()}
    assert sorted(amounts.values()) == ["21.00", "31.00", "41.00"]

    again = await ledger.pay("--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pay: no order awaits payment" in again.stdout
    assert await ledger.pay_calls() == {order_id: 1 for _, order_id in orders}
    assert len(await ledger.attempts()) == 3


async def test_an_order_paid_upstream_meanwhile_is_skipped_and_synced(ledger: Ledger) -> None:
    paid_meanwhile = await ledger.order(AL)
    awaiting = await ledger.order(TB)
    await ledger.server.remote.pay(AL, paid_meanwhile)  # the ledger still says pending_payment
    assert await ledger.status(AL, paid_meanwhile) == "pending_payment"

    result = await ledger.pay("--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    line = line_of(result, paid_meanwhile)
    assert "skipped" in line
    assert "upstream shows it paid" in line
    assert await ledger.pay_calls() == {awaiting: 1}
    assert await ledger.attempts(paid_meanwhile) == []  # no call, so no attempt
    assert await ledger.status(AL, paid_meanwhile) == "paid"  # and the ledger caught up


async def test_max_total_stops_before_the_cap(ledger: Ledger) -> None:
    # Oldest first: ids in creation order, each total = price + 1.
    ids = [
        await ledger.order(AL, price, order_id=f"90000000000000000{n}")
        for n, price in enumerate(["29", "49", "39", "9"], start=1)
    ]
    plan = await ledger.pay("--max-total", "100")
    assert plan.returncode == 0
    assert "pay: would pay 2 order(s), 80.00 CNY" in plan.stdout

    result = await ledger.pay("--yes", "--max-total", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    assert await ledger.pay_calls() == {ids[0]: 1, ids[1]: 1}
    assert "would exceed --max-total 100.00 CNY" in line_of(result, ids[2])
    assert "not paid (cap)" in line_of(result, ids[3])  # the run stopped: not even the cheap one
    assert "pay: stopped before --max-total 100.00 CNY would be exceeded" in result.stdout
    assert [a["order_id"] for a in await ledger.attempts()] == ids[:2]


async def test_two_runs_at_once_never_pay_one_order_twice(ledger: Ledger) -> None:
    orders = [await ledger.order(AL if n % 2 else TB, str(10 + n)) for n in range(6)]
    await ledger.behave(delay_s=0.3)  # each call takes a while: the runs overlap
    first = ledger.start("--yes", "--by", "first")
    second = ledger.start("--yes", "--by", "second")
    results = [
        await asyncio.to_thread(process.communicate, timeout=120) for process in (first, second)
    ]
    assert [first.returncode, second.returncode] == [0, 0], results
    assert await ledger.pay_calls() == dict.fromkeys(orders, 1)
    attempts = await ledger.attempts()
    assert sorted(a["order_id"] for a in attempts) == sorted(orders)
    assert {a["state"] for a in attempts} == {"paid"}
    assert {a["requested_by"] for a in attempts} <= {"first", "second"}
    for platform, order_id in zip([AL if n % 2 else TB for n in range(6)], orders, strict=True):
        assert (await ledger.server.remote.order(platform, order_id))["status"] == "paid"


# --- outcomes that are not a payment --------------------------------------------------------------


async def test_a_timeout_leaves_the_attempt_unknown_and_it_is_never_repeated(
    ledger: Ledger,
) -> None:
    stuck = await ledger.order(AL)
    fine = await ledger.order(TB)
    await ledger.behave(orders={stuck: "hang"}, hang_s=20)
    result = await ledger.pay("--yes", PANDASYNC_HTTP_READ_TIMEOUT_S="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNKNOWN outcome" in line_of(result, stuck)
    assert "ledger: paid" in line_of(result, fine)
    (attempt,) = await ledger.attempts(stuck)
    assert attempt["state"] == "unknown"
    assert attempt["finished_at"] is not None
    assert "no answer in time" in attempt["error"]

    await ledger.behave()  # upstream answers again: still, nobody pays it twice
    again = await ledger.pay("--yes")
    assert again.returncode == 1
    line = line_of(again, stuck)
    assert "NEEDS A PERSON" in line
    assert f"--release {attempt['id']}" in line
    assert "1 order(s) need a person" in again.stdout
    assert await ledger.pay_calls() == {stuck: 1, fine: 1}
    assert [a["state"] for a in await ledger.attempts(stuck)] == ["unknown"]

    # The person finds it was paid after all (here: paid by hand upstream).
    await ledger.server.remote.pay(AL, stuck)
    settled = await ledger.pay("--yes")
    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert "settled" in line_of(settled, stuck)
    (closed,) = await ledger.attempts(stuck)
    assert closed["state"] == "paid"
    assert "confirmed paid by a re-fetch" in closed["upstream_msg"]
    assert "no answer in time" in closed["error"]  # the history stays
    assert await ledger.status(AL, stuck) == "paid"
    assert await ledger.pay_calls() == {stuck: 1, fine: 1}


async def test_a_payment_whose_answer_was_lost_is_settled_by_the_next_run(ledger: Ledger) -> None:
    order_id = await ledger.order(TB)
    await ledger.behave(mode="hang_after_paying", hang_s=20)
    first = await ledger.pay("--yes", PANDASYNC_HTTP_READ_TIMEOUT_S="1")
    assert first.returncode == 1
    line = line_of(first, order_id)
    assert "UNKNOWN outcome" in line
    assert "ledger: paid" in line  # the sync after the call already shows what happened
    assert [a["state"] for a in await ledger.attempts(order_id)] == ["unknown"]

    await ledger.behave()
    second = await ledger.pay("--yes")  # the ledger says paid: the attempt in flight is looked at
    assert second.returncode == 0, second.stdout + second.stderr
    assert "closed as paid" in line_of(second, order_id)
    assert [a["state"] for a in await ledger.attempts(order_id)] == ["paid"]
    assert await ledger.pay_calls() == {order_id: 1}
    third = await ledger.pay("--yes")
    assert "pay: no order awaits payment" in third.stdout


async def test_a_released_unknown_attempt_lets_a_later_run_pay(ledger: Ledger) -> None:
    stuck = await ledger.order(TB)
    await ledger.behave(mode="hang", hang_s=20)
    first = await ledger.pay("--yes", PANDASYNC_HTTP_READ_TIMEOUT_S="1")
    assert first.returncode == 1
    (attempt,) = await ledger.attempts(stuck)
    await ledger.behave()

    released = await ledger.pay(
        "--release", str(attempt["id"]), "--reason", "not paid in the console", "--by", "ops"
    )
    assert released.returncode == 0, released.stdout + released.stderr
    assert "released: failed" in released.stdout
    (after,) = await ledger.attempts(stuck)
    assert after["state"] == "failed"
    assert "released by ops: not paid in the console" in after["error"]
    twice = await ledger.pay("--release", str(attempt["id"]), "--reason", "again")
    assert twice.returncode == 1
    assert "not unknown: nothing to release" in twice.stderr

    paid = await ledger.pay("--yes")
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert [a["state"] for a in await ledger.attempts(stuck)] == ["failed", "paid"]
    assert await ledger.pay_calls() == {stuck: 2}


async def test_an_attempt_a_crash_left_started_is_reported_not_paid(ledger: Ledger) -> None:
    order_id = await ledger.order(AL)
    async with ledger.engine.begin() as conn:  # as a pay run killed mid-call leaves it
        await conn.execute(
            text(
                "INSERT INTO payment_attempts (account_id, platform, order_id, run_id, "
                "requested_by, amount) VALUES (:a, '1688', :o, 'crashed-run', 'ops', 11)"
            ),
            {"a": ledger.server.settings.user_id, "o": order_id},
        )
    plan = await ledger.pay()
    assert plan.returncode == 1
    assert "NEEDS A PERSON" in line_of(plan, order_id)
    assert [a["state"] for a in await ledger.attempts(order_id)] == ["started"]  # dry run

    result = await ledger.pay("--yes")
    assert result.returncode == 1
    assert "run crashed-run stopped mid-call" in line_of(result, order_id)
    (attempt,) = await ledger.attempts(order_id)
    assert attempt["state"] == "unknown"
    assert "stopped without recording the outcome" in attempt["error"]
    assert await ledger.pay_calls() == {}


async def test_an_attempt_of_a_live_run_is_left_to_it(ledger: Ledger) -> None:
    order_id = await ledger.order(TB)
    async with ledger.engine.connect() as holder:  # a pay run alive elsewhere, mid-call
        await holder.execution_options(isolation_level="AUTOCOMMIT")
        await hold_run_lock(holder, "live-run")
        async with ledger.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO payment_attempts (account_id, platform, order_id, run_id, "
                    "requested_by, amount) VALUES (:a, 'taobao', :o, 'live-run', 'bob', 11)"
                ),
                {"a": ledger.server.settings.user_id, "o": order_id},
            )
        result = await ledger.pay("--yes")
        await release_run_lock(holder, "live-run")
    assert result.returncode == 0, result.stdout + result.stderr
    line = line_of(result, order_id)
    assert "another pay run holds it (run live-run by bob" in line
    assert [a["state"] for a in await ledger.attempts(order_id)] == ["started"]
    assert await ledger.pay_calls() == {}


async def test_pay_by_hand_and_held_back_are_recorded_and_shown(ledger: Ledger) -> None:
    by_hand = await ledger.order(AL, "20")
    held = await ledger.order(AL, "30")
    refused = await ledger.order(TB, "40")
    await ledger.behave(orders={by_hand: "pay_url", refused: "fail"}, quota=0)
    result = await ledger.pay("--yes")
    assert result.returncode == 1, result.stdout + result.stderr  # the refused one failed
    url = f"https://sandbox.pandapon.invalid/pay?orderId={by_hand}"
    assert f"pay at {url}" in line_of(result, by_hand)
    assert "held back" in line_of(result, held)
    assert "FAILED" in line_of(result, refused)
    states = {a["order_id"]: a for a in await ledger.attempts()}
    assert (states[by_hand]["state"], states[by_hand]["pay_url"]) == ("pay_by_hand", url)
    assert states[held]["state"] == "held_back"
    assert (states[refused]["state"], states[refused]["upstream_code"]) == ("failed", "400")
    assert states[refused]["upstream_msg"] == "支付失败：账户余额不足"

    # Where a person sees it, as the reporting role.
    async with ledger.engine.begin() as conn:
        await conn.execute(text("SET LOCAL ROLE pandasync_reporting"))
        rows = await conn.execute(
            text(
                "SELECT order_id, amount, last_attempt_state, pay_url, attempts, closes_at, "
                "time_left, age FROM report_awaiting_payment"
            )
        )
        shown = {r.order_id: r for r in rows}
        readable = await conn.scalar(text("SELECT count(*) FROM payment_attempts"))
    assert set(shown) == {by_hand, held, refused}
    assert (shown[by_hand].last_attempt_state, shown[by_hand].pay_url) == ("pay_by_hand", url)
    assert str(shown[held].amount) == "31.00"
    assert shown[held].last_attempt_state == "held_back"
    assert all(
        r.attempts == 1 and r.closes_at is None and r.time_left is None for r in shown.values()
    )
    assert readable == 3

    # The next run leaves the link to its person, tries the others again.
    await ledger.behave()
    again = await ledger.pay("--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a person pays there" in line_of(again, by_hand)
    assert await ledger.pay_calls() == {by_hand: 1, held: 2, refused: 2}
    named = await ledger.pay("--yes", "--order", by_hand)
    assert named.returncode == 0
    assert await ledger.status(AL, by_hand) == "paid"
    assert await ledger.pay_calls() == {by_hand: 2, held: 2, refused: 2}


async def test_filters_choose_the_orders(ledger: Ledger) -> None:
    one = await ledger.order(AL)
    two = await ledger.order(TB)
    three = await ledger.order(TB)
    by_platform = await ledger.pay("--platform", "taobao")
    assert "would pay 2 order(s)" in by_platform.stdout
    assert one not in by_platform.stdout
    named = await ledger.pay("--order", three, "--order", "123")
    assert "would pay 1 order(s)" in named.stdout
    assert two not in named.stdout
    assert "not in the ledger" in line_of(named, "123")
    old = await ledger.pay("--older-than", "2h")
    assert "pay: no order awaits payment" in old.stdout
    other = await ledger.pay("--account", "someone-else")
    assert other.returncode == 2
    assert "only the configured account" in other.stderr


# --- the sandbox's side ---------------------------------------------------------------------------


async def test_the_sandbox_pays_the_order_and_sends_its_status_callback(
    sandbox_server: SandboxServer,
) -> None:
    receiver = RecordingReceiver()
    with serve_in_thread(receiver.app()) as base:
        remote = sandbox_server.remote
        await remote.configure_delivery(webhook_url=f"{base}/webhooks/pandapon")
        order_id = (await remote.create_order(AL))["order_id"]
        await remote.drain()
        before = len(receiver.snapshot())
        settings = sandbox_server.service_settings()
        async with make_http_client(settings, connect_retries=0) as http:
            client = PandaPonClient(settings, http)
            answer = await client.pay_orders(AL, [order_id])
            assert answer.for_order(order_id).state.value == "paid"
            snapshot = await client.order_detail(AL, order_id)
        assert snapshot.status is OrderStatus.PAID
        assert (await remote.drain())["drained"] is True
        after = receiver.snapshot()[before:]
    assert len(after) == 1
    assert order_id.encode() in after[0].body


async def test_the_payment_behaviour_is_checked_and_reset(sandbox_server: SandboxServer) -> None:
    async with httpx.AsyncClient(base_url=sandbox_server.url, trust_env=False) as http:
        bad = await http.put("/_sandbox/payments", json={"mode": "sometimes"})
        assert bad.status_code == 400
        assert "mode" in bad.json()["error"]
        set_ = await http.put("/_sandbox/payments", json={"quota": 1, "orders": {"1": "fail"}})
        assert set_.json()["payments"]["quota"] == 1
        reset = await http.delete("/_sandbox/payments")
        assert reset.json() == {
            "payments": {
                "mode": "succeed",
                "orders": {},
                "quota": None,
                "delay_s": 0.0,
                "hang_s": 30.0,
            },
            "protocol_paid": 0,
        }
