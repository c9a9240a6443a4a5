"""``pandasync dev`` turns the console on by itself: its banner prints the console's URL and
the admin token it made (kept, owner-only, beside the data), and that token logs in."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.console import csrf_of
from tests.support.stack import PANDASYNC

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 90
CONSOLE_LINE = re.compile(r"^  console: +(http://\S+/console/) +admin token: (\S+)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dev_prints_the_console_and_a_token_that_logs_in(
    tmp_path: Path, fresh_database_url: str
) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    env.update(
        {
            "PANDASYNC_DATABASE_URL": fresh_database_url,
            "PANDASYNC_DATA_DIR": str(data_dir),
            "PANDASYNC_PORT": str(free_port()),
            "PANDASYNC_LOG_FORMAT": "json",
        }
    )
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PANDASYNC, "dev", "--sandbox-port", str(free_port())],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        match = None
        while match is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            match = CONSOLE_LINE.search(log.read_text(errors="replace"))
        assert match, log.read_text(errors="replace")[-4000:]
        url, token = match.groups()

        saved = data_dir / "admin-token"
        assert saved.read_text().strip() == token
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert len(token) >= 16

        with httpx.Client(timeout=10) as client:
            form = client.get(url + "login")
            assert form.status_code == 200
            done = client.post(
                url + "login",
                data={"csrf": csrf_of(form.text), "token": token, "next": "/console/"},
            )
            assert done.status_code == 303
            overview = client.get(url)
            assert overview.status_code == 200
            assert "<h1>Overview</h1>" in overview.text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
