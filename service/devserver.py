"""``pandasync dev``: the whole system in one process, for a first look.

The web role, an in-process dramatiq worker (on the in-process broker unless
``PANDASYNC_BROKER_URL`` is set), the scheduler, the outbound webhook dispatcher and, when no
PandaPon credentials are set, the sandbox as upstream, all on one event loop. ``--demo`` runs two
PandaPon accounts in the sandbox (``demo_accounts``, listed for the service roles in an accounts
file) and has it generate traffic in both. Ctrl-C (or SIGTERM) stops everything: the servers finish
in-flight requests, the worker finishes or gives back its messages, and the embedded Postgres is
stopped at exit; its data stays in ``DATA_DIR`` for the next start.

One ``pandasync dev`` per data directory (a lock file in it) and per port (the listening sockets
are bound before anything starts): a second one ends in one line saying which. The banner is
printed once the start-up logs have gone quiet, so it is the last thing on the screen, and
again on Enter (when stdin is a terminal) or SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import structlog
import uvicorn
from pydantic import SecretStr

from service.config import Settings

log = structlog.get_logger("pandasync.dev")

DEMO_INTERVAL_S = 3.0
# The banner waits for the start-up logs to pause this long (and no longer than the limit).
SETTLE_QUIET_S = 1.0
SETTLE_LIMIT_S = 20.0
# The dev server's webhook token, kept beside the embedded database so that the printed URL
# (and ``send-test-message`` from another terminal) stays the same from one start to the next.
DEV_TOKEN_FILE = "webhook-token"  # noqa: S105 - a file name


def dev_token_path(data_dir: Path, name: str = DEV_TOKEN_FILE) -> Path:
    return data_dir / name


def read_dev_token(data_dir: Path, name: str = DEV_TOKEN_FILE) -> str | None:
    """The token ``pandasync dev`` made under ``data_dir`` (in the file ``name``), if it made
    one."""
    try:
        return dev_token_path(data_dir, name).read_text().strip() or None
    except OSError:
        return None


def dev_webhook_token(data_dir: Path, name: str = DEV_TOKEN_FILE) -> str:
    """The dev server's webhook token: the one made before, or a new one (owner-only file)."""
    existing = read_dev_token(data_dir, name)
    if existing:
        return existing
    token = secrets.token_hex(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = dev_token_path(data_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


# ``pandasync dev --demo`` runs two PandaPon accounts, listed in this accounts file
# (PANDASYNC_ACCOUNTS_FILE) beside the embedded database.
DEV_ACCOUNTS_FILE = "dev-accounts.toml"


@dataclass(frozen=True, slots=True)
class DevAccount:
    """One demo account of ``pandasync dev --demo``: public demo keys and its webhook token."""

    name: str
    user_id: str
    access_key: str
    access_secret: str
    webhook_token: str


def demo_accounts(data_dir: Path, first_token: str | None = None) -> tuple[DevAccount, ...]:
    """The two demo accounts. The first is the dev account of a plain ``pandasync dev`` (its
    keys, its token: ``first_token`` or the kept one), so its rows, the printed
    ``send-test-message`` and the token URL stay the same; the second has keys of its own
    and a token kept in a file of its own."""
    from service.sandbox.settings import (
        DEMO_B_ACCESS_KEY,
        DEMO_B_ACCESS_SECRET,
        DEMO_B_USER_ID,
        DEV_ACCESS_KEY,
        DEV_ACCESS_SECRET,
        DEV_USER_ID,
    )

    return (
        DevAccount(
            "shop-a",
            DEV_USER_ID,
            DEV_ACCESS_KEY,
            DEV_ACCESS_SECRET,
            first_token or dev_webhook_token(data_dir),
        ),
        DevAccount(
            "shop-b",
            DEMO_B_USER_ID,
            DEMO_B_ACCESS_KEY,
            DEMO_B_ACCESS_SECRET,
            dev_webhook_token(data_dir, f"{DEV_TOKEN_FILE}-shop-b"),
        ),
    )


def _toml_string(value: str) -> str:
    # A JSON string of ASCII is a TOML basic string (the same escapes).
    return json.dumps(value, ensure_ascii=True)


def write_dev_accounts(data_dir: Path, accounts: Sequence[DevAccount], api_base_url: str) -> Path:
    """Write the accounts file for ``accounts`` (owner-only: it holds tokens); its path."""
    lines = [
        "# Written by `pandasync dev --demo` at each start: its two demo accounts, whose keys",
        "# are public sandbox values; read through PANDASYNC_ACCOUNTS_FILE.",
    ]
    for account in accounts:
        lines += [
            "",
            f"[accounts.{account.name}]",
            f"user_id = {_toml_string(account.user_id)}",
            f"access_key = {_toml_string(account.access_key)}",
            f"access_secret = {_toml_string(account.access_secret)}",
            f"webhook_token = {_toml_string(account.webhook_token)}",
            f"api_base_url = {_toml_string(api_base_url)}",
        ]
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DEV_ACCOUNTS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")
    return path


# The console's admin token of ``pandasync dev``, kept the same way (a login survives a restart).
DEV_ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name


def dev_admin_token(data_dir: Path) -> str:
    """The dev server's console token: the one made before, or a new one (owner-only file)."""
    path = data_dir / DEV_ADMIN_TOKEN_FILE
    try:
        existing = path.read_text().strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    token = secrets.token_hex(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


DEV_LOCK_FILE = "dev.pid"


class DevRunning(Exception):
    """Another ``pandasync dev`` holds the data directory."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        super().__init__(f"another pandasync dev (pid {pid or '?'}) uses {data_dir}")


def claim_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir`` for this process (until it exits); the lock file's descriptor.

    An advisory lock, so a crashed dev leaves nothing to clean up: the kernel drops it with
    the process. Raises ``DevRunning`` naming the holder's pid."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / DEV_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise DevRunning(data_dir, int(text) if text.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``run_dev`` (two servers share it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class DevPlan:
    """``web_socket``/``sandbox_socket``: listening already (``pandasync dev`` binds them
    before anything starts, so a taken port is one line); None: bound at start."""

    settings: Settings
    with_sandbox: bool
    sandbox_port: int
    demo: bool
    web_socket: socket.socket | None = None
    sandbox_socket: socket.socket | None = None
    # the sandbox's accounts (``--demo``: ``demo_accounts``); empty: the one dev account
    accounts: tuple[DevAccount, ...] = ()


Banner = Callable[[str | None, str | None], None]


class _LogActivity(logging.Handler):
    """When the last log line was written (by any role of the process, any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.last = time.monotonic()

    async def settled(self, stop: asyncio.Event, quiet: float, limit: float) -> None:
        """Return once no line was written for ``quiet`` seconds (or after ``limit``)."""
        deadline = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() - self.last >= quiet:
                return
            await asyncio.sleep(0.1)


def _nothing() -> None:
    pass


def _on_enter(loop: asyncio.AbstractEventLoop, show: Callable[[], None]) -> Callable[[], None]:
    """Call ``show`` on each line typed on stdin when it is this process's terminal; returns
    how to stop watching."""
    try:
        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return _nothing
    except (AttributeError, ValueError, OSError):  # no stdin, or a closed one
        return _nothing
    with contextlib.suppress(OSError):  # a terminal that is not the controlling one
        if os.tcgetpgrp(fd) != os.getpgrp():
            return _nothing  # in the background: reading would stop the process

    def typed() -> None:
        try:
            data = os.read(fd, 1024)
        except OSError:
            data = b""
        if not data:  # end of input (Ctrl-D, the terminal gone): stop watching
            loop.remove_reader(fd)
            return
        show()

    def unwatch() -> None:
        loop.remove_reader(fd)

    loop.add_reader(fd, typed)
    return unwatch


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


async def _demo_traffic(
    sandbox_url: str, stop: asyncio.Event, accounts: Sequence[str] = ()
) -> None:
    """Orders paid, shipped, repriced and refunded, a few at a time, until stopped: in each
    account of ``accounts`` (user-ids), or in the sandbox's one account."""
    from service.sandbox.remote import SandboxRemote

    async with SandboxRemote(sandbox_url) as sandbox:
        each = [sandbox.for_account(user_id) for user_id in accounts] or [sandbox]
        for remote in each:
            await remote.configure_delivery(duplicate=0.1, reorder=0.1, delay=0.05)
        while not stop.is_set():
            for remote in each:
                try:
                    await remote.scenario(orders=1, steps=4, advance=2)
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


async def run_dev(plan: DevPlan, broker: dramatiq.Broker, banner: Banner) -> None:
    """Run every role until SIGINT/SIGTERM; ``banner(platform, order_id)`` prints the intro,
    once the start-up is over, and again on Enter or SIGUSR1."""
    from service.app import create_app
    from service.webhooks.limits import web_server_options
    from workers.outbound import run_dispatcher
    from workers.runtime import WorkerRuntime
    from workers.scheduler import default_jobs, run_scheduler

    settings = plan.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    web = create_app(settings, broker=broker)
    # The web role's HTTP limits, as `pandasync serve` has them.
    servers = [_server(web, settings.host, settings.port, **web_server_options(settings))]
    sockets = [plan.web_socket]
    if plan.with_sandbox:
        from service.sandbox.app import create_sandbox_app
        from service.sandbox.settings import SandboxAccount, load_sandbox_settings

        # The sandbox calls the token URL, as the recommended production setup does.
        webhook = f"http://{settings.host}:{settings.port}/webhooks/pandapon"
        if plan.accounts:  # each account calls back at its own token URL
            sandbox_settings = load_sandbox_settings(
                accounts=[
                    SandboxAccount(
                        user_id=a.user_id,
                        access_key=a.access_key,
                        access_secret=SecretStr(a.access_secret),
                        callback_url=f"{webhook}/{a.webhook_token}",
                    )
                    for a in plan.accounts
                ]
            )
        else:
            if settings.webhook_token is not None:
                webhook += "/" + settings.webhook_token.get_secret_value()
            base = load_sandbox_settings()
            sandbox_settings = load_sandbox_settings(
                delivery=base.delivery.model_copy(update={"webhook_url": webhook})
            )
        servers.append(
            _server(create_sandbox_app(sandbox_settings), "127.0.0.1", plan.sandbox_port)
        )
        sockets.append(plan.sandbox_socket)

    def shutdown() -> None:
        stop.set()
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown)

    activity = _LogActivity()
    logging.getLogger().addHandler(activity)
    stop_watching: Callable[[], None] = _nothing
    worker = _start_worker(broker)
    runtime = WorkerRuntime.build(settings)
    tasks = [
        asyncio.create_task(server.serve(sockets=None if sock is None else [sock]))
        for server, sock in zip(servers, sockets, strict=True)
    ]
    try:
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                raise RuntimeError("a server could not start (is the port taken?)")
            await asyncio.sleep(0.05)
        # Every account's sweeps (one account: the same as its only client).
        jobs = default_jobs(settings, runtime.sessions, runtime.clients, broker)
        tasks.append(
            asyncio.create_task(run_scheduler(runtime.engine, runtime.sessions, jobs, stop))
        )
        # The outbound webhooks (`pandasync deliver` in production), for the endpoints added.
        tasks.append(asyncio.create_task(run_dispatcher(settings, runtime.engine, stop)))
        sandbox_url = f"http://127.0.0.1:{plan.sandbox_port}"
        intro = await _welcome_order(sandbox_url) if plan.with_sandbox else (None, None)
        # The first sweeps and the welcome order's messages log a screenful: after them.
        await activity.settled(stop, SETTLE_QUIET_S, SETTLE_LIMIT_S)
        if not stop.is_set():

            def show() -> None:
                banner(*intro)

            show()
            loop.add_signal_handler(signal.SIGUSR1, show)
            stop_watching = _on_enter(loop, show)
            if plan.demo:
                user_ids = [a.user_id for a in plan.accounts]
                tasks.append(asyncio.create_task(_demo_traffic(sandbox_url, stop, user_ids)))
        await stop.wait()
    finally:
        stop_watching()
        loop.remove_signal_handler(signal.SIGUSR1)
        logging.getLogger().removeHandler(activity)
        shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The worker finishes the messages it holds (or gives them back) before we close.
        await asyncio.to_thread(worker.stop)
        await runtime.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
