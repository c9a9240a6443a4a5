"""``pandasync order``: one order's story, its current state and then every event the ledger
holds of it, oldest first (``service/ledger/timeline.py`` reads them)."""

from __future__ import annotations

import enum
import json
import shlex
import sys
from dataclasses import fields, is_dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, NoReturn

import click

from service.cli.accounts import find
from service.cli.common import database_url_or_embedded, main, printable, settings_or_exit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from service.ledger.timeline import (
        OrderState,
        Timeline,
    )


@main.command("order")
@click.argument("platform", type=click.Choice(["taobao", "1688"]))
@click.argument("order_id")
@click.option(
    "--account",
    default=None,
    metavar="NAME",
    help="The account (its name in PANDASYNC_ACCOUNTS_FILE, or its PandaPon user-id) whose "
    "order to show; needed only when several hold it.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object {"order": {…}, "events": […]} instead of text (docs/operations.md).',
)
def order(platform: str, order_id: str, account: str | None, as_json: bool) -> None:
    """Show an order's timeline: its current state, then every event, oldest first.

    Each inbox message, status change, price change, parcel and trace event, refund, payment
    attempt and sync failure of the order, with its time (UTC) and its source. Reads the
    ledger only; no upstream call.

    \b
    Exit status:
      0  shown
      1  no such order in the ledger (or the database failed)
      2  several accounts hold the order and --account names none, or the settings are invalid
    """
    import asyncio

    from service.db import make_engine, make_sessionmaker
    from service.ledger.models import Platform
    from service.ledger.timeline import find_orders, order_timeline, read_consistently

    settings = settings_or_exit()
    if account is not None:
        named = find(settings, account)
        # A configured account's name reads as its user-id; an account no longer configured
        # is still in the ledger, by its user-id.
        if named is not None and named.user_id:
            account = named.user_id
    url = database_url_or_embedded(settings)

    async def run() -> list[OrderState] | Timeline:
        engine = make_engine(url, settings, application_name="pandasync-order")
        try:
            async with make_sessionmaker(engine)() as session:
                await read_consistently(session)
                found = await find_orders(session, Platform(platform), order_id, account)
                if len(found) != 1:
                    return found
                return await order_timeline(session, found[0])
        finally:
            await engine.dispose()

    result = asyncio.run(run())
    if isinstance(result, list):
        if not result:
            which = f" (for account {account})" if account is not None else ""
            hint = f"pandasync resync {platform} {shlex.quote(order_id)}"
            _fail(f"no order {platform} {order_id} in the ledger{which}: try `{hint}`", 1)
        accounts = ", ".join(o.account_id for o in result)
        _fail(
            f"{platform} {order_id} is in the ledger of {len(result)} accounts ({accounts}): "
            "name one with --account",
            2,
        )
    if as_json:
        click.echo(json.dumps(timeline_json(result), indent=2))
    else:
        for line in timeline_lines(result):
            click.echo(printable(line))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(printable(f"pandasync order: {message}"), err=True)
    sys.exit(code)


# --- JSON -------------------------------------------------------------------------------------


def timeline_json(timeline: Timeline) -> dict[str, object]:
    """``{"order": {…, "open_failure": {…} | null}, "events": [{"at", "kind", "source",
    "summary", "detail": {…}}]}``: times ISO 8601, amounts decimal strings, enums their value;
    the keys of each ``detail`` are the fields of its dataclass in service/ledger/timeline.py."""
    from service.ledger.timeline import describe

    order = _record(timeline.order)
    order["open_failure"] = _plain(timeline.open_failure)
    return {
        "order": order,
        "events": [
            {
                "at": _plain(event.at),
                "kind": event.kind.value,
                "source": event.source,
                "summary": describe(event),
                "detail": _plain(event.detail),
            }
            for event in timeline.events
        ],
    }


def _record(value: DataclassInstance) -> dict[str, object]:
    return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}


def _plain(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return _record(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


# --- text -------------------------------------------------------------------------------------


def timeline_lines(timeline: Timeline) -> list[str]:
    """The text view: the current state, a blank line, one line per event (not yet escaped)."""
    from service.ledger.timeline import at, describe, failure_text, money

    o = timeline.order
    lines = [f"{o.platform.value} {o.order_id}  (account {o.account_id})"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<13} {text}")

    refund = o.refund_state.value
    if o.refunded_amount:
        refund += f", {money(o.refunded_amount, o.currency)} refunded"
    row("status", f"{o.status.value} ({o.raw_status}); refund {refund}")
    row(
        "amounts",
        f"total {money(o.total_amount, o.currency)} (products {money(o.product_amount)}, "
        f"shipping {money(o.shipping_fee)}, discount {money(o.discount_amount)})",
    )
    times = [
        ("created", o.upstream_created_at),
        ("paid", o.paid_at),
        ("shipped", o.shipped_at),
        ("delivered", o.delivered_at),
        ("completed", o.completed_at),
        ("cancelled", o.cancelled_at),
        ("modified", o.upstream_modified_at),
    ]
    shown = [f"{name} {at(when)}" for name, when in times if when is not None]
    row("upstream", ", ".join(shown) or "-")
    if o.close_reason:
        row("close reason", o.close_reason)
    row(
        "synced",
        f"last {at(o.last_synced_at)} (snapshot fetched {at(o.snapshot_at)}, "
        f"first seen {at(o.first_seen_at)})",
    )
    if o.upstream_anomaly:
        row("anomaly", o.upstream_anomaly)
    if timeline.open_failure is not None:
        row("open failure", failure_text(timeline.open_failure))
    lines.append("")
    lines.append(f"events ({len(timeline.events)}, oldest first, times UTC):")
    lines += [
        f"  {at(e.at)}  {e.kind.value:<15}  {describe(e)}  [{e.source}]" for e in timeline.events
    ]
    return lines
