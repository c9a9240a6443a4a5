"""The operator's commands for sync failures: ``failures`` lists the open ones, ``dismiss``
closes one by hand (``service.ledger.failures``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from service.cli.accounts import account_option, accounts_or_exit, ledger_id_or_exit
from service.cli.common import (
    configure_logging,
    database_url_or_embedded,
    main,
    printable,
    settings_or_exit,
)
from service.domain import FailureKind, Platform

if TYPE_CHECKING:
    from service.ledger.failures import Dismissed, OpenFailure

# The error column of the table is cut here (--json carries the whole text).
ERROR_SHOWN = 200


@main.command()
@click.option("--platform", type=click.Choice([p.value for p in Platform]), default=None)
@click.option("--kind", type=click.Choice([k.value for k in FailureKind]), default=None)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="List at most this many (the oldest first).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (times in ISO 8601).")
@account_option()
def failures(
    platform: str | None, kind: str | None, limit: int, as_json: bool, account_name: str | None
) -> None:
    """List the open sync failures (orders no sync has fixed since they failed).

    Close one with `pandasync replay` once its cause is fixed, or by hand with
    `pandasync dismiss ID --reason TEXT` when it can never succeed.
    """
    import asyncio
    import json

    from service.db import make_engine, make_sessionmaker
    from service.ledger.failures import list_open

    settings = settings_or_exit()
    chosen = None
    if account_name is not None:
        named = accounts_or_exit(settings, account_name, "failures")
        chosen = [ledger_id_or_exit(a, "failures") for a in named]
    url = database_url_or_embedded(settings)

    async def run() -> tuple[list[OpenFailure], int]:
        engine = make_engine(url, settings, application_name="pandasync-failures")
        try:
            async with make_sessionmaker(engine)() as session:
                return await list_open(
                    session,
                    platform=Platform(platform) if platform else None,
                    kind=FailureKind(kind) if kind else None,
                    account_ids=chosen,
                    limit=limit,
                )
        finally:
            await engine.dispose()

    listed, total = asyncio.run(run())
    more = total - len(listed)
    if as_json:
        click.echo(json.dumps([_document(f) for f in listed], ensure_ascii=False))
        if more:  # stdout stays one JSON value
            click.echo(f"… and {more} more (--limit)", err=True)
        return
    if not listed:
        click.echo("no open sync failures")
        return
    several = len(settings.accounts()) > 1 or len({f.account_id for f in listed}) > 1
    table = [
        (
            "id",
            *(("account",) if several else ()),
            "platform",
            "order",
            "kind",
            "source",
            "attempts",
            "first failed",
            "last failed",
        ),
        *(
            (
                str(f.id),
                *((printable(f.account_id),) if several else ()),
                f.platform.value,
                printable(f.order_id),
                f.kind.value,
                f.source.value,
                str(f.attempts),
                f.first_failed_at.replace(microsecond=0).isoformat(" "),
                f.last_failed_at.replace(microsecond=0).isoformat(" "),
            )
            for f in listed
        ),
    ]
    errors = ["error", *(_one_line(f.error) for f in listed)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row, error in zip(table, errors, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  ".join([*cells, error]).rstrip())
    if more:
        click.echo(f"… and {more} more (--limit)")


def _one_line(error: str) -> str:
    """The stored error on one line, control characters escaped, cut for the table."""
    shown = printable(error)
    return shown if len(shown) <= ERROR_SHOWN else shown[: ERROR_SHOWN - 1] + "…"


def _document(failure: OpenFailure) -> dict[str, Any]:
    return {
        "id": failure.id,
        "account_id": failure.account_id,
        "platform": failure.platform.value,
        "order_id": failure.order_id,
        "kind": failure.kind.value,
        "source": failure.source.value,
        "attempts": failure.attempts,
        "first_failed_at": failure.first_failed_at.isoformat(),
        "last_failed_at": failure.last_failed_at.isoformat(),
        "error": failure.error,
        "endpoint": failure.endpoint,
        "http_status": failure.http_status,
        "upstream_code": failure.upstream_code,
        "upstream_msg": failure.upstream_msg,
        "upstream_request_id": failure.upstream_request_id,
        "replay_count": failure.replay_count,
    }


@main.command()
@click.argument("ids", nargs=-1, type=click.IntRange(min=1), metavar="ID...")
@click.option("--reason", default=None, help="Why it is closed by hand (required; recorded).")
@click.option("--by", default=None, help="Who closes it (default: the OS user).")
def dismiss(ids: tuple[int, ...], reason: str | None, by: str | None) -> None:
    """Close open sync failures by hand, recording when, who and why.

    For a failure that can never succeed (an order PandaPon no longer serves); fix the cause
    and `pandasync replay` instead when it can. The order's messages still waiting in the inbox
    are set aside (`ignored`): they leave the backlog. A later message, sweep or refresh of the
    order syncs it as usual, and a new failure opens if that fails too. All or nothing: one
    unknown or already closed id, or an empty reason, and nothing is changed (exit status 2).
    """
    import asyncio

    from service.db import make_engine, make_sessionmaker, session_scope
    from service.ledger.failures import (
        NAME_MAX_CHARS,
        REASON_MAX_CHARS,
        ClosedMeanwhile,
        DismissRefused,
        check_note,
        dismiss_failures,
    )

    def refuse(message: str, code: int = 2) -> NoReturn:
        click.echo(f"pandasync dismiss: {message}", err=True)
        sys.exit(code)

    if not ids:
        refuse("name the failures to close (their ids: `pandasync failures` lists them)")
    if reason is None:
        refuse("--reason is required: say why the failure is closed by hand (it is recorded)")
    operator = _os_user() if by is None else by
    try:
        # Checked before any connection: bad input costs no database round trip.
        reason = check_note(reason, "reason", REASON_MAX_CHARS)
        operator = check_note(operator, "name (--by)", NAME_MAX_CHARS)
    except DismissRefused as error:
        refuse(str(error))

    settings = settings_or_exit()
    configure_logging(settings)
    url = database_url_or_embedded(settings)

    async def run() -> list[Dismissed]:
        engine = make_engine(url, settings, application_name="pandasync-dismiss")
        try:
            async with session_scope(make_sessionmaker(engine)) as session:
                return await dismiss_failures(session, ids, by=operator, reason=reason)
        finally:
            await engine.dispose()

    try:
        closed = asyncio.run(run())
    except ClosedMeanwhile as error:  # a race, not a mistake: running it again may succeed
        refuse(str(error), 1)
    except DismissRefused as error:
        refuse(str(error))
    set_aside = 0
    for done in closed:
        set_aside += done.messages_ignored
        click.echo(
            f"dismissed {done.id}: {done.platform.value} {printable(done.order_id)} "
            f"({done.kind.value}), {done.messages_ignored} waiting message(s) set aside"
        )
    click.echo(
        f"closed {len(closed)} failure(s) by hand as {printable(operator)}; "
        f"{set_aside} inbox message(s) marked ignored"
    )


def _os_user() -> str:
    """The operator's login name, or "unknown" where none can be found (a container's uid)."""
    import getpass

    try:
        return getpass.getuser() or "unknown"
    except Exception:  # KeyError or OSError, by Python version, when the uid has no name
        return "unknown"
