"""Reporting set-up: the database settings and role limits `pandasync migrate` applies, and the
bench generator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bench.gen_ledger import generate
from service.db import asyncpg_dsn
from service.ledger.reporting import (
    PLANNER_SETTINGS,
    ReportingSettingsError,
    apply_reporting_access,
    apply_reporting_settings,
)


async def _fetchrow(url: str, query: str) -> asyncpg.Record:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(query)
    finally:
        await conn.close()
    assert row is not None
    return row


async def test_settings_reach_new_sessions(fresh_database_url: str) -> None:
    before = await _fetchrow(
        fresh_database_url,
        "SELECT array_agg(name ORDER BY name) AS names FROM pg_settings "
        "WHERE name IN ('jit', 'random_page_cost') AND source = 'default'",
    )
    applied = await apply_reporting_settings(fresh_database_url, "Europe/Berlin")
    # Planner settings an administrator already chose are left alone.
    assert applied == {
        "pandasync.reporting_tz": "Europe/Berlin",
        **{name: PLANNER_SETTINGS[name] for name in before["names"] or []},
    }
    row = await _fetchrow(
        fresh_database_url,
        "SELECT report_timezone() AS tz, current_setting('jit') AS jit, "
        "current_setting('random_page_cost') AS rpc",
    )
    assert row["tz"] == "Europe/Berlin"
    if "jit" in applied:
        assert row["jit"] == "off"
    if "random_page_cost" in applied:
        assert row["rpc"] == "1.1"


async def test_an_unknown_zone_is_refused_and_changes_nothing(fresh_database_url: str) -> None:
    with pytest.raises(ReportingSettingsError, match="Mars/Olympus_Mons") as raised:
        await apply_reporting_settings(fresh_database_url, "Mars/Olympus_Mons")
    assert raised.value.setting == "pandasync.reporting_tz"
    row = await _fetchrow(fresh_database_url, "SELECT report_timezone() AS tz")
    assert row["tz"] == "Asia/Shanghai"


async def test_migrate_stores_the_configured_zone_and_limits(fresh_database_url: str) -> None:
    env = {
        **os.environ,
        "PANDASYNC_DATABASE_URL": fresh_database_url,
        "PANDASYNC_REPORTING_TIMEZONE": "America/Sao_Paulo",
        "PANDASYNC_REPORTING_STATEMENT_TIMEOUT_S": "45",
        "PANDASYNC_REPORTING_IDLE_IN_TRANSACTION_TIMEOUT_S": "90",
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "from service.cli import main; main()", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pandasync.reporting_tz=America/Sao_Paulo" in done.stdout
    assert (
        "reporting role: statement_timeout=45s, idle_in_transaction_session_timeout=90s "
        "for pandasync_reporting"
    ) in done.stdout
    # A database cloned from a template loses its privileges: migrate takes TEMPORARY again.
    assert "reporting role: TEMPORARY on this database taken from PUBLIC" in done.stdout
    assert "warning" not in done.stderr
    row = await _fetchrow(fresh_database_url, "SELECT report_timezone() AS tz")
    assert row["tz"] == "America/Sao_Paulo"


async def test_limits_a_user_may_not_set_are_warnings(fresh_database_url: str) -> None:
    name = f"pandasync_t_plain_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    admin = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        parts = urlsplit(fresh_database_url)
        port = f":{parts.port}" if parts.port else ""
        url = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.hostname}{port}"))
        report = await apply_reporting_access(
            url, statement_timeout_s=60, idle_in_transaction_timeout_s=300
        )
    finally:
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()
    assert report.applied == []
    assert [warning.split(":")[0] for warning in report.warnings] == [
        "could not set the timeouts of pandasync_reporting",
        "PUBLIC (so pandasync_reporting) may create temporary tables and functions",
    ]
    assert "permission denied" in report.warnings[0]


NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


async def test_generated_ledger_adds_up_in_every_view(fresh_database_url: str) -> None:
    counts = await generate(fresh_database_url, 600, now=NOW, days=20, seed=3, batch_size=250)
    assert counts["orders"] == 600
    assert counts["webhook_inbox"] == 600
    for table in ("order_lines", "order_status_history", "shipments", "shipment_events"):
        assert counts[table] > 600 * 0.8, (table, counts)
    assert counts["refunds"] > 0
    assert counts["order_price_changes"] > 0
    assert counts["sweep_cursors"] == 4
    row = await _fetchrow(
        fresh_database_url,
        """
        SELECT
          (SELECT sum(orders_created) FROM report_daily_sales) AS created,
          (SELECT count(*) FROM orders) AS orders,
          (SELECT sum(orders_paid) FROM report_daily_sales) AS paid,
          (SELECT count(paid_at) FROM orders) AS orders_paid,
          (SELECT sum(orders_cancelled) FROM report_daily_sales) AS cancelled,
          (SELECT count(cancelled_at) FROM orders) AS orders_cancelled,
          (SELECT sum(gross_amount) FROM report_daily_sales) AS gross,
          (SELECT sum(total_amount) FROM orders WHERE paid_at IS NOT NULL) AS orders_gross,
          (SELECT sum(refunded_amount) FROM report_daily_sales) AS refunded,
          (SELECT sum(amount) FROM refunds WHERE status = 'refunded') AS refunds_refunded,
          (SELECT sum(refunded_amount) FROM orders) AS orders_refunded,
          (SELECT count(*) FROM report_fulfilment) AS fulfilment,
          (SELECT sum(shipments) FROM report_fulfilment) AS parcels,
          (SELECT count(*) FROM shipments) AS shipments,
          (SELECT count(*) FROM report_refunds) AS refunds,
          (SELECT count(*) FROM report_sales_lines) AS sales_lines,
          (SELECT count(*) FROM order_lines l JOIN orders o ON o.id = l.order_pk
            WHERE o.paid_at IS NOT NULL) AS paid_lines,
          (SELECT count(*) FROM report_sync_health) AS health,
          (SELECT count(*) FROM orders o WHERE NOT EXISTS
             (SELECT FROM order_status_history h WHERE h.order_pk = o.id)) AS without_history
        """,
    )
    assert row["created"] == row["orders"] == 600
    assert row["paid"] == row["orders_paid"] == row["fulfilment"]
    assert row["cancelled"] == row["orders_cancelled"]
    assert row["gross"] == row["orders_gross"]
    assert row["refunded"] == row["refunds_refunded"] == row["orders_refunded"] > Decimal(0)
    assert row["parcels"] == row["shipments"]
    assert row["refunds"] == counts["refunds"]
    assert row["sales_lines"] == row["paid_lines"]
    assert row["health"] >= 4
    assert row["without_history"] == 0


async def test_generator_is_deterministic_for_a_seed(fresh_database_url: str) -> None:
    query = "SELECT sum(total_amount) AS total, max(paid_at) AS last_paid FROM orders"
    await generate(fresh_database_url, 300, now=NOW, days=10, seed=5)
    first = await _fetchrow(fresh_database_url, query)
    await generate(fresh_database_url, 300, now=NOW, days=10, seed=5, truncate=True)
    assert await _fetchrow(fresh_database_url, query) == first


async def test_generator_refuses_a_ledger_that_is_not_empty(fresh_database_url: str) -> None:
    await generate(fresh_database_url, 10, now=NOW, days=1)
    with pytest.raises(SystemExit, match="not empty"):
        await generate(fresh_database_url, 10, now=NOW, days=1)
