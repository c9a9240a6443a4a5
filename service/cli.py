"""The ``pandasync`` command (design §3).

Each command reads Settings once; an invalid setting stops it with a message naming the setting
(exit 2). When ``PANDASYNC_DATABASE_URL`` is unset the commands that need a database start the
embedded Postgres under ``PANDASYNC_DATA_DIR`` and export its URL to their child processes.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from service.config import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from alembic.config import Config


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


def _not_built(command: str) -> NoReturn:
    click.echo(f"pandasync {command}: not available in this version yet.", err=True)
    sys.exit(3)


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pandasync: mirror PandaPon orders (Taobao and 1688) into Postgres."""


def run_migrations(url: str, revision: str = "head") -> None:
    """``alembic upgrade`` against ``url`` using the project's alembic.ini."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def alembic_config(url: str) -> Config:
    from pathlib import Path

    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    # Alembic's ini interpolation would choke on a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@main.command()
def migrate() -> None:
    """Upgrade the database schema to the latest version (alembic upgrade head)."""
    settings = _settings()
    _configure_logging(settings)
    url = _database_url(settings)
    run_migrations(url)
    click.echo("database is at the latest schema version")


@main.command()
@click.option("--host", default=None, help="Interface to bind (default: setting HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: setting PORT, 8000).")
@click.option("--workers", type=int, default=None, help="Web processes (default: WEB_WORKERS).")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the web role: the webhook receiver, /healthz, /readyz and /metrics."""
    import uvicorn

    settings = _settings()
    _configure_logging(settings)
    _database_url(settings)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.web_workers,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


@main.command()
@click.option("--processes", type=int, default=None)
@click.option("--threads", type=int, default=None)
def worker(processes: int | None, threads: int | None) -> None:
    """Run the reconciliation workers."""
    _not_built("worker")


@main.command()
def scheduler() -> None:
    """Run the periodic jobs: sweep, refresh, relay."""
    _not_built("scheduler")


@main.command()
@click.option("--demo", is_flag=True, help="Drive sandbox traffic so the ledger fills.")
def dev(demo: bool) -> None:
    """Everything in one process for a first look."""
    _not_built("dev")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8100, show_default=True)
def sandbox(host: str, port: int) -> None:
    """Run the PandaPon emulator on its own port."""
    _not_built("sandbox")


@main.command()
@click.argument("platform", type=click.Choice(["taobao", "1688"]))
@click.argument("order_id")
def resync(platform: str, order_id: str) -> None:
    """Reconcile one order now."""
    _not_built("resync")


@main.command()
@click.option("--since", required=True, help="YYYY-MM-DD")
@click.option("--until", default=None, help="YYYY-MM-DD (default: now)")
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
def backfill(since: str, until: str | None, platform: str | None) -> None:
    """Page through the order lists and reconcile everything in a time range."""
    _not_built("backfill")


@main.command()
def replay() -> None:
    """Re-run the open sync failures."""
    _not_built("replay")


@main.command()
def status() -> None:
    """Inbox backlog, queue depth, open failures, last sweep."""
    _not_built("status")
