"""One sandbox process serving two PandaPon accounts (``PANDASYNC_SANDBOX_ACCOUNTS``), over real
HTTP: each account's world, keys, faults and callbacks are its own; the one account of the
credentials settings behaves as before; and ``pandasync dev --demo`` runs two demo accounts."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.config import ConfigError, Settings
from service.domain import OrderStatus, Platform
from service.pandapon.client import PandaPonClient, make_http_client
from service.pandapon.errors import AuthError, UpstreamRateLimited, UpstreamRejected
from service.pandapon.signer import Credentials, check_signature, signed_headers
from service.sandbox.app import create_sandbox_app
from service.sandbox.remote import SandboxControlError, SandboxRemote
from service.sandbox.settings import (
    DEMO_B_USER_ID,
    DEV_ACCESS_KEY,
    DEV_USER_ID,
    SandboxAccount,
    SandboxSettings,
    load_sandbox_settings,
)
from tests.support.servers import SandboxServer, sandbox_test_settings, serve_in_thread
from tests.support.stack import PANDASYNC

pytest_plugins = ["tests.support.sandbox"]

TB, AL = Platform.TAOBAO, Platform.ALIBABA_1688
TOKEN_A = "token-of-shop-a-0123456789"
TOKEN_B = "token-of-shop-b-0123456789"
A = SandboxAccount(user_id="2200001", access_key="ak-shop-a", access_secret=SecretStr("secret-a"))
B = SandboxAccount(user_id="2200002", access_key="ak-shop-b", access_secret=SecretStr("secret-b"))


# --- a webhook receiver: /webhooks/pandapon/{token}, as the web role takes them ------------------


@dataclass
class Callback:
    token: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str = ""
    got: list[Callback] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            callback = Callback(
                request.path_params["token"], dict(request.headers), await request.body()
            )
            with self.lock:
                self.got.append(callback)
            return Response(status_code=200)

        return Starlette(routes=[Route("/webhooks/pandapon/{token}", receive, methods=["POST"])])

    def callbacks(self, token: str) -> list[Callback]:
        with self.lock:
            return [c for c in self.got if c.token == token]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    with serve_in_thread(receiver.app()) as url:
        receiver.url = url
        yield receiver


@pytest.fixture
def sandbox_settings(receiver: Receiver) -> SandboxSettings:
    """Two accounts, each with its callback URL (the token URL of the receiver)."""
    hook = f"{receiver.url}/webhooks/pandapon"
    return sandbox_test_settings(
        accounts=[
            A.model_copy(update={"callback_url": f"{hook}/{TOKEN_A}"}),
            B.model_copy(update={"callback_url": f"{hook}/{TOKEN_B}"}),
        ]
    )


def account_settings(server: SandboxServer, account: SandboxAccount, **overrides: Any) -> Settings:
    """Service Settings whose PandaPon is this sandbox, signing as ``account``."""
    values: dict[str, Any] = {
        "access_key": account.access_key,
        "access_secret": account.access_secret.get_secret_value(),
        "user_id": account.user_id,
        **overrides,
    }
    return server.service_settings(**values)


@asynccontextmanager
async def client_of(
    server: SandboxServer, account: SandboxAccount, **overrides: Any
) -> AsyncIterator[PandaPonClient]:
    settings = account_settings(server, account, **overrides)
    async with make_http_client(settings) as http:
        yield PandaPonClient(settings, http)


def window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(hours=1)


# --- worlds ---------------------------------------------------------------------------------------


async def test_each_account_sees_only_its_own_orders(sandbox_server: SandboxServer) -> None:
    remote_a = sandbox_server.remote.for_account(A.user_id)
    remote_b = sandbox_server.remote.for_account(B.user_id)
    order_a = (await remote_a.create_order(TB))["order_id"]
    order_b = (await remote_b.create_order(TB))["order_id"]
    await remote_b.pay(TB, order_b)
    assert order_a != order_b

    async with client_of(sandbox_server, A) as client_a, client_of(sandbox_server, B) as client_b:
        assert (await client_a.order_detail(TB, order_a)).status is OrderStatus.PENDING_PAYMENT
        assert (await client_b.order_detail(TB, order_b)).status is OrderStatus.PAID
        with pytest.raises(UpstreamRejected):
            await client_a.order_detail(TB, order_b)
        with pytest.raises(UpstreamRejected):
            await client_b.order_detail(TB, order_a)
        page_a = await client_a.order_page(TB, 1, 50, *window())
        page_b = await client_b.order_page(TB, 1, 50, *window())
    assert [o.order_id for o in page_a.orders] == [order_a]
    assert [o.order_id for o in page_b.orders] == [order_b]

    # The control API says the same, per account; without ``account`` it is the first one.
    assert [o["order_id"] for o in await remote_a.orders()] == [order_a]
    assert [o["order_id"] for o in await remote_b.orders()] == [order_b]
    assert [o["order_id"] for o in await sandbox_server.remote.orders()] == [order_a]
    with pytest.raises(SandboxControlError) as missing:
        await remote_a.order(TB, order_b)
    assert missing.value.status == 404
    summary = {a["user_id"]: a for a in await sandbox_server.remote.accounts()}
    assert list(summary) == [A.user_id, B.user_id]
    assert (summary[A.user_id]["orders"], summary[B.user_id]["orders"]) == (1, 1)
    assert summary[B.user_id]["access_key"] == B.access_key
    assert "secret" not in str(summary)


def _as(account: SandboxAccount, **mixed: str) -> dict[str, str]:
    """The five headers for ``account``, with some parts taken from elsewhere."""
    values = {
        "access_key": account.access_key,
        "access_secret": account.access_secret.get_secret_value(),
        "user_id": account.user_id,
        **mixed,
    }
    return signed_headers(Credentials(**values))


@pytest.mark.parametrize(
    ("mix", "status", "reason"),
    [
        # The headers are signed when the test runs (a timestamp made at collection would be
        # stale by then): (account, the parts taken from elsewhere).
        # A's key, signed with B's secret: the gateway checks A's secret
        ((A, {"access_secret": B.access_secret.get_secret_value()}), 401, "signature mismatch"),
        # A's key and secret, B's user-id: not A's to ask for
        ((A, {"user_id": B.user_id}), 403, "user-id has no permission"),
        # B's key with A's secret: B's secret is checked
        ((B, {"access_secret": A.access_secret.get_secret_value()}), 401, "signature mismatch"),
        # a key no account has
        ((A, {"access_key": "ak-nobody"}), 401, "invalid access-key"),
    ],
    ids=["a-key-b-secret", "a-key-b-user", "b-key-a-secret", "unknown-key"],
)
async def test_a_request_mixing_two_accounts_is_refused(
    sandbox_server: SandboxServer,
    mix: tuple[SandboxAccount, dict[str, str]],
    status: int,
    reason: str,
) -> None:
    remote_b = sandbox_server.remote.for_account(B.user_id)
    order_b = (await remote_b.create_order(TB))["order_id"]
    url = f"{sandbox_server.url}/open/order/detail/get"
    account, mixed = mix
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(url, params={"orderId": order_b}, headers=_as(account, **mixed))
    assert response.status_code == status, response.text
    body = response.json()
    assert (body["code"], body["msg"], body["data"]) == (status, reason, None)


async def test_the_real_client_with_crossed_credentials_gets_an_auth_error(
    sandbox_server: SandboxServer,
) -> None:
    crossed = {"access_secret": B.access_secret.get_secret_value()}
    async with client_of(sandbox_server, A, **crossed) as client:
        with pytest.raises(AuthError) as caught:
            await client.order_detail(TB, "1")
    assert (caught.value.http_status, caught.value.msg) == (401, "signature mismatch")
    # Counted for the account the access-key names, not for the other one.
    outcomes_a = await sandbox_server.remote.for_account(A.user_id).outcomes()
    outcomes_b = await sandbox_server.remote.for_account(B.user_id).outcomes()
    assert outcomes_a["taobao_order_detail"] == {"auth_rejected": 1}
    assert outcomes_b["taobao_order_detail"] == {}


# --- callbacks ------------------------------------------------------------------------------------


async def test_callbacks_go_to_each_accounts_url_signed_with_its_secret(
    sandbox_server: SandboxServer, receiver: Receiver
) -> None:
    remote_a = sandbox_server.remote.for_account(A.user_id)
    remote_b = sandbox_server.remote.for_account(B.user_id)
    order_a = (await remote_a.create_order(AL))["order_id"]
    await remote_a.pay(AL, order_a)
    order_b = (await remote_b.create_order(TB))["order_id"]
    drained = await sandbox_server.remote.drain()
    assert drained["drained"] is True
    assert drained["states"] == {"delivered": 3}

    for account, token, order_id, count in ((A, TOKEN_A, order_a, 2), (B, TOKEN_B, order_b, 1)):
        got = receiver.callbacks(token)
        assert len(got) == count, [c.token for c in receiver.got]
        other = B if account is A else A
        for callback in got:
            assert order_id.encode() in callback.body
            assert callback.headers["access-key"] == account.access_key
            assert callback.headers["user-id"] == account.user_id
            own = _check(callback, account)
            assert own.reason is None, own
            # Not the other account's signature: its key and its secret both differ.
            assert _check(callback, other).reason == "wrong_access_key"
            crossed = _check(callback, other, access_key=account.access_key)
            assert crossed.reason == "bad_signature"

    # The delivery log says whose each message is, and can be read per account.
    records = (await sandbox_server.remote.callbacks())["records"]
    assert [(r["account"], r["order_id"]) for r in records] == [
        (A.user_id, order_a),
        (A.user_id, order_a),
        (B.user_id, order_b),
    ]
    assert len({r["id"] for r in records}) == 3
    only_b = await remote_b.callbacks()
    assert [r["order_id"] for r in only_b["records"]] == [order_b]
    assert only_b["states"] == {"delivered": 1}
    delivery_b = await remote_b.configure_delivery()
    assert delivery_b["webhook_url"] == f"{receiver.url}/webhooks/pandapon/{TOKEN_B}"


def _check(callback: Callback, account: SandboxAccount, **instead: str) -> Any:
    return check_signature(
        callback.headers,
        access_key=instead.get("access_key", account.access_key),
        access_secret=account.access_secret.get_secret_value(),
        unit="ms",
        tolerance_s=600,
        now=time.time(),
    )


async def test_delivery_changed_for_one_account_leaves_the_other_as_it_was(
    sandbox_server: SandboxServer, receiver: Receiver
) -> None:
    remote_a = sandbox_server.remote.for_account(A.user_id)
    remote_b = sandbox_server.remote.for_account(B.user_id)
    await remote_a.configure_delivery(drop=1.0)
    await remote_a.create_order(TB)
    order_b = (await remote_b.create_order(TB))["order_id"]
    await sandbox_server.remote.drain()
    assert receiver.callbacks(TOKEN_A) == []
    assert [order_b.encode() in c.body for c in receiver.callbacks(TOKEN_B)] == [True]
    assert (await remote_a.callbacks())["states"] == {"dropped": 1}
    assert (await remote_b.configure_delivery())["drop"] == 0.0


# --- faults, payments, counts ---------------------------------------------------------------------


async def test_a_429_storm_on_one_account_leaves_the_other_alone(
    sandbox_server: SandboxServer,
) -> None:
    remote_a = sandbox_server.remote.for_account(A.user_id)
    remote_b = sandbox_server.remote.for_account(B.user_id)
    order_a = (await remote_a.create_order(AL))["order_id"]
    order_b = (await remote_b.create_order(AL))["order_id"]
    await remote_a.set_faults({"*": {"rate_limit": 1.0, "retry_after_s": 2}})

    async with client_of(sandbox_server, A) as client_a, client_of(sandbox_server, B) as client_b:
        for _ in range(5):
            with pytest.raises(UpstreamRateLimited):
                await client_a.order_detail(AL, order_a)
            assert (await client_b.order_detail(AL, order_b)).order_id == order_b

    assert (await remote_b.outcomes())["alibaba_order_detail"] == {"ok": 5}
    assert (await remote_a.outcomes())["alibaba_order_detail"] == {"rate_limited": 5}
    # Without ``account``: every account's counts added up.
    assert (await sandbox_server.remote.outcomes())["alibaba_order_detail"] == {
        "ok": 5,
        "rate_limited": 5,
    }
    assert (await sandbox_server.remote.calls())["alibaba_order_detail"] == 10
    # The faults are A's only.
    faults_a = await _control(sandbox_server, "GET", "/faults", account=A.user_id)
    faults_b = await _control(sandbox_server, "GET", "/faults", account=B.user_id)
    assert set(faults_a["faults"]) == {"*"}
    assert faults_b == {"faults": {}}
    # Resetting A's counts leaves B's.
    await remote_a.reset_calls()
    assert (await sandbox_server.remote.outcomes())["alibaba_order_detail"] == {"ok": 5}


async def test_payment_behaviour_is_per_account(sandbox_server: SandboxServer) -> None:
    await _control(sandbox_server, "PUT", "/payments", {"mode": "fail"}, account=A.user_id)
    paid_b = await _control(sandbox_server, "GET", "/payments", account=B.user_id)
    assert paid_b["payments"]["mode"] == "succeed"
    default = await _control(sandbox_server, "GET", "/payments")
    assert default["payments"]["mode"] == "fail"  # the first account


async def test_a_scenario_and_a_reset_touch_one_account_only(
    sandbox_server: SandboxServer,
) -> None:
    remote_a = sandbox_server.remote.for_account(A.user_id)
    remote_b = sandbox_server.remote.for_account(B.user_id)
    await remote_a.scenario(orders=3, steps=2)
    await remote_b.scenario(orders=2, steps=2)
    ids_a = {o["order_id"] for o in await remote_a.orders()}
    ids_b = {o["order_id"] for o in await remote_b.orders()}
    assert (len(ids_a), len(ids_b)) == (3, 2)
    assert ids_a.isdisjoint(ids_b)  # each account's world draws its own ids
    assert (await _control(sandbox_server, "GET", "/health"))["orders"] == 5
    await _control(sandbox_server, "POST", "/reset", account=A.user_id)
    assert await remote_a.orders() == []
    assert len(await remote_b.orders()) == 2
    await sandbox_server.remote.reset()
    assert await remote_b.orders() == []


async def test_an_unknown_account_and_a_host_wide_call_with_one_are_refused(
    sandbox_server: SandboxServer,
) -> None:
    async with httpx.AsyncClient(base_url=sandbox_server.url, trust_env=False) as http:
        unknown = await http.get("/_sandbox/orders", params={"account": "9999"})
        assert unknown.status_code == 404
        assert unknown.json()["error"] == (
            f"no account with user_id '9999' (accounts: {A.user_id}, {B.user_id})"
        )
        for path in ("/_sandbox/calls", "/_sandbox/callbacks", "/_sandbox/faults"):
            response = await http.get(path, params={"account": "9999"})
            assert response.status_code == 404, path
        upstream = await http.patch(
            "/_sandbox/upstream", params={"account": A.user_id}, json={"timestamp_unit": "s"}
        )
        assert upstream.status_code == 400
        assert "shared by every account" in upstream.json()["error"]
        assert (await http.get("/_sandbox/upstream")).json()["upstream"]["timestamp_unit"] is None


@pytest.mark.parametrize(
    ("accounts", "message"),
    [
        ([A, A.model_copy(update={"access_key": "other"})], "same user_id: 2200001"),
        ([A, B.model_copy(update={"access_key": A.access_key})], "same access_key: ak-shop-a"),
        ([{"user_id": "1", "access_key": "k", "access_secret": ""}], "must not be empty"),
        (
            [{"user_id": "1", "access_key": "k", "access_secret": "s", "callback_url": "x"}],
            "http:// or https://",
        ),
    ],
)
def test_bad_accounts_are_refused_naming_the_setting(accounts: list[Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_sandbox_settings(accounts=accounts)
    assert "PANDASYNC_SANDBOX_ACCOUNTS" in str(caught.value)
    assert message in str(caught.value)
    assert "secret-a" not in str(caught.value)


def test_accounts_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PANDASYNC_SANDBOX_ACCOUNTS",
        '[{"user_id": "1", "access_key": "k1", "access_secret": "s1"},'
        ' {"user_id": "2", "access_key": "k2", "access_secret": "s2",'
        ' "callback_url": "http://127.0.0.1:9/webhooks/pandapon/t"}]',
    )
    settings = load_sandbox_settings()
    assert [a.user_id for a in settings.account_list()] == ["1", "2"]
    assert settings.account_list()[1].callback_url == "http://127.0.0.1:9/webhooks/pandapon/t"


async def _control(
    server: SandboxServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    account: str | None = None,
) -> Any:
    params = {"account": account} if account else None
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.request(
            method, f"{server.url}/_sandbox{path}", json=body, params=params
        )
    response.raise_for_status()
    return response.json()


# --- one account, as before -----------------------------------------------------------------------


async def test_without_accounts_the_one_account_of_the_credentials_is_served() -> None:
    settings = sandbox_test_settings()
    assert settings.accounts == []
    with serve_in_thread(create_sandbox_app(settings)) as url:
        async with SandboxRemote(url) as remote:
            server = SandboxServer(url=url, settings=settings, remote=remote)
            (only,) = await remote.accounts()
            assert (only["user_id"], only["access_key"]) == (DEV_USER_ID, DEV_ACCESS_KEY)
            order_id = (await remote.create_order(TB))["order_id"]
            # Addressing it by its user-id is the same as not naming it.
            assert await remote.for_account(DEV_USER_ID).orders() == await remote.orders()
            async with make_http_client(server.service_settings()) as http:
                client = PandaPonClient(server.service_settings(), http)
                assert (await client.order_detail(TB, order_id)).order_id == order_id
            assert (await remote.outcomes())["taobao_order_detail"] == {"ok": 1}


async def test_the_first_account_runs_as_the_one_account_did() -> None:
    """Same seed, same ids: the first account of several is the one account of before."""
    single = sandbox_test_settings(scenario_orders=3)
    several = sandbox_test_settings(scenario_orders=3, accounts=[single.account_list()[0], B])
    ids: list[list[str]] = []
    for settings in (single, several):
        with serve_in_thread(create_sandbox_app(settings)) as url:
            async with SandboxRemote(url) as remote:
                ids.append([o["order_id"] for o in await remote.orders()])
                if settings is several:
                    other = await remote.for_account(B.user_id).orders()
                    assert len(other) == 3
                    assert {o["order_id"] for o in other}.isdisjoint(ids[0])
    assert len(ids[0]) == 3
    assert ids[0] == ids[1]


# --- pandasync dev --demo -------------------------------------------------------------------------

BANNER = "pandasync is running"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.e2e
def test_dev_demo_runs_two_accounts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    web_port, sandbox_port = _free_port(), _free_port()
    env["PANDASYNC_PORT"] = str(web_port)
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PANDASYNC, "dev", "--demo", "--sandbox-port", str(sandbox_port)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while BANNER not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")[-6000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-6000:]
            time.sleep(0.2)
        output = log.read_text(errors="replace")
        banner = output[output.index(BANNER) :]

        # The accounts file: two accounts, the public demo keys inline, a token each.
        path = workdir / ".pandasync" / "dev-accounts.toml"
        accounts = tomllib.loads(path.read_text())["accounts"]
        assert len(accounts) == 2
        tables = list(accounts.values())
        assert [t["user_id"] for t in tables] == [DEV_USER_ID, DEMO_B_USER_ID]
        for table in tables:
            assert set(table) >= {"user_id", "access_key", "access_secret", "webhook_token"}
            assert table["api_base_url"] == f"http://127.0.0.1:{sandbox_port}"
            assert len(table["webhook_token"]) >= 16
        tokens = [t["webhook_token"] for t in tables]
        assert len(set(tokens)) == 2

        # The banner shows each account's token URL, and SQL grouping the ledger by account.
        web = f"http://127.0.0.1:{web_port}"
        for name, table in accounts.items():
            line = f"{web}/webhooks/pandapon/{table['webhook_token']}"
            assert re.search(rf"^  .*\b{re.escape(name)} \(.*{re.escape(line)}$", banner, re.M)
        by_account = re.search(r"^    (\S+/psql .*GROUP BY account_id.*)$", banner, re.M)
        assert by_account, banner

        # The sandbox serves both, each calling back at its own token URL.
        sandbox = httpx.get(f"http://127.0.0.1:{sandbox_port}/_sandbox", timeout=10).json()
        served = [(a["user_id"], a["callback_url"]) for a in sandbox["accounts"]]
        assert served == [
            (t["user_id"], f"{web}/webhooks/pandapon/{t['webhook_token']}") for t in tables
        ]

        # End to end: the demo's orders of both accounts reach the ledger, each under its own
        # account_id, through each account's callbacks and client.
        psql = shlex.split(by_account.group(1))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ran = subprocess.run(psql, capture_output=True, text=True, timeout=30)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            seen = {line.split("|")[0].strip() for line in ran.stdout.splitlines() if "|" in line}
            if {DEV_USER_ID, DEMO_B_USER_ID} <= seen:
                break
            assert time.monotonic() < deadline, ran.stdout + log.read_text(errors="replace")[-3000:]
            time.sleep(1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert process.returncode == 0, log.read_text(errors="replace")[-6000:]


def test_accounts_that_are_not_json_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANDASYNC_SANDBOX_ACCOUNTS", "[{user_id: 1}")
    with pytest.raises(ConfigError) as caught:
        load_sandbox_settings()
    assert str(caught.value) == (
        "invalid sandbox settings:\n  PANDASYNC_SANDBOX_ACCOUNTS: not valid JSON"
    )
