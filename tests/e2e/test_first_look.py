"""``pandasync dev --demo`` explains itself: its banner comes last, after the start-up logs,
comes again on Enter and on SIGUSR1, and every command it prints works as printed; a second
dev on the same data ends in one line; a test message reports what the worker made of it."""

from __future__ import annotations

import os
import pty
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.stack import PANDASYNC

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 90
BANNER = "pandasync is running"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(log: Path, process: subprocess.Popen[bytes], done: str, count: int = 1) -> str:
    """The output once ``done`` appears ``count`` times in it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        output = log.read_text(errors="replace")
        if output.count(done) >= count:
            return output
        time.sleep(0.2)
    raise AssertionError(
        f"{done!r} x{count} never came:\n{log.read_text(errors='replace')[-6000:]}"
    )


def banner_command(output: str, pattern: str) -> list[str]:
    """The command on the first banner line matching ``pattern``, split as a shell would."""
    banner = output[output.index(BANNER) :]
    match = re.search(pattern, banner, re.MULTILINE)
    assert match, banner
    return shlex.split(match.group(1))


def test_the_first_look_explains_itself(tmp_path: Path) -> None:
    # No settings at all, and no XDG_RUNTIME_DIR (a container, sudo, ssh without a session).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PANDASYNC_") and k != "XDG_RUNTIME_DIR"
    }
    env["PANDASYNC_PORT"] = str(free_port())
    sandbox_port = str(free_port())
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    log = tmp_path / "dev.log"
    terminal, stdin = pty.openpty()  # stdin is a terminal: Enter prints the banner again
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PANDASYNC, "dev", "--demo", "--sandbox-port", sandbox_port],
            cwd=workdir,
            env=env,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    os.close(stdin)
    try:
        output = wait_for(log, process, BANNER)
        first = output.index(BANNER)
        # The banner comes after the roles' start-up lines, not in the middle of them.
        for started in ('"scheduler started"', '"sweep finished"', '"refund sweep finished"'):
            assert 0 <= output.find(started) < first, started
        assert "RuntimeDirWarning" not in output
        assert "Traceback" not in output
        assert re.search(r"^  demo: ", output[first:], re.MULTILINE)

        # A second dev on the same data stops at once, in one line.
        second = subprocess.run(
            [PANDASYNC, "dev", "--sandbox-port", str(free_port())],
            cwd=workdir,
            env={**env, "PANDASYNC_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        [line] = second.stderr.strip().splitlines()
        assert f"another pandasync dev (pid {process.pid}) uses PANDASYNC_DATA_DIR=" in line

        # Every command the banner prints works as printed, from another terminal here.
        send = banner_command(output, r"^    (\S+ send-test-message .+)$")
        status = banner_command(output, r"^    (\S+ status)$")
        peek = banner_command(output, r"^    (\S+/psql .+)$")
        sent = subprocess.run(
            send, cwd=workdir, env=env, capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        order_id = send[send.index("--order-id") + 1]
        assert "/webhooks/pandapon/<token> answered 200" in sent.stdout
        assert re.search(r"^inbox row \d+: processed ", sent.stdout, re.MULTILINE), sent.stdout
        # Paid when the banner was printed; the demo may have moved it on since.
        assert re.search(rf"^ledger: taobao order {order_id} is [a-z_]+ ", sent.stdout, re.M)
        for command in (status, peek):
            ran = subprocess.run(
                command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60
            )
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert "Warning" not in ran.stderr, ran.stderr
        assert order_id in ran.stdout

        # Again on SIGUSR1, and on Enter.
        process.send_signal(signal.SIGUSR1)
        wait_for(log, process, BANNER, 2)
        os.write(terminal, b"\n")
        output = wait_for(log, process, BANNER, 3)
        # The outcome words explain themselves in the log.
        reconciled = [ln for ln in output.splitlines() if '"event": "reconciled"' in ln]
        assert reconciled
        assert all('"detail": "' in ln for ln in reconciled)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
        os.close(terminal)
    assert process.returncode == 0, log.read_text(errors="replace")[-6000:]
