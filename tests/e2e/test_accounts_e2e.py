"""Two PandaPon accounts in one deployment, with the real processes.

Each account is served by a ``pandasync sandbox`` process of its own (its own port, keys and
world) that delivers its callbacks to that account's token URL; one ``pandasync serve`` and one
``pandasync worker`` run with PANDASYNC_ACCOUNTS_FILE listing both, each account's
``api_base_url`` pointing at its sandbox. The tests check that callbacks land under the right
account, that a callback claiming an account it was not signed for is refused, that a backfill
of one account leaves the other alone, and that a 429 storm on one account leaves the other's
freshness as it was (measured, and printed).

On Redis only: the broker carries the same reconcile messages as in test_reconcile_e2e, which
runs on both brokers; the 429 storm reads the accounts' pauses in the Redis rate limiter.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis.asyncio as aioredis

from service.pandapon.ratelimit import DEFAULT_KEY
from service.pandapon.signer import Credentials, signed_headers
from service.sandbox.remote import SandboxRemote
from tests.support.ledger_truth import fetch
from tests.support.stack import PANDASYNC, Role, Stack, free_port

pytestmark = pytest.mark.e2e

A = Credentials("ak-e2e-shop-a", "secret-e2e-shop-a-0123456789", "2200001")
B = Credentials("ak-e2e-shop-b", "secret-e2e-shop-b-9876543210", "2200002")
TOKEN_A = "e2e-token-of-shop-a-0123456789"
TOKEN_B = "e2e-token-of-shop-b-0123456789"
LINES = [{"title": "保温杯", "quantity": 1, "unit_price": "25.00", "product_id": "p-cup"}]
SAMPLES = 8
# B's freshness under A's storm: within this many times the calm figure, or under this bound.
STORM_FACTOR = 3.0
STORM_BOUND_S = 2.0


class Accounts:
    """The two sandboxes and the service roles, started and stopped together."""

    def __init__(self, database_url: str, redis_url: str, workdir: Path) -> None:
        # A Stack for its ports, roles and logs; its own sandbox is not started.
        self.stack = Stack(database_url, redis_url, workdir)
        self.port_a = free_port()
        self.port_b = free_port()
        self.accounts_file = workdir / "accounts.toml"
        self.accounts_file.write_text(
            f"""
[accounts.shop-a]
user_id = "{A.user_id}"
access_key = "{A.access_key}"
access_secret = "{A.access_secret}"
webhook_token = "{TOKEN_A}"
api_base_url = "{self.url_a}"

[accounts.shop-b]
user_id = "{B.user_id}"
access_key = "{B.access_key}"
access_secret_env = "E2E_SHOP_B_SECRET"
webhook_token = "{TOKEN_B}"
api_base_url = "{self.url_b}"
"""
        )

    @property
    def url_a(self) -> str:
        return f"http://127.0.0.1:{self.port_a}"

    @property
    def url_b(self) -> str:
        return f"http://127.0.0.1:{self.port_b}"

    def service_env(self) -> dict[str, str]:
        env = self.stack.env(
            PANDASYNC_ACCOUNTS_FILE=str(self.accounts_file),
            E2E_SHOP_B_SECRET=B.access_secret,
        )
        for name in ("ACCESS_KEY", "ACCESS_SECRET", "USER_ID", "WEBHOOK_TOKEN"):
            env.pop(f"PANDASYNC_{name}", None)
        return env

    def sandbox_env(self, credentials: Credentials, token: str) -> dict[str, str]:
        return self.stack.env(
            PANDASYNC_ACCESS_KEY=credentials.access_key,
            PANDASYNC_ACCESS_SECRET=credentials.access_secret,
            PANDASYNC_USER_ID=credentials.user_id,
            PANDASYNC_SANDBOX_DELIVERY__WEBHOOK_URL=f"{self.stack.webhook_url}/{token}",
        )

    def role(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        role = Role(name, [PANDASYNC, *argv], env, self.stack.workdir / f"{name}.log")
        self.stack.roles[name] = role
        role.start()

    async def start(self) -> None:
        self.role(
            "sandbox-a", ["sandbox", "--port", str(self.port_a)], self.sandbox_env(A, TOKEN_A)
        )
        self.role(
            "sandbox-b", ["sandbox", "--port", str(self.port_b)], self.sandbox_env(B, TOKEN_B)
        )
        self.role("web", ["serve", "--port", str(self.stack.web_port)], self.service_env())
        self.role("worker", ["worker", "--processes", "1", "--threads", "4"], self.service_env())
        ready = (
            f"{self.url_a}/_sandbox/health",
            f"{self.url_b}/_sandbox/health",
            f"{self.stack.web_url}/readyz",
        )
        async with httpx.AsyncClient(timeout=2.0) as http:
            for url in ready:
                deadline = time.monotonic() + 30
                while True:
                    dead = [r.name for r in self.stack.roles.values() if not r.running]
                    assert not dead, f"{dead} exited early\n{self.stack.logs()}"
                    try:
                        if (await http.get(url)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, f"{url} not ready\n{self.stack.logs()}"
                    await asyncio.sleep(0.1)

    async def command(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            PANDASYNC,
            *args,
            env=self.service_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode()


@pytest.fixture
async def accounts(
    fresh_database_url: str, clean_redis: str, tmp_path: Path
) -> AsyncIterator[Accounts]:
    running = Accounts(fresh_database_url, clean_redis, tmp_path)
    try:
        await running.start()
        yield running
    finally:
        running.stack.stop()
        print(running.stack.logs())  # shown by pytest when the test failed


async def ledger_status(database_url: str, account_id: str, order_id: str) -> str | None:
    rows = await fetch(
        database_url,
        "SELECT status::text AS status FROM orders WHERE account_id = $1 AND order_id = $2",
        account_id,
        order_id,
    )
    return rows[0]["status"] if rows else None


async def wait_status(
    database_url: str, account_id: str, order_id: str, status: str, within_s: float = 30.0
) -> float:
    """Seconds until the ledger shows ``status`` for the order (polling every 10 ms)."""
    started = time.monotonic()
    while await ledger_status(database_url, account_id, order_id) != status:
        assert time.monotonic() - started < within_s, f"{order_id} never became {status}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def paid_latencies(sb: SandboxRemote, database_url: str, account_id: str) -> list[float]:
    """Callback to ledger, SAMPLES times: pay an order upstream, time until the ledger has it."""
    latencies = []
    for _ in range(SAMPLES):
        order = await sb.create_order("taobao", LINES)
        await wait_status(database_url, account_id, order["order_id"], "pending_payment")
        started = time.monotonic()
        await sb.pay("taobao", order["order_id"])
        await wait_status(database_url, account_id, order["order_id"], "paid")
        latencies.append(time.monotonic() - started)
    return latencies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


async def test_callbacks_land_in_their_account_and_a_forgery_is_refused(
    accounts: Accounts,
) -> None:
    db = accounts.stack.database_url
    async with SandboxRemote(accounts.url_a) as sa, SandboxRemote(accounts.url_b) as sb:
        a_orders = [(await sa.create_order(p, LINES))["order_id"] for p in ("taobao", "1688")]
        b_orders = [(await sb.create_order(p, LINES))["order_id"] for p in ("taobao", "1688")]
        for order_id in a_orders:
            await wait_status(db, A.user_id, order_id, "pending_payment")
        for order_id in b_orders:
            await wait_status(db, B.user_id, order_id, "pending_payment")
        for sandbox in (sa, sb):
            callbacks = await sandbox.callbacks()
            assert callbacks["states"] == {"delivered": len(callbacks["records"])}
    # The two sandboxes draw the same order ids (same seed): each stays in its own account.
    expected = {*((A.user_id, o) for o in a_orders), *((B.user_id, o) for o in b_orders)}
    inbox = await fetch(db, "SELECT account_id, order_id FROM webhook_inbox")
    assert {(r["account_id"], r["order_id"]) for r in inbox} == expected
    orders = await fetch(db, "SELECT account_id, order_id FROM orders")
    assert {(r["account_id"], r["order_id"]) for r in orders} == expected

    # A callback for A (A's access key and user-id) signed with B's secret.
    forged = signed_headers(Credentials(A.access_key, B.access_secret, A.user_id))
    body = (
        b'{"messageType": "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE", "messagePlatform": 0,'
        b' "timestamp": "1764000000000", "messageBody": {"salesOrderId": "forged-1"}}'
    )
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.post(
            accounts.stack.webhook_url,
            content=body,
            headers={**forged, "content-type": "application/json"},
        )
        assert answer.status_code == 401, answer.text
        # Sent to A's token URL with B's headers: the headers name another account.
        crossed = signed_headers(B)
        answer = await http.post(
            f"{accounts.stack.webhook_url}/{TOKEN_A}",
            content=body,
            headers={**crossed, "content-type": "application/json"},
        )
        assert answer.status_code == 401, answer.text
        assert answer.json() == {"error": "account_mismatch"}
    assert await fetch(db, "SELECT 1 FROM webhook_inbox WHERE order_id = 'forged-1'") == []


async def test_a_backfill_of_one_account_leaves_the_other_alone(accounts: Accounts) -> None:
    db = accounts.stack.database_url
    async with SandboxRemote(accounts.url_a) as sa, SandboxRemote(accounts.url_b) as sb:
        b_order = (await sb.create_order("taobao", LINES))["order_id"]
        await wait_status(db, B.user_id, b_order, "pending_payment")
        # A's callbacks are lost: only the backfill can bring its orders in.
        await sa.configure_delivery(drop=1.0)
        a_orders = [(await sa.create_order(p, LINES))["order_id"] for p in ("taobao", "1688")]
        before_b = await fetch(db, "SELECT order_id, last_synced_at FROM orders")
        await sb.reset_calls()
        since = (datetime.now(ZoneInfo("Asia/Shanghai")) - timedelta(days=1)).date()
        code, output = await accounts.command(
            "backfill", "--account", "shop-a", "--since", since.isoformat()
        )
        assert code == 0, output
        for order_id in a_orders:
            assert await ledger_status(db, A.user_id, order_id) == "pending_payment", output
        calls_b = await sb.calls()
    assert sum(calls_b.values()) == 0, calls_b  # not one call to B's PandaPon
    assert (
        await fetch(
            db, "SELECT order_id, last_synced_at FROM orders WHERE account_id = $1", B.user_id
        )
        == before_b
    )
    runs = await fetch(db, "SELECT DISTINCT account_id FROM backfill_runs")
    assert [r["account_id"] for r in runs] == [A.user_id]
    # An unknown account is one line and exit 2, nothing run.
    code, output = await accounts.command(
        "backfill", "--account", "shop-z", "--since", "2026-01-01"
    )
    assert code == 2
    assert output.strip().count("\n") == 0, output
    assert "no account 'shop-z'" in output


async def test_a_429_storm_on_one_account_leaves_the_others_freshness(
    accounts: Accounts, clean_redis: str
) -> None:
    db = accounts.stack.database_url
    async with SandboxRemote(accounts.url_a) as sa, SandboxRemote(accounts.url_b) as sb:
        calm = await paid_latencies(sb, db, B.user_id)
        # Every call of A's answered 429 with a long Retry-After: A's limit is account-wide
        # at once, and A's reconciles keep coming (two callbacks per order).
        await sa.set_faults({"*": {"rate_limit": 1.0, "retry_after_s": 20}})
        for _ in range(12):
            order = await sa.create_order("taobao", LINES)
            await sa.pay("taobao", order["order_id"])
        await wait_for_a_pause(clean_redis)
        storm = await paid_latencies(sb, db, B.user_id)
        paused_still = await a_paused_for(clean_redis)
        limited = (await sa.outcomes()).get("taobao_order_detail", {}).get("rate_limited", 0)
    calm_p95, storm_p95 = p95(calm), p95(storm)
    print(
        f"B callback->ledger latency: calm p50 {statistics.median(calm):.3f} s "
        f"p95 {calm_p95:.3f} s; during A's 429 storm p50 {statistics.median(storm):.3f} s "
        f"p95 {storm_p95:.3f} s (A's 429s: {limited}, A still paused {paused_still:.1f} s)"
    )
    assert limited >= 3
    assert storm_p95 < max(STORM_BOUND_S, STORM_FACTOR * calm_p95), (calm, storm)
    # A stayed limited the whole time B was measured: the storm was real.
    assert paused_still > 0
    # B's bucket never paused.
    client = aioredis.Redis.from_url(clean_redis)
    try:
        assert await client.hget(f"{DEFAULT_KEY}:shop-b", "blocked_until") is None
    finally:
        await client.aclose()


async def a_paused_for(redis_url: str) -> float:
    """Seconds A's bucket still blocks every call (0 when it does not)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        blocked = await client.hget(f"{DEFAULT_KEY}:shop-a", "blocked_until")
        seconds, micros = await client.time()
    finally:
        await client.aclose()
    if blocked is None:
        return 0.0
    return max(0.0, float(blocked) - (seconds + micros / 1e6))


async def wait_for_a_pause(redis_url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while await a_paused_for(redis_url) <= 0:
        assert time.monotonic() < deadline, "A's account-wide pause never came"
        await asyncio.sleep(0.05)
