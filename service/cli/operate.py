"""The operator's commands: send-test-message, doctor, resync, replay, status."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from service.config import ConfigError

if TYPE_CHECKING:
    from workers.operations import Status

from service.cli.accounts import (
    account_option,
    accounts_or_exit,
    ledger_id_or_exit,
    one_account_or_exit,
)
from service.cli.common import (
    configure_logging,
    database_url_or_embedded,
    main,
    printable,
    settings_or_exit,
)


@main.command("send-test-message")
@click.option(
    "--url",
    default=None,
    help="Webhook URL (default: this machine's web role, on the token URL when a token is set).",
)
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default="taobao")
@click.option("--order-id", required=True)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=15.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a worker to process the message (0: do not wait).",
)
@account_option("The account the message is for (default: the first configured).")
def send_test_message(
    url: str | None, platform: str, order_id: str, wait_s: float, account_name: str | None
) -> None:
    """Send one status-change message as PandaPon would, then show what a worker made of it.

    The message goes to the token URL when PANDASYNC_WEBHOOK_TOKEN is set (or `pandasync dev`
    made one in this directory), signed with the configured credentials (not in
    PANDASYNC_WEBHOOK_AUTH=token without them). Then it waits for a worker to process the
    inbox row the message made, and prints the row's state, the order's status in the ledger
    and the history rows written for the message.

    \b
    Exit status:
      0  answered 200 and processed (with --wait 0: answered 200)
      1  refused, unreachable, or not processed in time
      2  settings that cannot make a message the web role accepts
    """
    import asyncio
    import json
    import re
    import secrets
    import time

    import httpx
    from sqlalchemy import text

    from service.db import make_engine
    from service.devserver import read_dev_token
    from service.pandapon.signer import Credentials, signed_headers

    settings = settings_or_exit()
    chosen = accounts_or_exit(settings, account_name, "send-test-message")[0]
    # The account's token and credentials, as if it were the only one.
    settings = settings.for_account(chosen)
    mode = settings.webhook_auth
    dev_token = read_dev_token(settings.data_dir)
    token = settings.webhook_token.get_secret_value() if settings.webhook_token else dev_token
    credentials: Credentials | None = None
    if settings.access_key and settings.access_secret and settings.user_id:
        credentials = Credentials(
            settings.access_key, settings.access_secret.get_secret_value(), settings.user_id
        )
    elif mode != "token":
        # Nothing configured: the sandbox's credentials, which `pandasync dev` runs on.
        from service.sandbox.settings import DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID

        credentials = Credentials(DEV_ACCESS_KEY, DEV_ACCESS_SECRET, DEV_USER_ID)
    if url is None:
        url = f"http://{settings.host}:{settings.port}/webhooks/pandapon"
        if token:
            url += "/" + token
        elif "token" in mode:
            click.echo(
                f"pandasync send-test-message: PANDASYNC_WEBHOOK_AUTH={mode} takes messages "
                "on the token URL only: set PANDASYNC_WEBHOOK_TOKEN (or pass --url)",
                err=True,
            )
            sys.exit(2)
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
    # Written on the inbox row: how this command finds the row its message made.
    request_id = f"send-test-message-{secrets.token_hex(8)}"
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if credentials is not None:
        headers.update(signed_headers(credentials, unit=settings.timestamp_unit))
    try:
        response = httpx.post(url, content=json.dumps(envelope), headers=headers, timeout=5)
    except httpx.HTTPError as error:
        click.echo(
            f"pandasync send-test-message: {shown}: {error or type(error).__name__} "
            "(is the web role running there? `pandasync serve` or `pandasync dev`)",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{shown} answered {response.status_code} {response.text}".rstrip())
    if response.status_code != 200:
        sys.exit(1)
    if wait_s == 0:
        return
    if not settings.database_url and not (settings.data_dir / "pgdata").is_dir():
        click.echo("(not waiting for a worker: PANDASYNC_DATABASE_URL is not set)")
        return
    database_url = database_url_or_embedded(settings)
    sent_at = time.monotonic()

    async def follow() -> tuple[str, int]:
        """What became of the message: the lines to print and the exit status."""
        engine = make_engine(database_url, settings, application_name="pandasync-test-message")
        try:
            async with engine.connect() as conn:
                while True:
                    row = (
                        await conn.execute(
                            text(
                                "SELECT id, account_id, state::text AS state, received_at "
                                "FROM webhook_inbox WHERE request_id = :rid"
                            ),
                            {"rid": request_id},
                        )
                    ).one_or_none()
                    failure = None
                    if row is not None:
                        failure = (
                            await conn.execute(
                                text(
                                    "SELECT kind::text AS kind, error FROM sync_failures "
                                    "WHERE account_id = :a AND platform = :p AND order_id = :o "
                                    "AND resolved_at IS NULL AND last_failed_at >= :t"
                                ),
                                {
                                    "a": row.account_id,
                                    "p": platform,
                                    "o": order_id,
                                    "t": row.received_at,
                                },
                            )
                        ).one_or_none()
                    await conn.rollback()  # a fresh snapshot for each look
                    waited = time.monotonic() - sent_at
                    if row is not None and row.state in ("processed", "ignored"):
                        break
                    if failure is not None:
                        return (
                            f"pandasync send-test-message: the worker could not sync "
                            f"{platform} order {order_id} ({failure.kind}: {failure.error}); "
                            "`pandasync status` lists it, `pandasync replay` runs it again",
                            1,
                        )
                    if waited >= wait_s:
                        if row is None:
                            return (
                                "pandasync send-test-message: the message is in no inbox row of "
                                "this database: does the web role at "
                                f"{shown} use this PANDASYNC_DATABASE_URL?",
                                1,
                            )
                        return (
                            f"pandasync send-test-message: inbox row {row.id} is still "
                            f"{row.state} after {wait_s:g} s: is `pandasync worker` running on "
                            "this PANDASYNC_BROKER_URL? (`pandasync status` shows the backlog)",
                            1,
                        )
                    await asyncio.sleep(0.25)
                if row.state == "ignored":
                    return f"inbox row {row.id}: ignored (a message with nothing to sync)", 0
                order = (
                    await conn.execute(
                        text(
                            "SELECT status::text AS status, total_amount, currency, "
                            "(SELECT count(*) FROM order_status_history WHERE inbox_id = :i) "
                            "+ (SELECT count(*) FROM order_price_changes WHERE inbox_id = :i) "
                            "AS history FROM orders "
                            "WHERE account_id = :a AND platform = :p AND order_id = :o"
                        ),
                        {"i": row.id, "a": row.account_id, "p": platform, "o": order_id},
                    )
                ).one_or_none()
        finally:
            await engine.dispose()
        lines = [f"inbox row {row.id}: processed {waited:.1f} s after it was sent"]
        if order is None:
            lines.append(f"ledger: no {platform} order {order_id}")
        else:
            amount = f" ({order.total_amount} {order.currency})" if order.total_amount else ""
            written = (
                f"{order.history} history row(s) written for this message"
                if order.history
                else "no history row for this message (the ledger had this state already)"
            )
            lines.append(
                f"ledger: {platform} order {order_id} is {order.status}{amount}; {written}"
            )
        return "\n".join(lines), 0

    report, code = asyncio.run(follow())
    click.echo(report, err=code != 0)
    sys.exit(code)


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
@account_option(
    "Only this account (default: every account in turn; --listen needs one when several)."
)
def doctor(
    listen_s: float | None,
    orders: tuple[str, ...],
    host: str | None,
    port: int | None,
    account_name: str | None,
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

    settings = settings_or_exit()
    if listen_s is not None:  # one port, one account's callbacks
        accounts = [one_account_or_exit(settings, account_name, "doctor --listen")]
    else:
        accounts = accounts_or_exit(settings, account_name, "doctor")
    try:
        refs = [OrderRef.parse(text) for text in orders]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--order") from None
    try:
        codes = []
        for account in accounts:
            if len(settings.accounts()) > 1:
                click.echo(f"account {account.name}:")
            codes.append(
                run_doctor(
                    settings.for_account(account),
                    click.echo,
                    orders=refs,
                    listen_s=listen_s,
                    host=host or settings.host,
                    port=settings.port if port is None else port,
                )
            )
        # A failure anywhere is a failure; else anything unchecked.
        code = 1 if 1 in codes else max(codes)
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
@account_option("The order's account (needed when several are configured).")
def resync(platform: str, order_id: str, account_name: str | None) -> None:
    """Reconcile one order now, in this process, and print the outcome."""
    import asyncio

    from service.domain import ReconcileRequest
    from service.ledger.models import Platform, SyncSource
    from workers.reconcile import reconcile_order
    from workers.runtime import WorkerRuntime

    settings = settings_or_exit()
    account_id = ledger_id_or_exit(one_account_or_exit(settings, account_name, "resync"), "resync")
    configure_logging(settings)
    database_url_or_embedded(settings)
    settings = settings_or_exit()

    async def run() -> str:
        runtime = WorkerRuntime.build(settings)
        try:
            request = ReconcileRequest(account_id, Platform(platform), order_id, SyncSource.MANUAL)
            result = await reconcile_order(
                runtime.engine, runtime.sessions, runtime.client_for(request.account_id), request
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


@main.command()
@click.option("--platform", type=click.Choice(["taobao", "1688"]), default=None)
@click.option("--since", default=None, help="Only failures last seen at or after (ISO date/time).")
@click.option("--until", default=None, help="Only failures last seen before (ISO date/time).")
@account_option("Only this account's failures (default: every account's).")
def replay(
    platform: str | None, since: str | None, until: str | None, account_name: str | None
) -> None:
    """Re-run the open sync failures (they close when the order syncs)."""
    import asyncio

    from service.broker import enqueue_replays, make_broker
    from service.db import make_engine, make_sessionmaker
    from service.ledger.failures import mark_replayed, open_failures, replay_orders
    from service.ledger.models import Platform

    settings = settings_or_exit()
    account_ids = (
        None
        if account_name is None
        else [
            ledger_id_or_exit(a, "replay")
            for a in accounts_or_exit(settings, account_name, "replay")
        ]
    )
    configure_logging(settings)
    url = database_url_or_embedded(settings)
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
                account_ids=account_ids,
            )
            enqueue_replays(make_broker(settings), replay_orders(failures))
            await mark_replayed(sessions, [f.id for f in failures])
            return len(failures)
        finally:
            await engine.dispose()

    count = asyncio.run(run())
    click.echo(f"queued {count} failed order(s) for another sync")


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO date or date-time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command()
@click.option(
    "--max-lag",
    "max_lag_s",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Unhealthy when the oldest unprocessed inbox message is older than this.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable keys).")
@account_option("Only this account (default: every account, each on a line of its own).")
def status(max_lag_s: float, as_json: bool, account_name: str | None) -> None:
    """Inbox backlog and lag, queue depth, open failures, last sweeps, payments, unmapped values.

    \b
    Exit status:
      0  healthy
      1  unhealthy (each reason on a line `unhealthy: …`, or in "problems" with --json):
         an open sync failure, the oldest unprocessed inbox message older than --max-lag,
         an order or refund sweep that has not finished within twice its interval (or never),
         the broker cannot be reached; or the database cannot be reached (one line on stderr)
      2  the settings are invalid
    Orders awaiting payment and payments needing a person are shown but do not count.
    """
    import asyncio
    import json

    from service.broker import make_broker
    from service.db import make_engine, make_sessionmaker
    from workers.operations import (
        PAYMENT_STARTED_STALE_AFTER,
        HealthLimits,
        gather_status,
        problems,
        status_document,
    )

    settings = settings_or_exit()
    chosen = accounts_or_exit(settings, account_name, "status")
    accounts = [(a.name, a.user_id) for a in chosen if a.user_id]
    url = database_url_or_embedded(settings)
    limits = HealthLimits.from_settings(settings, max_lag_s=max_lag_s)

    async def gather() -> Status:
        engine = make_engine(url, settings, application_name="pandasync-status")
        try:
            broker = make_broker(settings) if settings.broker_url else None
            return await gather_status(
                make_sessionmaker(engine), broker, accounts, only=account_name is not None
            )
        finally:
            await engine.dispose()

    report = asyncio.run(gather())
    found = problems(report, limits)
    if as_json:
        click.echo(json.dumps(status_document(report, found, limits), ensure_ascii=False))
        sys.exit(1 if found else 0)
    age = report.oldest_unprocessed_age
    click.echo(f"inbox backlog:        {report.inbox_backlog} message(s) not yet processed")
    click.echo(f"  not yet queued:     {report.inbox_unqueued}")
    click.echo(f"  oldest unprocessed: {age if age is not None else '-'}")
    depth = report.queue_depth
    waited = f" (oldest waiting {report.queue_oldest_age})" if report.queue_oldest_age else ""
    click.echo(f"queue depth:          {depth if depth is not None else 'n/a'}{waited}")
    click.echo(f"open failures:        {report.open_failures}")
    if not report.sweeps:
        click.echo("last sweep:           never")
    for label, rows in (("sweep", report.sweeps), ("refund sweep", report.refund_sweeps)):
        for sweep in rows:
            click.echo(
                f"last {label} {sweep.platform.value:<7} {sweep.last_finished_at or 'never'}  "
                f"examined {sweep.last_examined}, drift {sweep.last_drift}"
            )
    click.echo(f"awaiting payment:     {report.orders_awaiting_payment} order(s)")
    payments, stale_min = report.payments, PAYMENT_STARTED_STALE_AFTER.total_seconds() // 60
    click.echo(
        f"payments to look at:  {payments.total} (unknown {payments.unknown}, started over "
        f"{stale_min:.0f} min ago {payments.started_stale}, pay by hand {payments.pay_by_hand}, "
        f"held back {payments.held_back})"
    )
    _echo_outbound(report)
    for account in report.accounts:
        oldest = account.oldest_unprocessed_age
        click.echo(
            f"account {account.name} ({account.account_id}): backlog {account.inbox_backlog}, "
            f"oldest {oldest if oldest is not None else '-'}, open failures "
            f"{account.open_failures}, awaiting payment {account.orders_awaiting_payment}"
        )
    _echo_unmapped(report)
    for problem in found:
        click.echo(f"unhealthy: {problem}")
    sys.exit(1 if found else 0)


def _echo_outbound(report: Status) -> None:
    """The outbound webhooks, when any endpoint exists: what waits, and each disabled one."""
    out = report.outbound
    if not out.endpoints:
        return
    oldest = f" (oldest made {out.oldest_pending_age} ago)" if out.oldest_pending_age else ""
    click.echo(
        f"outbound webhooks:    {out.endpoints} endpoint(s), {len(out.disabled)} disabled, "
        f"{out.pending} delivery(ies) pending{oldest}"
    )
    for endpoint in out.disabled:
        since = endpoint.disabled_at.replace(microsecond=0) if endpoint.disabled_at else "-"
        click.echo(
            f"  endpoint {endpoint.id} disabled since {since}: "
            f"{printable(endpoint.disabled_reason or 'no reason given')} "
            f"(`pandasync endpoints enable {endpoint.id}` sends what waited)"
        )


def _echo_unmapped(report: Status) -> None:
    """The values the mapping could not place, one line each, the latest seen first."""
    if not report.unmapped:
        click.echo("unmapped values: none")
        return
    click.echo(f"unmapped values: {report.unmapped_total} (per account: report_unmapped_values)")
    table = [("value", "platform", "field", "orders", "seen", "first seen", "last seen")]
    table += [
        (
            printable(u.value),
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
