"""The ``pandasync`` group, and what every command does first: read the settings (one line and
exit 2 when they are wrong), find the database (the embedded one when none is set), set up
logging."""

from __future__ import annotations

import os
import sys

import click

from service.config import ConfigError, Settings, get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pandasync: mirror PandaPon orders (Taobao and 1688) into Postgres."""


def settings_or_exit() -> Settings:
    try:
        return get_settings()
    except ConfigError as error:
        click.echo(f"pandasync: {error}", err=True)
        sys.exit(2)


def database_url_or_embedded(settings: Settings) -> str:
    """The configured URL, or the embedded server's (exported so child processes share it)."""
    if settings.database_url:
        return settings.database_url
    from service.embedded import start_embedded

    url = start_embedded(settings.data_dir)
    os.environ["PANDASYNC_DATABASE_URL"] = url
    get_settings.cache_clear()
    return url


def configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def account_id_or_exit(settings: Settings) -> str:
    if not settings.user_id:
        click.echo("pandasync: PANDASYNC_USER_ID is not set", err=True)
        sys.exit(2)
    return settings.user_id
