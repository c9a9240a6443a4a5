"""Several accounts in one receiver (PANDASYNC_ACCOUNTS_FILE), over real HTTP on a database of
its own: a token names its account, on the bare path the access-key (or user-id) header does,
a signature is checked with that account's secret, and every inbox row carries its account."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.pandapon.signer import Credentials
from tests.support.webhook_checks import count, fetch, sample
from tests.support.webhook_requests import (
    JSON_TYPE,
    WEBHOOK,
    encode,
    receiver_settings,
    signed,
    taobao_status,
)
from tests.support.webhook_server import serving

A = Credentials("ak-account-a", "secret-of-account-a-0123456789", "2200001")
B = Credentials("ak-account-b", "secret-of-account-b-9876543210", "2200002")
TOKEN_A = "token-of-a-0123456789abcdef"
TOKEN_A_OLD = "old-token-of-a-0123456789ab"
TOKEN_B = "token-of-b-0123456789abcdef"
ACCOUNTS = f"""
[accounts.shop-a]
user_id = "{A.user_id}"
access_key = "{A.access_key}"
access_secret = "{A.access_secret}"
webhook_token = "{TOKEN_A}"
previous_webhook_tokens = ["{TOKEN_A_OLD}"]

[accounts.shop-b]
user_id = "{B.user_id}"
access_key = "{B.access_key}"
access_secret_env = "TEST_SHOP_B_SECRET"
webhook_token = "{TOKEN_B}"
"""


@dataclass
class Running:
    client: httpx.AsyncClient
    database_url: str

    async def post(self, headers: dict[str, str], path: str = WEBHOOK) -> httpx.Response:
        return await self.client.post(path, content=encode(taobao_status()), headers=headers)

    async def accounts(self) -> list[str]:
        rows = await fetch(self.database_url, "SELECT account_id FROM webhook_inbox ORDER BY id")
        return [row["account_id"] for row in rows]


@asynccontextmanager
async def started(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> AsyncIterator[Running]:
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    monkeypatch.setenv("TEST_SHOP_B_SECRET", B.access_secret)
    settings = receiver_settings(
        database_url,
        access_key=None,
        access_secret=None,
        user_id=None,
        webhook_token=None,
        accounts_file=path,
        **overrides,
    )
    app = create_app(settings)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Running(client, database_url)


@pytest.fixture
async def auto(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Running]:
    async with started(fresh_database_url, tmp_path, monkeypatch, webhook_auth="auto") as running:
        yield running


def accepted(account: str) -> float:
    return sample("pandasync_webhook_accepted_total", account=account, kind="status")


async def test_each_token_lands_in_its_own_account(auto: Running) -> None:
    before = {name: accepted(name) for name in ("shop-a", "shop-b")}
    assert (await auto.post(JSON_TYPE, f"{WEBHOOK}/{TOKEN_A}")).status_code == 200
    assert (await auto.post(JSON_TYPE, f"{WEBHOOK}/{TOKEN_B}")).status_code == 200
    # A previous token (a rotation under way) still lands in its account.
    assert (await auto.post(JSON_TYPE, f"{WEBHOOK}/{TOKEN_A_OLD}")).status_code == 200
    assert await auto.accounts() == [A.user_id, B.user_id, A.user_id]
    # Counted by the account's name, as the upstream metrics are.
    assert {name: accepted(name) - before[name] for name in before} == {"shop-a": 2, "shop-b": 1}


async def test_an_unknown_token_is_refused(auto: Running) -> None:
    answer = await auto.post(JSON_TYPE, f"{WEBHOOK}/not-a-token-of-anyone-0123")
    assert answer.status_code == 401
    assert answer.json() == {"error": "wrong_token"}
    assert await count(auto.database_url, "webhook_inbox") == 0


async def test_on_the_bare_path_the_access_key_names_the_account(auto: Running) -> None:
    assert (await auto.post(signed(credentials=B))).status_code == 200
    assert (await auto.post(signed(credentials=A))).status_code == 200
    assert await auto.accounts() == [B.user_id, A.user_id]
    rows = await fetch(auto.database_url, "SELECT signature_state::text AS s FROM webhook_inbox")
    assert {row["s"] for row in rows} == {"valid"}


async def test_signed_with_a_secret_but_claiming_b_is_refused(auto: Running) -> None:
    # B's access key and user-id, A's secret: checked with B's secret, which it does not match.
    forged = signed(credentials=Credentials(B.access_key, A.access_secret, B.user_id))
    answer = await auto.post(forged)
    assert answer.status_code == 401
    assert answer.json() == {"error": "bad_signature"}
    # A's headers with B's user-id: the headers name two accounts.
    crossed = {**signed(credentials=A), "user-id": B.user_id}
    answer = await auto.post(crossed)
    assert answer.status_code == 401
    assert answer.json() == {"error": "account_mismatch"}
    assert await count(auto.database_url, "webhook_inbox") == 0
    assert await count(auto.database_url, "webhook_nonces") == 0


async def test_headers_naming_another_account_than_the_token_are_refused(auto: Running) -> None:
    answer = await auto.post(signed(credentials=B), f"{WEBHOOK}/{TOKEN_A}")
    assert answer.status_code == 401
    assert answer.json() == {"error": "account_mismatch"}
    # The token's own account's signature is checked and recorded, as in single-account auto.
    assert (await auto.post(signed(credentials=A), f"{WEBHOOK}/{TOKEN_A}")).status_code == 200
    rows = await fetch(
        auto.database_url, "SELECT account_id, signature_state::text AS s FROM webhook_inbox"
    )
    assert [(r["account_id"], r["s"]) for r in rows] == [(A.user_id, "valid")]


async def test_an_unknown_access_key_on_the_bare_path_is_refused(auto: Running) -> None:
    stranger = Credentials("ak-stranger", "whatever-secret-000000", "999")
    answer = await auto.post(signed(credentials=stranger))
    assert answer.status_code == 401
    assert answer.json() == {"error": "wrong_access_key"}
    unsigned = await auto.post(JSON_TYPE)
    assert unsigned.status_code == 401
    assert unsigned.json() == {"error": "missing_header"}


async def test_in_token_mode_the_bare_path_is_refused(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(fresh_database_url, tmp_path, monkeypatch, webhook_auth="token") as running:
        answer = await running.post(signed(credentials=A))
        assert answer.status_code == 401
        assert answer.json() == {"error": "missing_token"}
        assert (await running.post(JSON_TYPE, f"{WEBHOOK}/{TOKEN_B}")).status_code == 200
        assert await running.accounts() == [B.user_id]
