"""``pandasync worker`` binds its metrics port before dramatiq starts and its exposition process
serves it: the metrics of every worker process on one port, and the port free again at exit.

On Redis only: the metrics do not depend on the broker, and a worker's start on RabbitMQ is
test_reconcile_e2e's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.stack import PANDASYNC, free_port

pytestmark = pytest.mark.e2e


def test_the_worker_serves_its_metrics_on_the_port_it_bound(
    tmp_path: Path, postgres_server_url: str, own_redis: str
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    env.update(
        PANDASYNC_DATABASE_URL=postgres_server_url,
        PANDASYNC_BROKER_URL=own_redis,
        PANDASYNC_WORKER_METRICS_PORT=str(port),
        PANDASYNC_WORKER_PROCESSES="2",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [PANDASYNC, "worker"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            body = response.text
            if response.status_code == 200 and "pandasync_sync_failures_open" in body:
                break
            time.sleep(0.2)
        assert "pandasync_sync_failures_open" in body, log.read_text(errors="replace")[-4000:]
        worker.send_signal(signal.SIGTERM)  # dramatiq's main process passes it on
        assert worker.wait(60) == 0
        # Every process that held the socket is gone: the port is free again.
        with socket.create_server(("127.0.0.1", port)):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)  # whatever a failure left of its group
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-4000:]
