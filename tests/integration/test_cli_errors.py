"""What an operator meets before the service ever ran ends in one line saying what to do, exit
status 1, never a traceback; PANDASYNC_LOG_LEVEL=DEBUG shows the traceback. A port that is
taken (a role's metrics port, the web port, a second ``pandasync dev``) is one of them."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.cli.common import explain
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


# --- ports and a second `pandasync dev` ----------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on for the test's length."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield int(holder.getsockname()[1])


def no_traceback_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    line = one_line(result)
    for needle in needles:
        assert needle in line, line
    return line


async def test_a_taken_worker_metrics_port_is_one_line(
    tmp_path: Path, postgres_server_url: str, redis_url: str, taken_port: int
) -> None:
    result = await pandasync(
        tmp_path,
        "worker",
        PANDASYNC_DATABASE_URL=postgres_server_url,
        PANDASYNC_BROKER_URL=redis_url,
        PANDASYNC_WORKER_METRICS_PORT=str(taken_port),
    )
    line = no_traceback_one_line(
        result, f"port {taken_port} on 127.0.0.1 is already in use", "PANDASYNC_WORKER_METRICS_PORT"
    )
    assert line.startswith("pandasync worker: ")


async def test_a_taken_scheduler_metrics_port_is_one_line(
    tmp_path: Path, postgres_server_url: str, redis_url: str, taken_port: int
) -> None:
    result = await pandasync(
        tmp_path,
        "scheduler",
        PANDASYNC_DATABASE_URL=postgres_server_url,
        PANDASYNC_BROKER_URL=redis_url,
        PANDASYNC_SCHEDULER_METRICS_PORT=str(taken_port),
    )
    line = no_traceback_one_line(
        result,
        f"port {taken_port} on 127.0.0.1 is already in use",
        "PANDASYNC_SCHEDULER_METRICS_PORT",
    )
    assert line.startswith("pandasync scheduler: ")


async def test_a_taken_web_port_is_one_line(
    tmp_path: Path, postgres_server_url: str, taken_port: int
) -> None:
    result = await pandasync(
        tmp_path,
        "serve",
        PANDASYNC_DATABASE_URL=postgres_server_url,
        PANDASYNC_WEBHOOK_AUTH="token",
        PANDASYNC_WEBHOOK_TOKEN="t" * 32,
        PANDASYNC_PORT=str(taken_port),
    )
    no_traceback_one_line(result, f"port {taken_port} on 127.0.0.1", "PANDASYNC_PORT")


async def test_dev_on_a_taken_port_is_one_line_before_anything_starts(
    tmp_path: Path, taken_port: int
) -> None:
    result = await pandasync(tmp_path, "dev", PANDASYNC_PORT=str(taken_port))
    line = no_traceback_one_line(result, f"port {taken_port} on 127.0.0.1", "PANDASYNC_PORT")
    assert "another pandasync dev" in line
    # Nothing was started: no embedded database made, no migration run.
    assert not (tmp_path / ".pandasync" / "pgdata").exists()
    assert result.stdout == ""


async def test_dev_on_a_taken_sandbox_port_names_the_option(
    tmp_path: Path, taken_port: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as web:
        free = int(web.getsockname()[1])
    result = await pandasync(
        tmp_path, "dev", "--sandbox-port", str(taken_port), PANDASYNC_PORT=str(free)
    )
    no_traceback_one_line(result, f"port {taken_port}", "--sandbox-port")


async def test_a_second_dev_on_the_same_data_dir_is_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # What a running dev holds: the lock on DATA_DIR/dev.pid, with its pid inside.
    with (data_dir / "dev.pid").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        result = await pandasync(tmp_path, "dev", PANDASYNC_DATA_DIR=str(data_dir))
    line = no_traceback_one_line(
        result,
        f"another pandasync dev (pid {os.getpid()}) uses PANDASYNC_DATA_DIR={data_dir}",
        "set PANDASYNC_DATA_DIR",
    )
    assert line.startswith("pandasync dev: ")
    assert not (data_dir / "pgdata").exists()


# --- send-test-message when no worker runs -----------------------------------------------------


async def test_a_test_message_no_worker_processes_says_what_to_check(
    tmp_path: Path, fresh_database_url: str, own_redis: str
) -> None:
    """The web role takes the message, no worker runs: one line after the wait, naming the
    inbox row and what to check."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = str(probe.getsockname()[1])
    settings = {
        "PANDASYNC_DATABASE_URL": fresh_database_url,
        "PANDASYNC_BROKER_URL": own_redis,  # a queue no worker consumes
        "PANDASYNC_WEBHOOK_AUTH": "token",
        "PANDASYNC_WEBHOOK_TOKEN": "t" * 32,
        "PANDASYNC_PORT": port,
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    web = await asyncio.create_subprocess_exec(
        PANDASYNC,
        "serve",
        env={**clean, **settings},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(150):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        result = await pandasync(
            tmp_path, "send-test-message", "--order-id", "1234", "--wait", "2", **settings
        )
    finally:
        web.terminate()
        await asyncio.wait_for(web.wait(), 30)
    assert result.stdout.startswith(
        f"http://127.0.0.1:{port}/webhooks/pandapon/<token> answered 200"
    ), result.stdout
    assert "t" * 32 not in result.stdout + result.stderr
    line = no_traceback_one_line(result, "pandasync worker", "pandasync status")
    assert re.match(r"pandasync send-test-message: inbox row \d+ is still (received|queued) ", line)


def test_a_taken_port_the_commands_did_not_foresee_is_still_explained() -> None:
    line = explain(OSError(errno.EADDRINUSE, "Address already in use"))
    assert "already in use" in line
    assert "to a free port" in line
    assert "cannot connect" not in line
