"""What an operator meets before the service ever ran ends in one line saying what to do, exit
status 1, never a traceback; PANDASYNC_LOG_LEVEL=DEBUG shows the traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from service.db import asyncpg_dsn, with_database
from tests.support.stack import PANDASYNC


@pytest.fixture
async def empty_database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A database with no pandasync tables (never migrated)."""
    name = f"pandasync_empty_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(with_database(postgres_server_url, "postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(postgres_server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def pandasync(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pandasync *args`` with only the ``env`` settings (none from the environment)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, *args],
        env={**clean, **env},
        cwd=tmp_path,  # no .env of the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )


async def status(tmp_path: Path, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await pandasync(tmp_path, "status", PANDASYNC_DATABASE_URL=database_url, **env)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_status_before_migrate_says_to_migrate(
    tmp_path: Path, empty_database_url: str
) -> None:
    line = one_line(await status(tmp_path, empty_database_url))
    assert (
        line
        == "pandasync status: the database has no pandasync tables yet: run `pandasync migrate`"
    )


async def test_a_database_that_does_not_exist_is_named_as_such(
    tmp_path: Path, postgres_server_url: str
) -> None:
    missing = with_database(postgres_server_url, f"pandasync_missing_{uuid.uuid4().hex[:8]}")
    line = one_line(await status(tmp_path, missing))
    assert "the database does not exist" in line
    assert "PANDASYNC_DATABASE_URL" in line


async def test_an_unreachable_database_says_what_to_check(tmp_path: Path) -> None:
    line = one_line(await status(tmp_path, "postgresql+asyncpg://postgres@127.0.0.1:1/pandasync"))
    assert line.startswith("pandasync status: cannot connect (")
    assert "PANDASYNC_DATABASE_URL" in line


async def test_debug_shows_the_traceback(tmp_path: Path, empty_database_url: str) -> None:
    result = await status(tmp_path, empty_database_url, PANDASYNC_LOG_LEVEL="DEBUG")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("role", ["serve", "worker", "scheduler"])
async def test_a_role_does_not_start_on_a_wrong_endpoint_override(
    tmp_path: Path, postgres_server_url: str, role: str
) -> None:
    result = await pandasync(
        tmp_path,
        role,
        PANDASYNC_DATABASE_URL=postgres_server_url,
        PANDASYNC_BROKER_URL="redis://127.0.0.1:6379/0",
        PANDASYNC_ENDPOINT_OVERRIDES='{"taobao_order_detial": {"path": "/x"}}',
    )
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("pandasync: PANDASYNC_ENDPOINT_OVERRIDES: unknown endpoint")
    assert "taobao_order_detial" in line
