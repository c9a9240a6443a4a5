"""``pandasync sandbox`` runs on its own, with the service's credentials from the environment."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import load_settings
from service.ledger.models import OrderStatus, Platform
from service.pandapon.client import PandaPonClient, make_http_client
from service.sandbox.remote import SandboxRemote

PANDASYNC = Path(sys.executable).parent / "pandasync"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[str], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"pandasync sandbox exited: {process.communicate()}")
        try:
            if httpx.get(f"{url}/_sandbox/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("pandasync sandbox did not come up")


async def exercise(url: str) -> None:
    """The control API and a signed client call against the running sandbox."""
    async with SandboxRemote(url) as remote:
        orders = await remote.orders()
        truth = await remote.create_order(Platform.TAOBAO)
    assert len(orders) == 3  # the seeded scenario of PANDASYNC_SANDBOX_SCENARIO_ORDERS
    settings = load_settings(
        api_base_url=url,
        access_key="cli-key",
        access_secret="cli-secret",
        user_id="cli-user",
        broker_url=None,
    )
    async with make_http_client(settings) as http:
        order = await PandaPonClient(settings, http).order_detail(
            Platform.TAOBAO, truth["order_id"]
        )
    assert order.status is OrderStatus.PENDING_PAYMENT


@pytest.mark.timeout(60)
def test_pandasync_sandbox_serves_the_service_credentials(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
    env.update(
        {
            "PANDASYNC_ACCESS_KEY": "cli-key",
            "PANDASYNC_ACCESS_SECRET": "cli-secret",
            "PANDASYNC_USER_ID": "cli-user",
            "PANDASYNC_SANDBOX_SEED": "5",
            "PANDASYNC_SANDBOX_SCENARIO_ORDERS": "3",
            "PANDASYNC_LOG_FORMAT": "json",
        }
    )
    process = subprocess.Popen(
        [str(PANDASYNC), "sandbox", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(url, process)
        asyncio.run(exercise(url))
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert f"PandaPon sandbox on {url}" in out
    assert "cli-key" in out
    assert "cli-secret" not in out + err
