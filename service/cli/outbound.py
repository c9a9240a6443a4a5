"""Outbound webhooks: ``pandasync endpoints …`` configures the receivers and shows their
deliveries; ``pandasync deliver`` runs the dispatcher (``workers.outbound``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import urlsplit

import click

from service.cli.common import (
    _Commands,
    configure_logging,
    database_url_or_embedded,
    main,
    printable,
    settings_or_exit,
)
from service.ledger.models import ChangeKind

T = TypeVar("T")
ERROR_SHOWN = 80


def _with_session(work: Callable[..., Awaitable[T]], *, commit: bool = False) -> T:
    """Run ``work(session)`` on the configured database; commit when asked."""
    from service.db import make_engine, make_sessionmaker, session_scope

    settings = settings_or_exit()
    url = database_url_or_embedded(settings)

    async def run() -> T:
        engine = make_engine(url, settings, application_name="pandasync-endpoints")
        try:
            if commit:
                async with session_scope(make_sessionmaker(engine)) as session:
                    return await work(session)
            async with make_sessionmaker(engine)() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"pandasync endpoints: {message}", err=True)
    sys.exit(status)


def _time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.group(cls=_Commands)
def endpoints() -> None:
    """Outbound webhooks: the receivers the ledger's changes are sent to, signed
    (docs/operations.md, Telling your own systems).

    \b
      endpoints add URL [--events TYPE]... [--account ID]...
      endpoints list
      endpoints test ID
      endpoints disable ID --reason TEXT
      endpoints enable ID
      endpoints replay ID (--delivery N | --since T [--until T])
      endpoints deliveries ID [--failed] [--limit N]
    """


@endpoints.command("add")
@click.argument("url")
@click.option(
    "--events",
    multiple=True,
    type=click.Choice([k.value for k in ChangeKind]),
    help="Send only these change types (repeat; default: all).",
)
@click.option("--account", "accounts", multiple=True, help="Only this account (repeat).")
def add(url: str, events: tuple[str, ...], accounts: tuple[str, ...]) -> None:
    """Add an endpoint; prints its signing secret, once."""
    from service.ledger.outbound import add_endpoint

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        _fail(f"{url!r} is not an http(s) URL", 2)
    endpoint_id, secret = _with_session(
        lambda session: add_endpoint(session, url, events, accounts), commit=True
    )
    click.echo(f"endpoint {endpoint_id} added: {url}")
    click.echo(f"secret (shown only now; verify each delivery with it): {secret}")


@endpoints.command("list")
def list_() -> None:
    """The endpoints, enabled or not."""
    from service.ledger.outbound import list_endpoints

    found = _with_session(list_endpoints)
    if not found:
        click.echo("no endpoints (add one with `pandasync endpoints add URL`)")
        return
    for e in found:
        events = ",".join(e.event_types) if e.event_types else "all events"
        accounts = ",".join(e.account_ids) if e.account_ids else "all accounts"
        state = "enabled" if e.enabled else f"disabled since {e.disabled_at:%Y-%m-%d %H:%M}"
        reason = f" ({printable(e.disabled_reason)})" if e.disabled_reason else ""
        click.echo(f"{e.id}\t{e.url}\t{events}\t{accounts}\t{state}{reason}")


@endpoints.command("test")
@click.argument("endpoint_id", type=int)
def test(endpoint_id: int) -> None:
    """Send a signed test event (type endpoint.test) now and print the answer."""
    import uuid

    import httpx

    from service.ledger.outbound import get_endpoint
    from workers.outbound import event_body, post

    found = _with_session(lambda session: get_endpoint(session, endpoint_id))
    if found is None:
        _fail(f"no endpoint {endpoint_id} (see `pandasync endpoints list`)")
        return
    endpoint, secret = found
    settings = settings_or_exit()
    body = event_body("endpoint.test", datetime.now(UTC), {"endpoint_id": endpoint_id})

    async def send() -> tuple[int | None, int, str | None]:
        async with httpx.AsyncClient(timeout=settings.outbound_timeout_s) as client:
            msg_id = f"pds_test_{uuid.uuid4().hex}"
            answer = await post(
                client, endpoint.url, secret, msg_id, body, settings.outbound_timeout_s
            )
        return answer.status, answer.latency_ms, answer.error

    status, latency, error = asyncio.run(send())
    if status is not None and 200 <= status < 300:
        click.echo(f"endpoint {endpoint_id}: HTTP {status} in {latency} ms")
        return
    _fail(f"endpoint {endpoint_id} did not accept the test event: {error} after {latency} ms")


@endpoints.command("disable")
@click.argument("endpoint_id", type=int)
@click.option("--reason", required=True, help="Why (shown by `endpoints list`).")
def disable(endpoint_id: int, reason: str) -> None:
    """Stop sending to an endpoint (its deliveries wait; `enable` resumes them)."""
    from service.ledger.outbound import set_enabled

    if not _with_session(lambda s: set_enabled(s, endpoint_id, False, reason), commit=True):
        _fail(f"no endpoint {endpoint_id} (see `pandasync endpoints list`)")
    click.echo(f"endpoint {endpoint_id} disabled")


@endpoints.command("enable")
@click.argument("endpoint_id", type=int)
def enable(endpoint_id: int) -> None:
    """Send to an endpoint again, starting with what waited while it was disabled."""
    from service.ledger.outbound import set_enabled

    if not _with_session(lambda s: set_enabled(s, endpoint_id, True), commit=True):
        _fail(f"no endpoint {endpoint_id} (see `pandasync endpoints list`)")
    click.echo(f"endpoint {endpoint_id} enabled")


@endpoints.command("replay")
@click.argument("endpoint_id", type=int)
@click.option("--delivery", "delivery_id", type=int, default=None, help="One delivery, by id.")
@click.option("--since", default=None, help="Changes recorded from this time (ISO 8601)…")
@click.option("--until", default=None, help="…up to this time (default: now).")
def replay(endpoint_id: int, delivery_id: int | None, since: str | None, until: str | None) -> None:
    """Send one delivery, or every change of a time range, again (same webhook-id)."""
    from service.ledger.outbound import get_endpoint, replay_delivery, replay_range

    if (delivery_id is None) == (since is None):
        _fail("give either --delivery N or --since T [--until T]", 2)
    start = _time(since) if since else None
    end = _time(until) if until else datetime.now(UTC)

    async def work(session: object) -> int | None:
        from sqlalchemy.ext.asyncio import AsyncSession

        assert isinstance(session, AsyncSession)
        if await get_endpoint(session, endpoint_id) is None:
            return None
        if delivery_id is not None:
            return 1 if await replay_delivery(session, endpoint_id, delivery_id) else 0
        assert start is not None
        return await replay_range(session, endpoint_id, start, end)

    made = _with_session(work, commit=True)
    if made is None:
        _fail(f"no endpoint {endpoint_id} (see `pandasync endpoints list`)")
    elif delivery_id is not None and made == 0:
        _fail(f"endpoint {endpoint_id} has no delivery {delivery_id}")
    else:
        click.echo(f"{made} deliveries to send again to endpoint {endpoint_id}")


@endpoints.command("deliveries")
@click.argument("endpoint_id", type=int)
@click.option("--failed", is_flag=True, help="Only those whose last attempt failed.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def deliveries(endpoint_id: int, failed: bool, limit: int) -> None:
    """The endpoint's latest deliveries, newest first."""
    from service.ledger import outbound

    rows = _with_session(
        lambda s: outbound.deliveries(s, endpoint_id, failed_only=failed, limit=limit)
    )
    if not rows:
        click.echo("no deliveries" + (" failed" if failed else ""))
        return
    click.echo("id\tchange\ttype\torder\tstate\tattempts\tlast status\tms\twhen\terror")
    for d in rows:
        when = d.delivered_at or d.next_attempt_at
        error = printable(d.last_error or "")[:ERROR_SHOWN]
        latency = "-" if d.last_latency_ms is None else str(d.last_latency_ms)
        click.echo(
            f"{d.id}\t{d.change_id}\t{d.kind}\t{printable(d.order)}\t{d.state}\t{d.attempts}\t"
            f"{d.last_status_code or '-'}\t{latency}"
            f"\t{when:%Y-%m-%d %H:%M:%S}\t{error}"
        )


@main.command()
@click.option("--metrics-port", type=int, default=0, help="Serve Prometheus metrics here (0: no).")
def deliver(metrics_port: int) -> None:
    """Run the outbound webhook dispatcher (its own process: a slow receiver delays only it)."""
    import signal

    from prometheus_client import start_http_server

    from service.db import make_engine
    from workers.outbound import run_dispatcher

    settings = settings_or_exit()
    configure_logging(settings)
    url = database_url_or_embedded(settings)
    if metrics_port:
        start_http_server(metrics_port, addr=settings.host)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        engine = make_engine(url, settings, application_name="pandasync-deliver")
        try:
            await run_dispatcher(settings, engine, stop)
        finally:
            await engine.dispose()

    asyncio.run(run())
