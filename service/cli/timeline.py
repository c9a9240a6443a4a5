"""``pandasync order``: one order's story, its current state and then every event the ledger
holds of it, oldest first (``service/ledger/timeline.py`` reads them)."""

from __future__ import annotations

import enum
import json
import shlex
import sys
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, NoReturn

import click

from service.cli.common import database_url_or_embedded, main, printable, settings_or_exit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from service.ledger.timeline import (
        Detail,
        Event,
        FailureInfo,
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
    help="The account (PandaPon user-id) whose order to show; needed only when several hold it.",
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
    order = _record(timeline.order)
    order["open_failure"] = _plain(timeline.open_failure)
    return {
        "order": order,
        "events": [
            {
                "at": _plain(event.at),
                "kind": event.kind.value,
                "source": event.source,
                "summary": summary(event),
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


def _at(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _money(amount: Decimal | None, currency: str = "") -> str:
    if amount is None:
        return "-"
    return f"{amount} {currency}".rstrip()


def timeline_lines(timeline: Timeline) -> list[str]:
    """The text view: the current state, a blank line, one line per event (not yet escaped)."""
    o = timeline.order
    lines = [f"{o.platform.value} {o.order_id}  (account {o.account_id})"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<13} {text}")

    refund = o.refund_state.value
    if o.refunded_amount:
        refund += f", {_money(o.refunded_amount, o.currency)} refunded"
    row("status", f"{o.status.value} ({o.raw_status}); refund {refund}")
    row(
        "amounts",
        f"total {_money(o.total_amount, o.currency)} (products {_money(o.product_amount)}, "
        f"shipping {_money(o.shipping_fee)}, discount {_money(o.discount_amount)})",
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
    row("upstream", ", ".join(f"{name} {_at(at)}" for name, at in times if at is not None) or "-")
    if o.close_reason:
        row("close reason", o.close_reason)
    row(
        "synced",
        f"last {_at(o.last_synced_at)} (snapshot fetched {_at(o.snapshot_at)}, "
        f"first seen {_at(o.first_seen_at)})",
    )
    if o.upstream_anomaly:
        row("anomaly", o.upstream_anomaly)
    if timeline.open_failure is not None:
        row("open failure", _failure(timeline.open_failure))
    lines.append("")
    lines.append(f"events ({len(timeline.events)}, oldest first, times UTC):")
    lines += [
        f"  {_at(e.at)}  {e.kind.value:<15}  {summary(e)}  [{e.source}]" for e in timeline.events
    ]
    return lines


def _failure(f: FailureInfo) -> str:
    text = (
        f"{f.failure_kind.value}, {f.attempts} attempt(s), last {_at(f.last_failed_at)}: {f.error}"
    )
    if f.replay_count:
        text += f" (replayed {f.replay_count}x, last {_at(f.replayed_at)})"
    return text


def summary(event: Event) -> str:
    """One line saying what happened."""
    from service.ledger.timeline import (
        EventKind,
        FailureInfo,
        InboxMessage,
        PaymentAttemptInfo,
        PriceChange,
        RefundInfo,
        ShipmentTrace,
        StatusChange,
    )

    d: Detail = event.detail
    if isinstance(d, InboxMessage):
        signature = d.signature_state.value if d.signature_state else "not checked"
        text = f"{d.message_kind.value} message {d.message_type}: {d.state.value}"
        text += f", signature {signature}"
        if d.refund_id:
            text += f", refund {d.refund_id}"
        return f"{text} (inbox #{d.inbox_id})"
    if isinstance(d, StatusChange):
        before = d.from_status.value if d.from_status else "(new)"
        raw = f"{d.from_raw_status} → {d.to_raw_status}" if d.from_raw_status else d.to_raw_status
        text = f"status {before} → {d.to_status.value} ({raw})"
        return text + (f", after inbox #{d.inbox_id}" if d.inbox_id else "")
    if isinstance(d, PriceChange):
        parts = [f"total {_money(d.old_total_amount)} → {_money(d.new_total_amount, d.currency)}"]
        for name, old, new in (
            ("products", d.old_product_amount, d.new_product_amount),
            ("shipping", d.old_shipping_fee, d.new_shipping_fee),
        ):
            if old != new:
                parts.append(f"{name} {_money(old)} → {_money(new)}")
        text = "price: " + ", ".join(parts)
        return text + (f", after inbox #{d.inbox_id}" if d.inbox_id else "")
    if isinstance(d, ShipmentTrace):
        parcel = f"parcel {d.tracking_number}" + (f" ({d.carrier})" if d.carrier else "")
        if d.event_id is None:
            return f"{parcel}: {d.parcel_status or 'no trace event yet'}"
        what = " ".join(part for part in (d.event_status, d.description) if part) or "-"
        return f"{parcel}: {what}" + (f" @ {d.location}" if d.location else "")
    if isinstance(d, RefundInfo):
        amount = _money(d.amount, d.currency)
        now = f"{d.status.value} ({d.raw_status})"
        if event.kind is EventKind.REFUND_RESOLVED:
            return f"refund {d.refund_id} {now}: {amount}"
        reason = f", reason: {d.reason}" if d.reason else ""
        return f"refund {d.refund_id} requested: {amount}{reason}; now {now}"
    if isinstance(d, PaymentAttemptInfo):
        text = f"payment {d.state.value}: {_money(d.amount, d.currency)} by {d.requested_by}"
        if d.finished_at is not None:
            text += f", finished {_at(d.finished_at)}"
        if d.pay_url:
            text += f", pay by hand at {d.pay_url}"
        if d.upstream_code or d.upstream_msg:
            text += f", upstream {d.upstream_code or '-'} {d.upstream_msg or ''}".rstrip()
        if d.error:
            text += f", error: {d.error}"
        return text
    assert isinstance(d, FailureInfo)
    if event.kind is EventKind.FAILURE_CLOSED:
        if d.dismissed_at is not None:
            reason = f": {d.dismissed_reason}" if d.dismissed_reason else ""
            return f"failure #{d.failure_id} dismissed by {d.dismissed_by or '-'}{reason}"
        return f"failure #{d.failure_id} resolved: the order synced"
    return f"sync failed (failure #{d.failure_id}): {_failure(d)}"
