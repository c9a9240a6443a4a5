"""``pandasync dev`` on a fresh directory with no settings: the newcomer's first look."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support.stack import PANDASYNC

pytestmark = pytest.mark.e2e

BANNER_TIMEOUT_S = 90


def _wait_for_line(process: subprocess.Popen[bytes], log: Path, pattern: str) -> re.Match[str]:
    """The first line of the output matching ``pattern`` (the output goes to a file, so the
    process never blocks on a full pipe)."""
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            match = re.search(pattern, line)
            if match:
                return match
        time.sleep(0.2)
    raise AssertionError(f"never printed {pattern!r}:\n{log.read_text(errors='replace')[-6000:]}")


def test_dev_starts_from_nothing_takes_a_message_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    workdir = tmp_path / "fresh"
    workdir.mkdir()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PANDASYNC, "dev"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # The URL to give PandaPon is the token URL, with a token made and kept for next time.
        url = _wait_for_line(
            process, log, r"webhook URL:\s+(\S+/webhooks/pandapon/([0-9a-f]{48}))$"
        )
        assert (workdir / ".pandasync" / "webhook-token").read_text().strip() == url.group(2)
        send = _wait_for_line(process, log, r"^\s+(\S*pandasync send-test-message .+)$")
        peek = _wait_for_line(process, log, r"^\s+(\S+/psql .+)$")
        argv = shlex.split(send.group(1))
        sent = subprocess.run(
            argv,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # From the same directory it finds the dev token and uses the token URL, masked.
        assert "/webhooks/pandapon/<token> answered 200" in sent.stdout
        assert url.group(2) not in sent.stdout
        order_id = argv[argv.index("--order-id") + 1]

        psql = shlex.split(peek.group(1))
        deadline = time.monotonic() + 30
        while True:
            result = subprocess.run(psql, capture_output=True, text=True, timeout=30)
            if order_id in result.stdout and " paid " in result.stdout:
                break
            assert time.monotonic() < deadline, result.stdout + result.stderr
            time.sleep(0.5)
    finally:
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGINT)
        process.wait(60)
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output[-6000:]
    assert "pandasync dev stopped" in output
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], [p.cmdline() for p in alive]
    postgres_left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["cmdline"] and any(str(workdir) in part for part in p.info["cmdline"])
    ]
    assert postgres_left == []
    assert (workdir / ".pandasync" / "pgdata" / "PG_VERSION").exists()  # data kept
