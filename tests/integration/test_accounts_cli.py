"""The commands with several accounts: a bad accounts file stops every command in lines naming
the file, the account and the field (exit 2, no secret shown); a command about one order needs
--account when several are configured; ``status`` shows each account, and ``--account``
narrows it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import asyncpg
import pytest

from service.db import asyncpg_dsn
from tests.support.stack import PANDASYNC

SECRET_A = "cli-secret-of-shop-a-0123"
ACCOUNTS = f"""
[accounts.shop-a]
user_id = "2200001"
access_key = "ak-a"
access_secret = "{SECRET_A}"

[accounts.shop-b]
user_id = "2200002"
access_key = "ak-b"
access_secret_env = "CLI_SHOP_B_SECRET"
"""


async def pandasync(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pandasync *args`` with only the ``env`` settings (none from the environment)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, *args],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def accounts_file(tmp_path: Path, text: str = ACCOUNTS) -> str:
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    return str(path)


def refused(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET_A not in result.stdout + result.stderr
    return result.stderr.strip().splitlines()


async def test_a_bad_file_stops_every_command_naming_file_account_and_field(
    tmp_path: Path,
) -> None:
    path = accounts_file(tmp_path, ACCOUNTS.replace('access_key = "ak-b"', 'access_key = "ak-a"'))
    for command in (["status"], ["worker"], ["serve"], ["scheduler"]):
        lines = refused(await pandasync(tmp_path, *command, PANDASYNC_ACCOUNTS_FILE=path))
        shown = "\n".join(lines)
        assert f"{path}: [accounts.shop-b] access_key: the same as account shop-a's" in shown
        # B's secret variable is unset too: a line of its own.
        unset = "[accounts.shop-b] access_secret_env: the environment variable"
        assert any(unset in line for line in lines)


async def test_the_file_and_single_account_settings_together_are_refused(tmp_path: Path) -> None:
    result = await pandasync(
        tmp_path,
        "status",
        PANDASYNC_ACCOUNTS_FILE=accounts_file(tmp_path),
        PANDASYNC_USER_ID="2200001",
        CLI_SHOP_B_SECRET="b-secret-0123456789",
    )
    text = "\n".join(refused(result))
    assert "PANDASYNC_ACCOUNTS_FILE and PANDASYNC_USER_ID are both set" in text


@pytest.mark.parametrize(
    "args",
    [
        ("resync", "taobao", "T1"),
        ("pay",),
        ("pay", "--order", "T1"),
        ("doctor", "--listen", "1"),
    ],
)
async def test_a_command_about_one_account_needs_it_named(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    env = {
        "PANDASYNC_ACCOUNTS_FILE": accounts_file(tmp_path),
        "CLI_SHOP_B_SECRET": "b-secret-0123456789",
        "PANDASYNC_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
    }
    (line,) = refused(await pandasync(tmp_path, *args, **env))
    assert "2 accounts are configured (shop-a, shop-b): name one with --account" in line
    (line,) = refused(await pandasync(tmp_path, *args, "--account", "shop-z", **env))
    assert "no account 'shop-z' here" in line


async def test_status_shows_each_account_and_narrows_to_one(
    tmp_path: Path, fresh_database_url: str
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        await conn.execute(
            "INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error) "
            "VALUES ('2200002', 'taobao', 'T9', 'permanent', 'webhook', 'AuthError: x')"
        )
    finally:
        await conn.close()
    env = {
        "PANDASYNC_ACCOUNTS_FILE": accounts_file(tmp_path),
        "CLI_SHOP_B_SECRET": "b-secret-0123456789",
        "PANDASYNC_DATABASE_URL": fresh_database_url,
    }
    every = await pandasync(tmp_path, "status", "--json", **env)
    document = json.loads(every.stdout)
    assert [(a["name"], a["account_id"], a["open_failures"]) for a in document["accounts"]] == [
        ("shop-a", "2200001", 0),
        ("shop-b", "2200002", 1),
    ]
    assert document["open_failures"] == 1
    only_a = json.loads(
        (await pandasync(tmp_path, "status", "--json", "--account", "shop-a", **env)).stdout
    )
    assert only_a["open_failures"] == 0
    assert [a["name"] for a in only_a["accounts"]] == ["shop-a"]
    text = await pandasync(tmp_path, "status", **env)
    assert "account shop-b (2200002): backlog 0, oldest -, open failures 1" in text.stdout
    by_user_id = await pandasync(tmp_path, "status", "--account", "2200002", **env)
    assert "account shop-b (2200002)" in by_user_id.stdout
    assert "shop-a" not in by_user_id.stdout
