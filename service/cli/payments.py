"""``pandasync pay``: pay the orders awaiting payment (docs/operations.md, Paying orders)."""

from __future__ import annotations

import getpass
import re
import sys
import uuid
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import click

from service.accounts import Account
from service.cli.accounts import ledger_id_or_exit, one_account_or_exit
from service.cli.common import (
    configure_logging,
    database_url_or_embedded,
    main,
    settings_or_exit,
)
from service.config import Settings

if TYPE_CHECKING:
    from workers.payments import OrderOutcome, PayReport, PayRequest

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str) -> timedelta:
    """``90m``, ``2h``, ``3d``, ``1w`` (a number and one unit) as a timedelta."""
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"not a duration like 2h or 3d: {value!r}")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_amount(value: str) -> Decimal:
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError(f"not an amount in yuan: {value!r}") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(Decimal("0.01")):
        raise ValueError(f"not a positive amount in yuan with at most 2 decimals: {value!r}")
    return amount


def _who(given: str | None) -> str:
    if given and given.strip():
        return given.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@main.command()
@click.option(
    "--account",
    default=None,
    metavar="NAME",
    help="The account whose orders to pay: its name in PANDASYNC_ACCOUNTS_FILE or its user-id "
    "(default: the only account; required when several are configured).",
)
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
@click.option(
    "--order",
    "order_ids",
    multiple=True,
    metavar="ID",
    help="Only this order (repeatable); also tries again one whose last answer was a link to "
    "pay by hand.",
)
@click.option(
    "--older-than",
    default=None,
    metavar="DURATION",
    help="Only orders created at least this long ago: 90m, 2h, 3d, 1w.",
)
@click.option(
    "--max-total",
    default=None,
    metavar="AMOUNT",
    help="Pay at most this many yuan (CNY) in this run; the run stops before the order that "
    "would exceed it.",
)
@click.option("--yes", is_flag=True, help="Pay. Without it nothing is paid or written.")
@click.option("--by", "by", default=None, metavar="NAME", help="Who asks (default: the OS user).")
@click.option(
    "--release",
    "release_id",
    type=click.IntRange(min=1),
    default=None,
    metavar="ATTEMPT_ID",
    help="Release an attempt of unknown outcome that a person found not paid upstream "
    "(needs --reason); then a later run may pay the order.",
)
@click.option("--reason", default=None, help="Why the attempt is released (with --release).")
def pay(
    account: str | None,
    platform: str | None,
    order_ids: tuple[str, ...],
    older_than: str | None,
    max_total: str | None,
    yes: bool,
    by: str | None,
    release_id: int | None,
    reason: str | None,
) -> None:
    """Pay the orders awaiting payment, each at most once, with an audit trail.

    Looks at the orders whose ledger status is pending_payment, oldest first, re-fetches each
    from PandaPon and skips any no longer awaiting payment. Without --yes it changes nothing and
    prints the plan. With --yes (and PANDASYNC_PAYMENTS_ENABLED=true) each order gets a
    payment_attempts row before the one payment call and its outcome after it, then a sync.
    An attempt whose outcome is unknown is never repeated: the run reports it for a person.

    \b
    Exit status:
      0  everything went as planned (nothing to pay included)
      1  a payment failed or its outcome is unknown, or an order needs a person
      2  bad options or settings, or payments are off (--yes)
    """
    settings = settings_or_exit()
    # Money moves: with several accounts, the one to pay is always named (a --max-total is
    # one account's run).
    chosen = one_account_or_exit(settings, account, "pay")
    if not chosen.has_credentials:
        click.echo(
            "pandasync pay: PandaPon credentials are incomplete: set PANDASYNC_ACCESS_KEY, "
            "PANDASYNC_ACCESS_SECRET and PANDASYNC_USER_ID",
            err=True,
        )
        sys.exit(2)
    if release_id is not None:
        if not reason or not reason.strip():
            raise click.BadParameter("--release needs --reason", param_hint="--reason")
        _release(chosen, release_id, _who(by), reason.strip())
        return
    try:
        older = parse_duration(older_than) if older_than is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--older-than") from None
    try:
        cap = parse_amount(max_total) if max_total is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--max-total") from None
    if yes and not settings.payments_enabled:
        click.echo(
            "pandasync pay: payments are off: set PANDASYNC_PAYMENTS_ENABLED=true to pay "
            "(docs/operations.md, Paying orders)",
            err=True,
        )
        sys.exit(2)
    configure_logging(settings)
    database_url_or_embedded(settings)
    settings = settings_or_exit()
    account_id = ledger_id_or_exit(chosen, "pay")

    import asyncio

    from service.domain import Platform
    from workers.payments import PayRequest

    request = PayRequest(
        account_id=account_id,
        run_id=str(uuid.uuid4()),
        requested_by=_who(by),
        dry_run=not yes,
        platforms=(Platform(platform),) if platform else (),
        order_ids=tuple(dict.fromkeys(o.strip() for o in order_ids if o.strip())),
        older_than=older,
        max_total=cap,
    )
    if request.dry_run:
        click.echo("pay: dry run, nothing is paid or written (--yes pays)")
        if not settings.payments_enabled:
            click.echo("pay: payments are off (PANDASYNC_PAYMENTS_ENABLED=false): --yes refuses")
    else:
        click.echo(f"pay: run {request.run_id} by {request.requested_by}")
    report = asyncio.run(_run(settings, request, chosen))
    _summary(report, cap)
    sys.exit(report.exit_code)


async def _run(settings: Settings, request: PayRequest, account: Account) -> PayReport:
    from service.db import make_engine, make_sessionmaker
    from service.pandapon.client import PandaPonClient, make_http_client
    from service.pandapon.ratelimit import make_rate_limiter
    from workers.payments import PaymentRun

    if not settings.database_url:
        raise RuntimeError("PANDASYNC_DATABASE_URL is not set")
    engine = make_engine(settings.database_url, settings, application_name="pandasync-pay")
    # No connect retries: a payment call is made once (docs/upstream.md, Payments).
    http = make_http_client(settings, connect_retries=0)
    # The workers' limiter (Redis when the broker is): the run's calls count against the
    # account's rate like theirs.
    limiter = make_rate_limiter(settings, account=account)
    try:
        client = PandaPonClient(settings, http, limiter=limiter, account=account)
        run = PaymentRun(engine, make_sessionmaker(engine), client, request, on_outcome=_line)
        return await run.run()
    finally:
        await http.aclose()
        await limiter.aclose()
        await engine.dispose()


_LABELS = {
    "would_pay": "would pay",
    "paid": "paid",
    "pay_by_hand": "pay by hand",
    "held_back": "held back",
    "failed": "FAILED",
    "unknown": "UNKNOWN outcome",
    "not_awaiting": "skipped",
    "already_paid": "skipped",
    "another_run": "skipped",
    "needs_person": "NEEDS A PERSON",
    "settled": "settled",
    "awaits_hand": "skipped",
    "over_cap": "not paid (cap)",
    "not_reached": "not paid (cap)",
    "not_countable": "not paid (cap)",
    "refetch_failed": "NOT PAID",
    "not_in_ledger": "not looked at",
}


def _line(outcome: OrderOutcome) -> None:
    platform = outcome.platform.value if outcome.platform else "?"
    amount = "" if outcome.amount is None else f"{outcome.amount:.2f} {outcome.currency}"
    parts = [f"  {platform:<6} {outcome.order_id:<20} {amount:>14}  {_LABELS[outcome.verdict]}"]
    if outcome.attempt_id is not None:
        parts.append(f"attempt {outcome.attempt_id}")
    if outcome.pay_url:
        parts.append(f"pay at {outcome.pay_url}")
    if outcome.detail:
        parts.append(outcome.detail)
    if outcome.ledger_status:
        parts.append(f"ledger: {outcome.ledger_status}")
    click.echo(": ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:]))


def _sums(sums: dict[str, Decimal]) -> str:
    if not sums:
        return "0.00 CNY"
    return " + ".join(f"{amount:.2f} {currency}" for currency, amount in sorted(sums.items()))


def _summary(report: PayReport, cap: Decimal | None) -> None:
    from workers.payments import Verdict as V

    if not report.outcomes:
        click.echo("pay: no order awaits payment")
        return
    if report.dry_run:
        planned = report.count(V.WOULD_PAY)
        click.echo(f"pay: would pay {planned} order(s), {_sums(report.totals(V.WOULD_PAY))}")
    else:
        click.echo(
            f"pay: paid {report.count(V.PAID)} order(s), {_sums(report.totals(V.PAID))}; "
            f"to pay by hand {report.count(V.PAY_BY_HAND)}, held back {report.count(V.HELD_BACK)}, "
            f"failed {report.count(V.FAILED)}, unknown {report.count(V.UNKNOWN)}"
        )
    if cap is not None and report.count(V.OVER_CAP):
        click.echo(f"pay: stopped before --max-total {cap:.2f} CNY would be exceeded")
    person = report.count(V.UNKNOWN, V.NEEDS_PERSON)
    if person:
        click.echo(
            f"pay: {person} order(s) need a person: check them in PandaPon's console "
            "(docs/operations.md, Paying orders); they are never paid again automatically"
        )


def _release(account: Account, attempt_id: int, by: str, reason: str) -> None:
    import asyncio

    from service.db import make_engine, make_sessionmaker
    from service.pandapon.client import PandaPonClient, make_http_client
    from workers.payments import ReleaseRefused, release

    settings = settings_or_exit()
    configure_logging(settings)
    url = database_url_or_embedded(settings)
    settings = settings_or_exit()

    async def run() -> str:
        engine = make_engine(url, settings, application_name="pandasync-pay")
        http = make_http_client(settings)
        try:
            attempt = await release(
                make_sessionmaker(engine),
                PandaPonClient(settings, http, account=account),
                attempt_id,
                by=by,
                reason=reason,
            )
        finally:
            await http.aclose()
            await engine.dispose()
        return (
            f"attempt {attempt.id} ({attempt.platform.value} {attempt.order_id}) released: "
            f"{attempt.state.value}; a later `pandasync pay --yes` may pay the order"
        )

    try:
        click.echo(asyncio.run(run()))
    except ReleaseRefused as refused:
        click.echo(f"pandasync pay: {refused}", err=True)
        sys.exit(1)
