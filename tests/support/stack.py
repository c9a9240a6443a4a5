"""The real processes of a deployment, for end-to-end tests and the soak.

``Stack`` starts ``pandasync sandbox``, ``pandasync serve``, ``pandasync worker`` and (on
request) ``pandasync scheduler`` as subprocesses on free ports, all on one test database and one
broker (a Redis database or a RabbitMQ vhost: ``redis_url`` is the broker's URL), with the
sandbox delivering its callbacks to the web role. Each process writes its log to a file under
the test's temporary directory, shown when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.pandapon.signer import Credentials, signed_headers
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID

PANDASYNC = str(Path(sys.executable).parent / "pandasync")
# A ceiling, not a wait (readiness is polled): a loaded machine starts the roles slowly.
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Role:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    terminated: bool = False  # SIGTERM sent by ``terminate`` to this process

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.terminated = False
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        """Signal the role's whole process group (a dramatiq worker has children)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the role's main process, once: a dramatiq parent forwards the signal to
        its children, and a child signalled twice exits at once instead of cleanly."""
        if self.process is not None and self.process.poll() is None and not self.terminated:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.process.wait(5)
        # A dramatiq worker's children may outlive a killed parent: sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL every process of the role, as a crash would."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(5)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    database_url: str
    redis_url: str
    workdir: Path
    settings: Mapping[str, str] = field(default_factory=dict)
    sandbox_settings: Mapping[str, str] = field(default_factory=dict)
    web_port: int = field(default_factory=free_port)
    sandbox_port: int = field(default_factory=free_port)
    roles: dict[str, Role] = field(default_factory=dict)
    # Ports of every web role: ``web_port`` first, then those of ``start(webs=N)``'s others.
    web_ports: list[int] = field(default_factory=list)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.web_url}/webhooks/pandapon"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    def env(self, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("PANDASYNC_")}
        base.update(
            {
                "PANDASYNC_DATABASE_URL": self.database_url,
                "PANDASYNC_BROKER_URL": self.redis_url,
                "PANDASYNC_API_BASE_URL": self.sandbox_url,
                "PANDASYNC_ACCESS_KEY": DEV_ACCESS_KEY,
                "PANDASYNC_ACCESS_SECRET": DEV_ACCESS_SECRET,
                "PANDASYNC_USER_ID": DEV_USER_ID,
                "PANDASYNC_LOG_FORMAT": "json",
                "PANDASYNC_WORKER_METRICS_PORT": "0",
                "PANDASYNC_SCHEDULER_METRICS_PORT": "0",
                "PANDASYNC_RELAY_INTERVAL_S": "0.5",
                "PANDASYNC_RELAY_GRACE_S": "1",
                "PANDASYNC_HTTP_READ_TIMEOUT_S": "2",
                "PANDASYNC_UPSTREAM_RATE_LIMIT_RPS": "500",
                **self.settings,
                **extra,
            }
        )
        return base

    def add(self, name: str, argv: list[str], **extra_env: str) -> Role:
        role = Role(name, argv, self.env(**extra_env), self.workdir / f"{name}.log")
        self.roles[name] = role
        return role

    async def start(self, *, scheduler: bool = False, workers: int = 1, webs: int = 1) -> None:
        """Start the roles; ``webs`` > 1 adds web roles ``web1``… on ports of their own (the
        sandbox still delivers to ``webhook_url`` unless ``sandbox_settings`` say otherwise)."""
        self.web_ports = [self.web_port, *(free_port() for _ in range(webs - 1))]
        sandbox_env = {
            "PANDASYNC_SANDBOX_DELIVERY__WEBHOOK_URL": self.webhook_url,
            **self.sandbox_settings,
        }
        self.add(
            "sandbox", [PANDASYNC, "sandbox", "--port", str(self.sandbox_port)], **sandbox_env
        ).start()
        for n, port in enumerate(self.web_ports):
            name = f"web{n}" if n else "web"
            self.add(name, [PANDASYNC, "serve", "--port", str(port)]).start()
        for n in range(workers):
            self.add(
                f"worker{n}", [PANDASYNC, "worker", "--processes", "1", "--threads", "4"]
            ).start()
        if scheduler:
            self.add("scheduler", [PANDASYNC, "scheduler"]).start()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2.0) as http:
            ports = self.web_ports or [self.web_port]
            web_ready = [f"http://127.0.0.1:{port}/readyz" for port in ports]
            for url in (f"{self.sandbox_url}/_sandbox/health", *web_ready):
                while True:
                    self._check_alive()
                    try:
                        if (await http.get(url)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{url} not ready in time\n{self.logs()}")
                    await asyncio.sleep(0.1)

    def _check_alive(self) -> None:
        dead = [r.name for r in self.roles.values() if not r.running]
        if dead:
            raise AssertionError(f"process(es) {dead} exited early\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {r.name} ---\n{r.tail()}" for r in self.roles.values())

    def stop(self) -> None:
        roles = list(reversed(list(self.roles.values())))
        # Every role told at once, then each waited for: their shutdowns overlap.
        for role in roles:
            role.terminate()
        for role in roles:
            role.stop()


async def run_command(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``pandasync`` command against the stack's settings, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [PANDASYNC, *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


DEV_CREDENTIALS = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)


async def send_signed(http: httpx.AsyncClient, url: str, message: dict[str, Any]) -> int:
    """POST ``message`` as the sandbox's dev account signs a callback; the status code."""
    body = json.dumps(message, ensure_ascii=False).encode()
    headers = {**signed_headers(DEV_CREDENTIALS), "content-type": "application/json"}
    return (await http.post(url, content=body, headers=headers)).status_code


async def deliver_signed(
    http: httpx.AsyncClient, url: str, message: dict[str, Any], *, tries: int = 5
) -> None:
    """``send_signed`` until it is answered 200, as PandaPon retries: a 503 (the inbox not
    written in time, on a loaded machine) stored nothing and is sent again. Fails on any other
    answer, or a 503 every time."""
    for _ in range(tries):
        status = await send_signed(http, url, message)
        if status != 503:
            break
        await asyncio.sleep(0.5)
    if status != 200:
        raise AssertionError(f"the callback was answered {status}, not 200, after {tries} tries")


async def burst_detail_fetches(stack: Stack, lines: list[dict[str, Any]]) -> int:
    """Ten distinct callbacks about one paid order, sent at once; once every inbox row is
    processed and the ledger holds the order, how many detail fetches the burst cost."""
    from tests.support.ledger_truth import fetch, wait_for_ledger

    async with SandboxRemote(stack.sandbox_url) as sb:
        await sb.configure_delivery(drop=1.0)
        order = await sb.create_order("taobao", lines)
        await sb.pay("taobao", order["order_id"])
        message = (await sb.callbacks(with_body=True))["records"][-1]["message"]
        await sb.reset_calls()
        async with httpx.AsyncClient(timeout=5) as http:
            for n in range(10):
                # Ten distinct messages (another push time each) about the same order.
                burst = {**message, "timestamp": str(int(message["timestamp"]) + n)}
                await deliver_signed(http, stack.webhook_url, burst)
        truth = await sb.order("taobao", order["order_id"])
        await wait_for_ledger(stack.database_url, DEV_USER_ID, [truth])

        async def all_processed() -> bool:
            rows = await fetch(
                stack.database_url, "SELECT 1 FROM webhook_inbox WHERE state <> 'processed'"
            )
            return not rows

        for _ in range(150):
            if await all_processed():
                break
            await asyncio.sleep(0.1)
        assert await all_processed()
        calls = await sb.calls()
    return int(calls.get("taobao_order_detail", 0))
