"""``pandasync dev``: the whole system in one process, for a first look.

The web role, an in-process dramatiq worker (on the in-process broker unless
``PANDASYNC_BROKER_URL`` is set), the scheduler and, when no PandaPon credentials are set, the
sandbox as upstream, all on one event loop. ``--demo`` has the sandbox generate traffic. Ctrl-C
(or SIGTERM) stops everything: the servers finish in-flight requests, the worker finishes or
gives back its messages, and the embedded Postgres is stopped at exit; its data stays in
``DATA_DIR`` for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import structlog
import uvicorn

from service.config import Settings

log = structlog.get_logger("pandasync.dev")

DEMO_INTERVAL_S = 3.0
# The dev server's webhook token, kept beside the embedded database so that the printed URL
# (and ``send-test-message`` from another terminal) stays the same from one start to the next.
DEV_TOKEN_FILE = "webhook-token"  # noqa: S105 - a file name


def dev_token_path(data_dir: Path) -> Path:
    return data_dir / DEV_TOKEN_FILE


def read_dev_token(data_dir: Path) -> str | None:
    """The token ``pandasync dev`` made under ``data_dir``, if it made one."""
    try:
        return dev_token_path(data_dir).read_text().strip() or None
    except OSError:
        return None


def dev_webhook_token(data_dir: Path) -> str:
    """The dev server's webhook token: the one made before, or a new one (owner-only file)."""
    existing = read_dev_token(data_dir)
    if existing:
        return existing
    token = secrets.token_hex(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = dev_token_path(data_dir)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``run_dev`` (two servers share it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class DevPlan:
    settings: Settings
    with_sandbox: bool
    sandbox_port: int
    demo: bool


def _server(app: Any, host: str, port: int, **options: Any) -> _QuietServer:
    """A uvicorn server for ``app``; ``options``: the web role's (``web_server_options``)."""
    settings: dict[str, Any] = {"log_config": None, "ws": "none", **options}
    return _QuietServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            **settings,
        )
    )


async def _demo_traffic(sandbox_url: str, stop: asyncio.Event) -> None:
    """Orders paid, shipped, repriced and refunded, a few at a time, until stopped."""
    from service.sandbox.remote import SandboxRemote

    async with SandboxRemote(sandbox_url) as sandbox:
        await sandbox.configure_delivery(duplicate=0.1, reorder=0.1, delay=0.05)
        while not stop.is_set():
            try:
                await sandbox.scenario(orders=1, steps=4, advance=2)
            except Exception as error:  # the demo must never take the dev server down
                log.warning("demo traffic failed", error=str(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEMO_INTERVAL_S)


async def _welcome_order(sandbox_url: str) -> tuple[str, str]:
    """A paid order in the sandbox for the printed test message to talk about."""
    from service.sandbox.remote import SandboxRemote

    async with SandboxRemote(sandbox_url) as sandbox:
        existing = [o for o in await sandbox.orders("taobao") if o["status"] == "paid"]
        if existing:
            return "taobao", str(existing[0]["order_id"])
        order = await sandbox.create_order(
            "taobao", [{"title": "欢迎 · welcome mug", "quantity": 2, "unit_price": "25.00"}]
        )
        await sandbox.pay("taobao", order["order_id"])
        return "taobao", str(order["order_id"])


def _start_worker(broker: dramatiq.Broker) -> dramatiq.Worker:
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=200)
    worker.start()
    return worker


async def run_dev(plan: DevPlan, broker: dramatiq.Broker, banner: Any) -> None:
    """Run every role until SIGINT/SIGTERM; ``banner(platform, order_id)`` prints the intro."""
    from service.app import create_app
    from service.webhooks.limits import web_server_options
    from workers.runtime import WorkerRuntime
    from workers.scheduler import default_jobs, run_scheduler

    settings = plan.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    web = create_app(settings, broker=broker)
    # The web role's HTTP limits, as `pandasync serve` has them.
    servers = [_server(web, settings.host, settings.port, **web_server_options(settings))]
    if plan.with_sandbox:
        from service.sandbox.app import create_sandbox_app
        from service.sandbox.settings import load_sandbox_settings

        # The sandbox calls the token URL, as the recommended production setup does.
        webhook = f"http://{settings.host}:{settings.port}/webhooks/pandapon"
        if settings.webhook_token is not None:
            webhook += "/" + settings.webhook_token.get_secret_value()
        base = load_sandbox_settings()
        sandbox_settings = load_sandbox_settings(
            delivery=base.delivery.model_copy(update={"webhook_url": webhook})
        )
        servers.append(
            _server(create_sandbox_app(sandbox_settings), "127.0.0.1", plan.sandbox_port)
        )

    def shutdown() -> None:
        stop.set()
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown)

    worker = _start_worker(broker)
    runtime = WorkerRuntime.build(settings)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                raise RuntimeError("a server could not start (is the port taken?)")
            await asyncio.sleep(0.05)
        jobs = default_jobs(settings, runtime.sessions, runtime.client, broker)
        tasks.append(
            asyncio.create_task(run_scheduler(runtime.engine, runtime.sessions, jobs, stop))
        )
        if plan.with_sandbox:
            sandbox_url = f"http://127.0.0.1:{plan.sandbox_port}"
            banner(*await _welcome_order(sandbox_url))
            if plan.demo:
                tasks.append(asyncio.create_task(_demo_traffic(sandbox_url, stop)))
        else:
            banner(None, None)
        await stop.wait()
    finally:
        shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The worker finishes the messages it holds (or gives them back) before we close.
        await asyncio.to_thread(worker.stop)
        await runtime.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
