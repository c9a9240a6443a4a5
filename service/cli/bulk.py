"""The commands that go over many orders: backfill (through the workers) and remap (in place)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING

import click

from service.cli.accounts import account_option, accounts_or_exit, ledger_id_or_exit
from service.cli.common import (
    configure_logging,
    database_url_or_embedded,
    main,
    settings_or_exit,
)

if TYPE_CHECKING:
    from dramatiq import Broker

    from workers.runtime import WorkerRuntime


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
@account_option("Only this account (default: every account, one after the other).")
def backfill(
    account_name: str | None,
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
    --again pages a finished range once more. Each account has its own runs and progress.
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

    settings = settings_or_exit()
    accounts = accounts_or_exit(settings, account_name, "backfill")
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
    configure_logging(settings)
    database_url_or_embedded(settings)
    settings = settings_or_exit()
    if not settings.broker_url:
        click.echo("pandasync backfill: needs PANDASYNC_BROKER_URL (the workers' broker)", err=True)
        sys.exit(2)
    plans = {
        account.name: BackfillPlan(
            ledger_id_or_exit(account, "backfill"),
            platforms,
            since_at,
            until_at,
            page_size=page_size,
            again=again,
            wait=wait,
            stall_timeout_s=stall_timeout,
        )
        for account in accounts
    }
    several = len(plans) > 1
    fancy = sys.stdout.isatty()

    def already_paged(p: Platform, orders: int) -> None:
        click.echo(
            f"backfill {p.value}: this range was paged already ({orders} orders); "
            "--again pages it again"
        )

    async def run() -> int:
        runtime = WorkerRuntime.build(settings)
        broker = make_broker(settings)
        code = 0
        try:
            for name, plan in plans.items():
                if several:
                    click.echo(f"backfill of account {name} ({plan.account_id})")
                code = max(code, await run_one(runtime, broker, plan))
        finally:
            await runtime.aclose()
            broker.close()
        return code

    async def run_one(runtime: WorkerRuntime, broker: Broker, plan: BackfillPlan) -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
        from rich.progress import TextColumn as Text

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

        with bar:
            end = await run_backfill(
                runtime.sessions,
                runtime.client_for(plan.account_id),
                enqueue_with(broker),
                plan,
                show,
                already_paged,
            )
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
    tallies = [(p, t) for plan in plans.values() for p, t in plan.tallies.items()]
    if code:
        failed = sum(t.failed for _, t in tallies)
        if failed:
            click.echo(
                f"pandasync backfill: {failed} order(s) failed to sync; see `pandasync status`, "
                "then `pandasync replay`",
                err=True,
            )
        sys.exit(code)
    done = [f"{p.value} {t.seen} order(s), {t.done} synced" for p, t in tallies]
    click.echo("backfill finished: " + ", ".join(done))


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

    settings = settings_or_exit()
    configure_logging(settings)
    url = database_url_or_embedded(settings)
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
